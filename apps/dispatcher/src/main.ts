// The dispatcher process.
//  1. Parse config; connect to Redis and storage (presigned URLs for webhook payloads).
//  2. Start the webhook delivery worker (every dispatcher delivers, leader or not).
//  3. Tick the placement loop on an interval and whenever the API or an agent publishes a
//     wake-up; only the lease holder places (see dispatcher.ts).
//  4. When this process loses Redis, hold failover until it is back and agents had a
//     heartbeat TTL to re-announce themselves (an outage is not an agent death).
//  5. Serve /metrics on METRICS_PORT (queue depth, fleet, placement, webhooks).
//  6. On SIGTERM: stop ticking, release the lease so a standby takes over at once, close.
import { hostname } from 'node:os';
import { randomUUID } from 'node:crypto';
import {
  createJobServices,
  createLogger,
  createRedis,
  type DeliveryData,
  groupTracker,
  type GroupTrackData,
  guardProcess,
  isConnectionError,
  onShutdown,
  parseEnv,
  QUEUES,
  quietErrors,
  WAKE,
  redisHealth,
  runAll,
  serveMetrics,
  startTracing,
  webhookDeliverer,
} from '@kiln/runtime';
import { Worker } from 'bullmq';
import { Dispatcher } from './dispatcher.js';
import { DispatcherEnv } from './env.js';
import { Lease } from './lease.js';
import { TickLoop } from './tick-loop.js';
import { registerQueueGauges, webhookMessagesFailed } from './metrics.js';

const env = parseEnv(DispatcherEnv, 'dispatcher');
const log = createLogger('dispatcher', env.LOG_LEVEL);
const stopTracing = startTracing('dispatcher', env, log);
guardProcess(log);
const services = createJobServices(env, 'kiln-dispatcher');
const { redis, keys, store, groups, intake, jobs } = services;
const sub = createRedis(env.REDIS_URL, 'kiln-dispatcher-sub');
const lease = new Lease(redis, keys.dispatcherLease(), `${hostname()}:${process.pid}:${randomUUID().slice(0, 8)}`, env.LEASE_TTL_MS);
const dispatcher = new Dispatcher(env, log, redis, intake, jobs, services.registry, lease, services.loras);

// every dispatcher keeps the groups queue's entries current for Bull Board
const tracker = quietErrors(
  new Worker<GroupTrackData>(QUEUES.groups, groupTracker(groups), {
    connection: createRedis(env.REDIS_URL, 'kiln-groups'),
    prefix: env.KILN_PREFIX,
    concurrency: 256,
  }),
  'group tracker',
);

let deliverer: Worker<DeliveryData> | null = null;
if (env.WEBHOOK_SECRET) {
  deliverer = quietErrors(
    new Worker<DeliveryData>(QUEUES.webhooks, webhookDeliverer(store, groups, env), {
      connection: createRedis(env.REDIS_URL, 'kiln-webhooks'),
      prefix: env.KILN_PREFIX,
      concurrency: env.WEBHOOK_CONCURRENCY,
    }),
    'webhook deliverer',
  );
  deliverer.on('failed', (job, err) => {
    const last = !job || job.attemptsMade >= (job.opts.attempts ?? 1) || err.name === 'UnrecoverableError';
    if (last) webhookMessagesFailed.inc();
    log.warn({ job: job?.data.job_id, url: job?.data.url, err: err.message, last }, last ? 'webhook message given up' : 'webhook try failed');
  });
} else {
  log.warn('WEBHOOK_SECRET is not set: webhooks will not be delivered (the API refuses jobs that ask for one)');
}

// one tick at a time, wakes under load gathered (tick-loop.ts); an outage is reported once by
// redisHealth, and the next tick after it retries
const ticks = new TickLoop(() => dispatcher.tick(), env.TICK_COALESCE_MAX_MS, (err) => {
  if (!isConnectionError(err)) log.error({ err }, 'dispatch tick failed');
});
redisHealth.on('lost', () => dispatcher.redisLost());
redisHealth.on('restored', (downMs) => dispatcher.redisRestored(downMs));
const interval = setInterval(() => {
  dispatcher.intakeChanged(); // catches what no wake announced (a lost message, a cancel)
  ticks.wake();
}, env.DISPATCH_INTERVAL_MS);
await sub.subscribe(keys.wakeChannel());
sub.on('message', (_channel: string, message: string) => {
  if (message === WAKE.queued) dispatcher.intakeChanged();
  else if (message === WAKE.all) dispatcher.everythingChanged();
  else if (message.startsWith(WAKE.residency)) dispatcher.residencyChanged();
  else {
    // an agent's queue changed: "<agent> <entry>" an entry left it, "<agent>" read it again
    const space = message.indexOf(' ');
    if (space > 0) dispatcher.agentEntryLeft(message.slice(0, space), message.slice(space + 1));
    else dispatcher.agentChanged(message);
  }
  ticks.wake();
});
registerQueueGauges(intake, redis, keys, services.registry);
const metrics = await serveMetrics(env, log);
log.info({ prefix: env.KILN_PREFIX, owner: lease.owner, metrics_port: metrics.port ?? undefined }, 'dispatcher started');
ticks.wake();

onShutdown(log, env.SHUTDOWN_TIMEOUT_MS, async () => {
  clearInterval(interval);
  await ticks.stop();
  await runAll([
    () => lease.release(),
    () => deliverer?.close(),
    () => tracker.close(),
    () => dispatcher.close(),
    () => sub.quit(),
    () => metrics.close(),
    () => services.close(),
    () => stopTracing(),
  ]);
  log.info('dispatcher stopped');
});
