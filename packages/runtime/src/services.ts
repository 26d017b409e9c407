import { Queue } from 'bullmq';
import type { Redis } from 'ioredis';
import { keepHistory, retentionByKind, type StorageEnv, type WebhookEnv } from './env.js';
import { GroupStore, type GroupTrackData } from './groups.js';
import { JobStore } from './job-store.js';
import { type IntakeData, Jobs } from './jobs.js';
import { Keys, QUEUES } from './keys.js';
import { createRedis, quietErrors } from './redis.js';
import { AgentRegistry } from './registry.js';
import { LoraRegistry } from './loras.js';
import { Storage } from './storage.js';
import { type DeliveryData, WebhookOutbox } from './webhooks.js';

/** What every Kiln process wires the same way: Redis, storage, stores, queues, job lifecycle. */
export interface JobServices {
  redis: Redis;
  keys: Keys;
  storage: Storage;
  store: JobStore;
  groups: GroupStore;
  jobs: Jobs;
  registry: AgentRegistry;
  loras: LoraRegistry;
  intake: Queue<IntakeData>;
  webhookQueue: Queue<DeliveryData>;
  groupsQueue: Queue<GroupTrackData>;
  /** closes the queues and the Redis connection */
  close(): Promise<void>;
}

export function createJobServices(
  env: StorageEnv &
    WebhookEnv &
    Parameters<typeof keepHistory>[0] &
    Parameters<typeof retentionByKind>[0] & { REDIS_URL: string; KILN_PREFIX: string; PUBLIC_URL: string; JOB_RETENTION_S: number; MAX_ATTEMPTS: number; INFRA_RETRY_DEADLINE_S: number },
  connectionName: string,
): JobServices {
  const keys = new Keys(env.KILN_PREFIX);
  const redis = createRedis(env.REDIS_URL, connectionName);
  const storage = new Storage(env);
  const store = new JobStore(redis, keys, env.JOB_RETENTION_S, retentionByKind(env));
  const groups = new GroupStore(redis, keys, env.JOB_RETENTION_S);
  const queueOpts = { connection: redis, prefix: env.KILN_PREFIX };
  // every BullMQ object gets the quiet `error` listener: BullMQ prints with console.error otherwise
  const intake = quietErrors(new Queue<IntakeData>(QUEUES.intake, queueOpts), 'queue intake');
  // finished and failed entries are kept for Bull Board, bounded (QUEUE_KEEP_*); delivered
  // webhooks at least a day and 10,000, since a message still there is what makes a repeated
  // drain a no-op (WebhookOutbox)
  const history = keepHistory(env);
  const webhookHistory = { ...history, removeOnComplete: { count: Math.max(history.removeOnComplete.count, 10_000), age: Math.max(history.removeOnComplete.age, 24 * 3600) } };
  const webhookQueue = quietErrors(new Queue<DeliveryData>(QUEUES.webhooks, { ...queueOpts, defaultJobOptions: webhookHistory }), 'queue webhooks');
  const groupsQueue = quietErrors(new Queue<GroupTrackData>(QUEUES.groups, { ...queueOpts, defaultJobOptions: history }), 'queue groups');
  const outbox = new WebhookOutbox(webhookQueue, store, groups, storage, env.PUBLIC_URL, env);
  const jobs = new Jobs(store, intake, redis, keys, outbox, env.MAX_ATTEMPTS, groups, env.INFRA_RETRY_DEADLINE_S);
  return {
    redis,
    keys,
    storage,
    store,
    groups,
    jobs,
    registry: new AgentRegistry(redis, keys),
    loras: new LoraRegistry(redis, keys),
    intake,
    webhookQueue,
    groupsQueue,
    close: async () => {
      await Promise.allSettled([intake.close(), webhookQueue.close(), groupsQueue.close()]);
      await redis.quit();
    },
  };
}
