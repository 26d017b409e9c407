// The API process.
//  1. Parse config; connect to Redis; make sure the output bucket exists.
//  2. Build the app (routes, auth, Bull Board) and listen on HOST:PORT.
//  3. On SIGTERM: stop accepting connections, finish in-flight requests, close Redis.
import { AgentRegistry, GroupStore, createLogger, createRedis, type DeliveryData, type GroupTrackData, type IntakeData, Jobs, JobStore, Keys, LoraRegistry, onShutdown, parseEnv, QUEUES, runAll, Storage, WebhookOutbox } from '@kiln/runtime';
import { Queue } from 'bullmq';
import { buildApp } from './app.js';
import { ApiEnv } from './env.js';

const env = parseEnv(ApiEnv, 'api');
const log = createLogger('api', env.LOG_LEVEL);
const keys = new Keys(env.KILN_PREFIX);
const redis = createRedis(env.REDIS_URL, 'kiln-api');
const storage = new Storage(env);
const store = new JobStore(redis, keys, env.JOB_RETENTION_S);
const groups = new GroupStore(redis, keys, env.JOB_RETENTION_S);
const queueOpts = { connection: redis, prefix: env.KILN_PREFIX };
const intake = new Queue<IntakeData>(QUEUES.intake, queueOpts);
const webhookQueue = new Queue<DeliveryData>(QUEUES.webhooks, queueOpts);
const groupsQueue = new Queue<GroupTrackData>(QUEUES.groups, queueOpts);
const jobs = new Jobs(store, intake, redis, keys, new WebhookOutbox(webhookQueue, store, groups, storage, env.PUBLIC_URL, env), env.MAX_ATTEMPTS, groups);

await storage.ensureBucket().catch((err) => log.warn({ err: err.message }, 'storage not reachable yet; /readyz will say so'));
const { app, close } = await buildApp({ env, log, redis, keys, store, jobs, registry: new AgentRegistry(redis, keys), loras: new LoraRegistry(redis, keys), storage, intake, webhookQueue, groupsQueue });
await app.listen({ host: env.HOST, port: env.PORT });

onShutdown(log, env.SHUTDOWN_TIMEOUT_MS, () =>
  runAll([() => close(), () => intake.close(), () => webhookQueue.close(), () => groupsQueue.close(), () => redis.quit()]),
);
