// The GPU agent process, one per GPU.
//  1. Parse config; connect to Redis and storage; make sure the bucket exists.
//  2. Listen for cancellations on Redis pub/sub (subscribed once the connection is ready, and
//     again after every reconnect: cancels.ts).
//  3. Hand back whatever a previous run of this agent id held, then start the Python worker
//     (CUDA_VISIBLE_DEVICES=GPU_ID) and wait for its ready message, heartbeating meanwhile so
//     the API shows the agent as starting.
//  4. Consume this agent's queue as a pipeline (pipeline.ts): the job on the GPU and the next,
//     which prepares meanwhile and is sent to the worker the moment the first one's result is in.
//  5. Serve /metrics on METRICS_PORT (state, GPU busy time, model loads and evictions, restarts).
//  6. On SIGTERM: drain (stop taking work, finish or hand back), stop the worker, leave.
import { coerceError, createJobServices, createLogger, createRedis, onShutdown, parseEnv, runAll, serveMetrics, startTracing } from '@kiln/runtime';
import { join } from 'node:path';
import { Agent } from './agent.js';
import { listenForCancels } from './cancels.js';
import { AgentEnv } from './env.js';
import { agentMetrics } from './metrics.js';

const env = parseEnv(AgentEnv, 'gpu-agent');
const log = createLogger(`agent:${env.AGENT_ID}`, env.LOG_LEVEL);
agentMetrics.init(env.AGENT_ID);
const stopTracing = startTracing('agent', env, log);
const services = createJobServices(env, `kiln-agent-${env.AGENT_ID}`);
const { keys, storage, jobs } = services;
const sub = createRedis(env.REDIS_URL, `kiln-agent-${env.AGENT_ID}-sub`);

const [file, ...args] = env.WORKER_COMMAND ?? [env.WORKER_PYTHON, '-m', 'kiln_worker'];
const agent = new Agent(env, log, createRedis(env.REDIS_URL, `kiln-agent-${env.AGENT_ID}-queue`), jobs, services.registry, storage, {
  file: file!,
  args,
  cwd: env.WORKER_DIR,
  env: { CUDA_VISIBLE_DEVICES: env.GPU_ID, KILN_BACKEND: env.WORKER_BACKEND, PYTHONUNBUFFERED: '1', KILN_LORA_DIR: join(env.WORK_DIR, env.AGENT_ID, 'loras') },
}, services.loras);

await storage.ensureBucket().catch((err) => log.warn({ err: err.message }, 'storage not reachable yet; uploads will be retried with the job'));
onShutdown(log, env.SHUTDOWN_TIMEOUT_MS, async () => {
  await runAll([
    () => agent.drain(env.SHUTDOWN_TIMEOUT_MS),
    () => sub.quit(),
    () => metrics.close(),
    () => services.close(),
    () => stopTracing(),
  ]);
  log.info('agent stopped');
});
const metrics = await serveMetrics(env, log);
log.info({ agent: env.AGENT_ID, gpu: env.GPU_ID, backend: env.WORKER_BACKEND, metrics_port: metrics.port ?? undefined }, 'agent starting');
await listenForCancels(sub, keys.cancelChannel(), (jobId) => agent.onCancel(jobId), log);
try {
  await agent.start();
} catch (err) {
  // nothing was taken yet: say why and stop, leaving the other agent's jobs alone
  log.fatal({ err: coerceError(err).message }, 'cannot start');
  await Promise.allSettled([sub.quit(), metrics.close(), services.close()]);
  process.exit(1);
}
services.redis.on('ready', () => agent.announce());
log.info('agent taking work');
