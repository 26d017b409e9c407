// The API process.
//  1. Parse config; connect to Redis; make sure the output bucket exists.
//  2. Build the app (routes, auth, Bull Board) and listen on HOST:PORT.
//  3. Sweep for expired records, deleting their objects, and for passed deadlines (Cancel-After),
//     canceling their jobs (one API instance at a time, each).
//  4. On SIGTERM: stop accepting connections, finish in-flight requests, stop the sweeps, close Redis.
import { createJobServices, createLogger, guardProcess, onShutdown, parseEnv, RetentionSweeper, runAll, startTracing } from '@kiln/runtime';
import { buildApp } from './app.js';
import { DeadlineSweeper } from './deadlines.js';
import { ApiEnv } from './env.js';
import { KeyRing } from './keys.js';

const env = parseEnv(ApiEnv, 'api');
const log = createLogger('api', env.LOG_LEVEL);
guardProcess(log); // from the start: a rejection nobody handled is logged, not fatal
const stopTracing = startTracing('api', env, log); // before the app: its requests become spans
const services = createJobServices(env, 'kiln-api');
const { storage } = services;

await storage.ensureBucket().catch((err) => log.warn({ err: err.message }, 'storage not reachable yet; /readyz will say so'));
const ctx = { env, log, ring: KeyRing.from(env), ...services };
const { app, close } = await buildApp(ctx);
await app.listen({ host: env.HOST, port: env.PORT });
const retention = new RetentionSweeper(services.redis, services.keys, storage, log, { intervalMs: env.RETENTION_SWEEP_MS });
retention.start();
const deadlines = new DeadlineSweeper(ctx, log);
deadlines.start();

onShutdown(log, env.SHUTDOWN_TIMEOUT_MS, () =>
  runAll([() => close(), () => retention.close(), () => deadlines.close(), () => services.close(), () => stopTracing()]),
);
