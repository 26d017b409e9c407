// The API process.
//  1. Parse config; connect to Redis; make sure the output bucket exists.
//  2. Build the app (routes, auth, Bull Board) and listen on HOST:PORT.
//  3. Sweep for expired records, deleting their objects (one API instance at a time).
//  4. On SIGTERM: stop accepting connections, finish in-flight requests, stop the sweep, close Redis.
import { createJobServices, createLogger, guardProcess, onShutdown, parseEnv, RetentionSweeper, runAll, startTracing } from '@kiln/runtime';
import { buildApp } from './app.js';
import { ApiEnv } from './env.js';
import { KeyRing } from './keys.js';

const env = parseEnv(ApiEnv, 'api');
const log = createLogger('api', env.LOG_LEVEL);
guardProcess(log); // from the start: a rejection nobody handled is logged, not fatal
const stopTracing = startTracing('api', env, log); // before the app: its requests become spans
const services = createJobServices(env, 'kiln-api');
const { storage } = services;

await storage.ensureBucket().catch((err) => log.warn({ err: err.message }, 'storage not reachable yet; /readyz will say so'));
const { app, close } = await buildApp({ env, log, ring: KeyRing.from(env), ...services });
await app.listen({ host: env.HOST, port: env.PORT });
const retention = new RetentionSweeper(services.redis, services.keys, storage, log, { intervalMs: env.RETENTION_SWEEP_MS });
retention.start();

onShutdown(log, env.SHUTDOWN_TIMEOUT_MS, () =>
  runAll([() => close(), () => retention.close(), () => services.close(), () => stopTracing()]),
);
