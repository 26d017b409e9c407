import { randomUUID } from 'node:crypto';
import { type GenerationJob, ResolvedGenerationRequest, type StoredGroup } from '@kiln/contracts';
import { Queue } from 'bullmq';
import { afterAll, afterEach, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { GroupStore } from './groups.js';
import { announcement, JobStore } from './job-store.js';
import { Jobs } from './jobs.js';
import { Keys } from './keys.js';
import { createRedis, type Redis } from './redis.js';
import { Storage } from './storage.js';
import { type DeliveryData, WebhookOutbox } from './webhooks.js';

/**
 * Atomic ends: a job's terminal write, its `completed` announcement and its group's counter are
 * one Redis step, and draining the announcements is safe to repeat. A crash between steps is
 * simulated by doing the write alone (no drain), and by putting drained announcements back.
 */

const REDIS_URL = process.env.REDIS_URL ?? 'redis://127.0.0.1:6379';
const HOOK = 'https://hooks.example.com/kiln';

let redis: Redis;
let keys: Keys;
let store: JobStore;
let groups: GroupStore;
let queue: Queue<DeliveryData>;
let outbox: WebhookOutbox;

beforeAll(() => {
  redis = createRedis(REDIS_URL, 'outbox-test');
});
afterAll(async () => {
  await redis.quit();
});
beforeEach(() => {
  keys = new Keys(`kiln-test-${randomUUID()}`);
  store = new JobStore(redis, keys, 3_600);
  groups = new GroupStore(redis, keys, 3_600);
  queue = new Queue<DeliveryData>('webhooks', { connection: redis, prefix: keys.prefix });
  const storage = new Storage({ S3_ENDPOINT: 'http://127.0.0.1:9', S3_ACCESS_KEY: 'k', S3_SECRET_KEY: 'secret-key', S3_BUCKET: 'kiln', S3_REGION: 'us-east-1', S3_PRESIGN_EXPIRY_S: 60, S3_STALL_TIMEOUT_MS: 30_000 });
  outbox = new WebhookOutbox(queue, store, groups, storage, 'http://127.0.0.1:8080', { WEBHOOK_ALLOW_PRIVATE: false, WEBHOOK_MAX_ATTEMPTS: 3, WEBHOOK_BACKOFF_MS: 100, WEBHOOK_TIMEOUT_MS: 1_000 });
});
afterEach(async () => {
  await queue.close();
  const left = await redis.keys(`${keys.prefix}:*`);
  if (left.length) await redis.del(...left);
});

function job(groupId: string | null, webhook = true): GenerationJob {
  return {
    id: randomUUID(),
    kind: 'generation',
    client: 'client-a',
    status: 'running',
    stage: 'running',
    attempt: 1,
    agent: 'agent-1',
    priority: 'normal',
    request: ResolvedGenerationRequest.parse({
      model: { base: 'stabilityai/stable-diffusion-xl-base-1.0' },
      conditioning: { prompt: 'a kiln at dawn' },
      hyperparameters: { seed: 1, width: 512, height: 512 },
      ...(webhook ? { webhook: { url: HOOK, events: ['completed'] } } : {}),
    }),
    progress: null,
    outputs: [],
    error: null,
    timings: { queued_ms: null, model_load_ms: null, inference_ms: null, upload_ms: null, total_ms: null },
    cancel_requested: false,
    group_id: groupId,
    created_at: new Date().toISOString(),
    started_at: null,
    finished_at: null,
  } as GenerationJob;
}

/** A running batch of `n` children with a webhook of its own. */
async function batch(n: number): Promise<{ group: StoredGroup; children: GenerationJob[] }> {
  const id = randomUUID();
  const children = Array.from({ length: n }, () => job(id));
  const group: StoredGroup = {
    id,
    kind: 'batch',
    client: 'client-a',
    status: 'running',
    priority: 'normal',
    children: children.map((c) => c.id),
    webhook: { url: HOOK, events: ['completed'] },
    cancel_requested: false,
    created_at: new Date().toISOString(),
    finished_at: null,
  };
  await groups.create(group);
  for (const c of children) await store.create(c);
  return { group, children };
}

const end = (id: string, status: 'succeeded' | 'failed') =>
  store.update(id, { status: ['running'], attempt: 1 }, { status, stage: 'done', finished_at: new Date().toISOString() });
const outboxMembers = async () => (await redis.zrange(keys.outbox(), 0, -1)).sort();
const deliveries = async () => (await queue.getJobs(['waiting', 'delayed', 'active', 'completed', 'failed'])).map((j) => j.id!).sort();
const groupEnds = async (id: string) => (await groups.history(id)).events.filter((e) => ['succeeded', 'failed', 'partially_succeeded', 'canceled'].includes(e.status));

describe('atomic ends', () => {
  it('the terminal write alone leaves its announcement and the group count in Redis: a crash right after it loses nothing', async () => {
    const { group, children } = await batch(2);
    expect(await end(children[0]!.id, 'succeeded')).not.toBeNull();
    expect(await outboxMembers()).toEqual([announcement.job(children[0]!.id)]);
    expect(await groups.doneCount(group.id)).toBe(1);

    expect(await end(children[1]!.id, 'failed')).not.toBeNull();
    // the child that closed the batch also announced the batch's end, in the same step
    expect(await outboxMembers()).toEqual([announcement.group(group.id), announcement.job(children[0]!.id), announcement.job(children[1]!.id)].sort());
    expect(await groups.doneCount(group.id)).toBe(2);
    // nothing was delivered or finished yet: that is the drainer's part
    expect(await deliveries()).toEqual([]);
    expect((await groups.get(group.id))!.status).toBe('running');
  });

  it('a job ends once: a second end is refused and counts nothing', async () => {
    const { group, children } = await batch(2);
    await end(children[0]!.id, 'succeeded');
    expect(await store.update(children[0]!.id, {}, { status: 'failed', stage: 'done' })).toBeNull();
    expect(await groups.doneCount(group.id)).toBe(1);
    expect((await store.get(children[0]!.id))!.status).toBe('succeeded');
  });

  it('draining twice (a drainer that died before removing what it announced) queues exactly one delivery each and closes the batch once', async () => {
    const { group, children } = await batch(3);
    await end(children[0]!.id, 'succeeded');
    await end(children[1]!.id, 'succeeded');
    await end(children[2]!.id, 'failed');
    const members = await outboxMembers();
    expect(members).toHaveLength(4);

    expect(await outbox.drain()).toBe(4);
    expect(await outboxMembers()).toEqual([]);
    const first = await deliveries();
    expect(first).toHaveLength(4); // three jobs' `completed` and the batch's
    const closed = await groups.get(group.id);
    expect(closed).toMatchObject({ status: 'partially_succeeded', finished_at: expect.any(String) });
    expect(await groupEnds(group.id)).toHaveLength(1);

    // the same announcements again, as if the drainer had died before removing them
    await redis.zadd(keys.outbox(), ...members.flatMap((m) => [0, m]));
    expect(await outbox.drain()).toBe(4);
    expect(await deliveries()).toEqual(first);
    expect(await groupEnds(group.id)).toHaveLength(1);
    expect((await groups.get(group.id))!.finished_at).toBe(closed!.finished_at);
    const batchMsg = (await queue.getJobs(['waiting'])).find((j) => j.data.group)!;
    expect(JSON.parse(batchMsg.data.body)).toMatchObject({ type: 'batch.completed', data: { status: 'partially_succeeded', counts: { succeeded: 2, failed: 1 } } });
  });

  it('two drainers at once announce each end once', async () => {
    const { group, children } = await batch(6);
    for (const c of children) await end(c.id, 'succeeded');
    const made = await Promise.all([outbox.drain(), outbox.drain(), outbox.drain()]);
    expect(made.reduce((s, n) => s + n, 0)).toBe(7);
    expect(await deliveries()).toHaveLength(7);
    expect(await groupEnds(group.id)).toHaveLength(1);
    expect((await groups.get(group.id))!.status).toBe('succeeded');
  });

  it('an announcement a drainer claimed and then lost is taken over once its lease runs out, not before', async () => {
    const solo = job(null);
    await store.create(solo);
    await end(solo.id, 'succeeded');
    expect(await store.claimAnnouncements(200)).toEqual([announcement.job(solo.id)]);
    // the claimer dies here; another drainer finds nothing due until the lease runs out
    expect(await outbox.drain()).toBe(0);
    await new Promise((r) => setTimeout(r, 300));
    expect(await outbox.drain()).toBe(1);
    expect(await deliveries()).toHaveLength(1);
  });

  it('a job without a `completed` webhook outside a group announces nothing', async () => {
    const quiet = job(null, false);
    await store.create(quiet);
    await end(quiet.id, 'succeeded');
    expect(await outboxMembers()).toEqual([]);
  });

  it('Jobs.update announces at once: the delivery is queued and the batch closed when the write returns', async () => {
    const intake = new Queue('intake', { connection: redis, prefix: keys.prefix });
    try {
      const jobs = new Jobs(store, intake, redis, keys, outbox, 3, groups);
      const { group, children } = await batch(2);
      for (const c of children) await jobs.update(c.id, { status: ['running'], attempt: 1 }, { status: 'succeeded', stage: 'done' });
      expect(await outboxMembers()).toEqual([]);
      expect(await deliveries()).toHaveLength(3);
      expect((await groups.get(group.id))!.status).toBe('succeeded');
    } finally {
      await intake.close();
    }
  });
});
