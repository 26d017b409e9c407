// The GPU agent process, one per GPU.
//  1. Parse config; connect to Redis and storage; make sure the bucket exists.
//  2. Start the Python worker (CUDA_VISIBLE_DEVICES=GPU_ID) and wait for its ready message,
//     heartbeating meanwhile so the API shows the agent as starting.
//  3. Consume this agent's queue, one job at a time (agent.ts).
//  4. Listen for cancellations on Redis pub/sub.
//  5. On SIGTERM: drain (stop taking work, finish or hand back), stop the worker, leave.
import { AgentRegistry, GroupStore, createLogger, createRedis, type DeliveryData, type IntakeData, Jobs, JobStore, Keys, LoraRegistry, onShutdown, parseEnv, QUEUES, runAll, Storage, WebhookOutbox } from '@kiln/runtime';
import { join } from 'node:path';
import { Queue } from 'bullmq';
import { Agent } from './agent.js';
import { AgentEnv } from './env.js';

const env = parseEnv(AgentEnv, 'gpu-agent');
const log = createLogger(`agent:${env.AGENT_ID}`, env.LOG_LEVEL);
const keys = new Keys(env.KILN_PREFIX);
const redis = createRedis(env.REDIS_URL, `kiln-agent-${env.AGENT_ID}`);
const sub = createRedis(env.REDIS_URL, `kiln-agent-${env.AGENT_ID}-sub`);
const storage = new Storage(env);
const store = new JobStore(redis, keys, env.JOB_RETENTION_S);
const groups = new GroupStore(redis, keys, env.JOB_RETENTION_S);
const queueOpts = { connection: redis, prefix: env.KILN_PREFIX };
const intake = new Queue<IntakeData>(QUEUES.intake, queueOpts);
const webhookQueue = new Queue<DeliveryData>(QUEUES.webhooks, queueOpts);
const jobs = new Jobs(store, intake, redis, keys, new WebhookOutbox(webhookQueue, store, groups, storage, env.PUBLIC_URL, env), env.MAX_ATTEMPTS, groups);

const [file, ...args] = env.WORKER_COMMAND ?? [env.WORKER_PYTHON, '-m', 'kiln_worker'];
const agent = new Agent(env, log, createRedis(env.REDIS_URL, `kiln-agent-${env.AGENT_ID}-queue`), jobs, new AgentRegistry(redis, keys), storage, {
  file: file!,
  args,
  cwd: env.WORKER_DIR,
  env: { CUDA_VISIBLE_DEVICES: env.GPU_ID, KILN_BACKEND: env.WORKER_BACKEND, PYTHONUNBUFFERED: '1', KILN_LORA_DIR: join(env.WORK_DIR, env.AGENT_ID, 'loras') },
}, new LoraRegistry(redis, keys));

await storage.ensureBucket().catch((err) => log.warn({ err: err.message }, 'storage not reachable yet; uploads will be retried with the job'));
await sub.subscribe(keys.cancelChannel());
sub.on('message', (_channel, jobId) => agent.onCancel(jobId));
onShutdown(log, env.SHUTDOWN_TIMEOUT_MS, async () => {
  await runAll([
    () => agent.drain(env.SHUTDOWN_TIMEOUT_MS),
    () => intake.close(),
    () => webhookQueue.close(),
    () => sub.quit(),
    () => redis.quit(),
  ]);
  log.info('agent stopped');
});
log.info({ agent: env.AGENT_ID, gpu: env.GPU_ID, backend: env.WORKER_BACKEND }, 'agent starting');
await agent.start();
log.info('agent taking work');
