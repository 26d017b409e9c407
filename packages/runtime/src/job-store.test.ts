import { randomUUID } from 'node:crypto';
import { ResolvedGenerationRequest, type GenerationJob, StoredJob } from '@kiln/contracts';
import { Queue } from 'bullmq';
import { afterAll, afterEach, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { JobStore } from './job-store.js';
import { Keys } from './keys.js';
import { createRedis, type Redis } from './redis.js';
import { commandsDuring as commandsOn } from '../../../tests/support/redis-fixture.js';

/** The commands this test's connection sends while `fn` runs, lower case. */
const commandsDuring = (fn: () => Promise<unknown>) => commandsOn(redis, fn);

const REDIS_URL = process.env.REDIS_URL ?? 'redis://127.0.0.1:6379';
const RETENTION_S = 3_600;

let redis: Redis;
let keys: Keys;
let store: JobStore;

beforeAll(() => {
  redis = createRedis(REDIS_URL, 'job-store-test');
});
afterAll(async () => {
  await redis.quit();
});
beforeEach(() => {
  keys = new Keys(`kiln-test-${randomUUID()}`);
  store = new JobStore(redis, keys, RETENTION_S);
});
afterEach(async () => {
  const left = await redis.keys(`${keys.prefix}:*`);
  if (left.length) await redis.del(...left);
});

function newJob(over: Partial<GenerationJob> = {}): GenerationJob {
  return {
    id: randomUUID(),
    kind: 'generation',
    client: 'client-a',
    status: 'queued',
    stage: 'queued',
    attempt: 0,
    agent: null,
    priority: 'normal',
    request: ResolvedGenerationRequest.parse({
      model: { base: 'stabilityai/stable-diffusion-xl-base-1.0' },
      conditioning: { prompt: 'a kiln at dawn', negative_prompt: 'blurry' },
      hyperparameters: { seed: 42, width: 512, height: 512 },
      webhook: { url: 'https://hooks.example.com/kiln', events: ['started', 'completed'] },
    }),
    progress: null,
    outputs: [],
    error: null,
    timings: { queued_ms: null, model_load_ms: null, inference_ms: null, upload_ms: null, total_ms: null },
    cancel_requested: false,
    group_id: null,
    created_at: new Date().toISOString(),
    started_at: null,
    finished_at: null,
    ...over,
  };
}

/** Creates a job and moves it to running on attempt 1, as the dispatcher does. */
async function runningJob(): Promise<StoredJob> {
  const job = newJob();
  await store.create(job);
  const running = await store.update(job.id, { status: ['queued'], attempt: 0 }, { status: 'running', stage: 'dispatched', attempt: 1, agent: 'agent-1' });
  expect(running?.status).toBe('running');
  return running!;
}

describe('JobStore', () => {
  it('reads back exactly the job it stored, and lists it as active', async () => {
    const job = newJob();
    await store.create(job);
    expect(await store.get(job.id)).toEqual(job);
    expect(await store.getMany([job.id, 'missing'])).toEqual([job, null]);
    expect(await store.activeIds()).toEqual([job.id]);
    const { events } = await store.history(job.id);
    expect(events).toEqual([expect.objectContaining({ status: 'queued', stage: 'queued', attempt: 0, agent: null })]);
  });

  it('returns null for a job that does not exist, and refuses to update it', async () => {
    expect(await store.get('no-such-job')).toBeNull();
    expect(await store.update('no-such-job', {}, { status: 'running' })).toBeNull();
    expect(await redis.exists(keys.job('no-such-job'))).toBe(0);
  });

  it('applies an update whose guard holds', async () => {
    const job = await runningJob();
    expect(job).toMatchObject({ status: 'running', stage: 'dispatched', attempt: 1, agent: 'agent-1' });
    expect(await store.get(job.id)).toEqual(job);
  });

  it('refuses an update when the job is not in a guarded status', async () => {
    const job = newJob();
    await store.create(job);
    expect(await store.update(job.id, { status: ['running'] }, { status: 'succeeded', stage: 'done' })).toBeNull();
    expect((await store.get(job.id))?.status).toBe('queued');
  });

  it('refuses a write from a stale attempt, so it cannot overwrite the current one', async () => {
    const job = await runningJob();
    // the job was re-placed: attempt 2 on another agent
    const retried = await store.update(job.id, { status: ['running'], attempt: 1 }, { attempt: 2, agent: 'agent-2', stage: 'dispatched' });
    expect(retried).toMatchObject({ attempt: 2, agent: 'agent-2' });
    // attempt 1's agent reports late that it failed
    const stale = await store.update(
      job.id,
      { status: ['running'], attempt: 1 },
      { status: 'failed', stage: 'done', error: { code: 'worker_crashed', message: 'late', retryable: true } },
    );
    expect(stale).toBeNull();
    expect(await store.get(job.id)).toMatchObject({ status: 'running', attempt: 2, agent: 'agent-2', error: null });
  });

  it('appends a lifecycle event on every status change, with the message when given', async () => {
    const job = await runningJob();
    await store.update(job.id, { status: ['running'], attempt: 1 }, { progress: { stage: 'running', step: 1, total: 30 } });
    await store.update(job.id, { status: ['running'], attempt: 1 }, { status: 'failed', stage: 'done' }, 'worker crashed');
    const { events } = await store.history(job.id);
    expect(events.map((e) => [e.status, e.stage, e.attempt, e.agent])).toEqual([
      ['queued', 'queued', 0, null],
      ['running', 'dispatched', 1, 'agent-1'],
      ['failed', 'done', 1, 'agent-1'],
    ]);
    expect(events[2]!.message).toBe('worker crashed');
  });

  it('on a terminal status, keeps the record for JOB_RETENTION and drops it from the active set', async () => {
    const job = await runningJob();
    expect(await redis.ttl(keys.job(job.id))).toBe(-1);
    await store.addDelivery(job.id, { id: 'msg_1', event: 'started', try: 1, at: new Date().toISOString(), status_code: 200, ok: true, error: null, duration_ms: 5 });
    const done = await store.update(job.id, { status: ['running'], attempt: 1 }, { status: 'succeeded', stage: 'done', finished_at: new Date().toISOString() });
    expect(done?.status).toBe('succeeded');
    for (const key of [keys.job(job.id), keys.jobEvents(job.id), keys.jobDeliveries(job.id)]) {
      const ttl = await redis.ttl(key);
      expect(ttl, key).toBeGreaterThan(RETENTION_S - 5);
      expect(ttl, key).toBeLessThanOrEqual(RETENTION_S);
    }
    expect(await store.activeIds()).toEqual([]);
  });

  it('keeps a record for its kind’s retention when the kind has one (JOB_RETENTION_S_<KIND>)', async () => {
    const own = new JobStore(redis, keys, RETENTION_S, { generation: 120 });
    const other = new JobStore(redis, keys, RETENTION_S, { training: 120 });
    expect([own.retentionFor('generation'), own.retentionFor('training'), other.retentionFor('generation')]).toEqual([120, RETENTION_S, RETENTION_S]);
    const [a, b] = [newJob(), newJob()];
    for (const [store, job] of [[own, a], [other, b]] as const) {
      await store.create(job);
      await store.update(job.id, { status: ['queued'] }, { status: 'canceled', stage: 'done', finished_at: new Date().toISOString() });
    }
    for (const key of [keys.job(a.id), keys.jobEvents(a.id)]) expect(await redis.ttl(key), key).toBeLessThanOrEqual(120);
    expect(await redis.ttl(keys.job(b.id))).toBeGreaterThan(RETENTION_S - 5);
  });

  /** A job run as the agent writes it: placed, started, a stage report, its upload (no event). */
  async function ranJob(): Promise<StoredJob> {
    const job = await runningJob(); // 1 submitted, 2 placed
    const g = { status: ['running' as const], attempt: 1 };
    await store.update(job.id, g, { stage: 'running', started_at: new Date().toISOString() }, 'attempt 1 started on agent-1'); // 3
    await store.setProgress(job.id, 1, { stage: 'running', progress: { stage: 'base', step: 1, total: 30 } });
    await store.update(job.id, g, {}, 'stage base: 30 steps'); // 4
    await store.setProgress(job.id, 1, { stage: 'uploading', progress: { stage: 'uploading', step: 0, total: 1 } });
    return job;
  }
  const ended = (status: 'succeeded' | 'failed' | 'canceled') => ({ status, stage: 'done' as const, progress: null, finished_at: new Date().toISOString() });
  const summary = (events: { seq: number; status: string; attempt: number; message?: string }[]) => events.map((e) => [e.seq, e.status, e.attempt, e.message ?? null]);

  it("compacts a succeeded job as it ends: its last run's start goes, its placement, stage reports and end stay, every event keeps its number", async () => {
    const job = await ranJob();
    const bytes = async () => Number(await redis.call('MEMORY', 'USAGE', keys.jobEvents(job.id), 'SAMPLES', '0'));
    const running = await store.history(job.id);
    // nothing is dropped while it runs
    expect(summary(running.events)).toEqual([
      [1, 'queued', 0, 'submitted'],
      [2, 'running', 1, null],
      [3, 'running', 1, 'attempt 1 started on agent-1'],
      [4, 'running', 1, 'stage base: 30 steps'],
    ]);
    const before = await bytes();
    const done = await store.update(job.id, { status: ['running'], attempt: 1 }, ended('succeeded'));
    expect(done?.progress).toBeNull();
    const { events } = await store.history(job.id);
    expect(summary(events)).toEqual([
      [1, 'queued', 0, 'submitted'],
      [2, 'running', 1, null],
      [4, 'running', 1, 'stage base: 30 steps'],
      [5, 'succeeded', 1, null],
    ]);
    // the kept events are exactly as they were written
    expect(events.slice(0, 3)).toEqual([running.events[0], running.events[1], running.events[3]]);
    expect(await bytes()).toBeLessThan(before);
    // …and the list keeps the record's retention
    expect(await redis.ttl(keys.jobEvents(job.id))).toBeGreaterThan(RETENTION_S - 5);
  });

  it('compacts only a succeeded end: a failed or canceled job keeps every event, and so does every earlier attempt of one that succeeded', async () => {
    for (const status of ['failed', 'canceled'] as const) {
      const job = await ranJob();
      await store.update(job.id, { status: ['running'], attempt: 1 }, ended(status), 'worker crashed');
      expect(summary((await store.history(job.id)).events).map(([seq]) => seq), status).toEqual([1, 2, 3, 4, 5]);
    }
    // attempt 1 fails and is queued again; attempt 2 succeeds
    const job = await ranJob();
    await store.update(job.id, { status: ['running'], attempt: 1 }, { status: 'queued', stage: 'queued', agent: null, progress: null }, 'attempt 1 ended: worker_crashed: boom; queued again'); // 5
    await store.update(job.id, { status: ['queued'], attempt: 1 }, { status: 'running', stage: 'dispatched', attempt: 2, agent: 'agent-2' }, 'placed on agent-2'); // 6
    await store.update(job.id, { status: ['running'], attempt: 2 }, { stage: 'running' }, 'attempt 2 started on agent-2'); // 7
    await store.update(job.id, { status: ['running'], attempt: 2 }, {}, 'stage base: 30 steps'); // 8
    await store.update(job.id, { status: ['running'], attempt: 2 }, ended('succeeded')); // 9
    expect(summary((await store.history(job.id)).events)).toEqual([
      [1, 'queued', 0, 'submitted'],
      [2, 'running', 1, null],
      [3, 'running', 1, 'attempt 1 started on agent-1'],
      [4, 'running', 1, 'stage base: 30 steps'],
      [5, 'queued', 1, 'attempt 1 ended: worker_crashed: boom; queued again'],
      [6, 'running', 2, 'placed on agent-2'],
      [8, 'running', 2, 'stage base: 30 steps'],
      [9, 'succeeded', 2, null],
    ]);
  });

  it('a follower that saw events before the end gets exactly the ones after what it saw, none twice', async () => {
    const job = await ranJob();
    // followers that saw 0…4 events while it ran (a reconnect's Last-Event-ID)
    const seen = await Promise.all([0, 1, 2, 3, 4].map(async (n) => (await store.eventsAfter(job.id, 0)).slice(0, n)));
    expect(seen.map((s) => s.map((e) => e.seq))).toEqual([[], [1], [1, 2], [1, 2, 3], [1, 2, 3, 4]]);
    await store.update(job.id, { status: ['running'], attempt: 1 }, ended('succeeded'));
    for (const before of seen) {
      const after = await store.eventsAfter(job.id, before.length);
      const all = [...before, ...after].map((e) => e.seq);
      expect(new Set(all).size, `after ${before.length}`).toBe(all.length); // nothing twice
      expect(after.every((e) => e.seq > before.length)).toBe(true);
      expect(after.at(-1)).toMatchObject({ seq: 5, status: 'succeeded' });
    }
    // from before the end, what is left of what it had not seen: the events kept, in order
    expect((await store.eventsAfter(job.id, 1)).map((e) => e.seq)).toEqual([2, 4, 5]);
    expect((await store.eventsAfter(job.id, 2)).map((e) => e.seq)).toEqual([4, 5]);
    expect((await store.eventsAfter(job.id, 4)).map((e) => e.seq)).toEqual([5]);
    expect(await store.eventsAfter(job.id, 5)).toEqual([]);
  });

  it('keeps a non-terminal job without expiry and in the active set', async () => {
    const job = await runningJob();
    await store.update(job.id, { status: ['running'] }, { stage: 'running' });
    expect(await redis.ttl(keys.job(job.id))).toBe(-1);
    expect(await store.activeIds()).toEqual([job.id]);
  });

  it('records progress for the current attempt and refuses it for a stale one', async () => {
    const job = await runningJob();
    expect(await store.setProgress(job.id, 1, { stage: 'running', progress: { stage: 'running', step: 3, total: 30 } })).toEqual({ ok: true, cancelRequested: false });
    expect((await store.get(job.id))?.progress).toEqual({ stage: 'running', step: 3, total: 30 });

    await store.update(job.id, { status: ['running'], attempt: 1 }, { attempt: 2, agent: 'agent-2', progress: null });
    expect((await store.setProgress(job.id, 1, { progress: { stage: 'running', step: 29, total: 30 } })).ok).toBe(false);
    expect((await store.get(job.id))?.progress).toBeNull();
    expect((await store.history(job.id)).events).toHaveLength(3); // progress writes add no events
  });

  it('refuses progress once the job has finished', async () => {
    const job = await runningJob();
    await store.update(job.id, { status: ['running'] }, { status: 'canceled', stage: 'done' });
    expect((await store.setProgress(job.id, 1, { progress: { stage: 'running', step: 5, total: 30 } })).ok).toBe(false);
  });

  it('tells the agent writing progress that cancellation was requested', async () => {
    const job = await runningJob();
    await store.update(job.id, { status: ['running'] }, { cancel_requested: true });
    expect(await store.setProgress(job.id, 1, { progress: { stage: 'running', step: 4, total: 30 } })).toEqual({ ok: true, cancelRequested: true });
  });

  it('writes with one EVALSHA and no read: the script returns the record as written', async () => {
    const job = await runningJob();
    let after: StoredJob | null = null;
    const sent = await commandsDuring(async () => {
      after = await store.update(job.id, { status: ['running'], attempt: 1 }, { stage: 'running' });
    });
    expect(after).toEqual(await store.get(job.id));
    expect(sent).toEqual(['evalsha']); // its change hint (PUBLISH) is sent by the script
    // the end too, with its announcement and retention in the same step
    const ended = await commandsDuring(() => store.update(job.id, { status: ['running'], attempt: 1 }, { status: 'succeeded', stage: 'done' }));
    expect(ended).toEqual(['evalsha']);
    // compacted as it ended: the stage-only step went, the others keep their numbers
    expect((await store.history(job.id)).events.map((e) => [e.seq, e.status])).toEqual([[1, 'queued'], [2, 'running'], [4, 'succeeded']]);
    expect(await redis.zrange(keys.outbox(), 0, -1)).toEqual([`job:${job.id}`]); // its webhook listens for completed
  });

  it("claims a queued job for an agent and takes its intake entry out of intake in the same step; a refused claim leaves the entry", async () => {
    const intake = new Queue('intake', { connection: redis, prefix: keys.prefix });
    try {
      const job = newJob();
      await store.create(job);
      await intake.add('job', { job_id: job.id, attempt: 0, client: job.client }, { jobId: `${job.id}-q0`, priority: 5 });
      const other = newJob();
      await store.create(other);
      await intake.add('job', { job_id: other.id, attempt: 0, client: other.client }, { jobId: `${other.id}-q0`, priority: 5 });
      const key = (name: string) => intake.toKey(name);
      let claimed: unknown;
      const sent = await commandsDuring(async () => void (claimed = await store.claim(job.id, 0, 'agent-1', 'placed on agent-1', { entryId: `${job.id}-q0`, key })));
      expect(sent).toEqual(['evalsha']);
      expect(claimed).toEqual({ attempt: 1, group_id: null }); // what the dispatcher did not know, not the record
      expect(await store.get(job.id)).toMatchObject({ status: 'running', stage: 'dispatched', attempt: 1, agent: 'agent-1' });
      expect((await store.history(job.id)).events.at(-1)).toMatchObject({ status: 'running', attempt: 1, agent: 'agent-1', message: 'placed on agent-1' });
      expect(await intake.getJob(`${job.id}-q0`)).toBeUndefined();
      expect(await intake.getJobCounts('prioritized', 'waiting')).toEqual({ prioritized: 1, waiting: 0 });
      // a second claim of the same attempt is refused, and the other job's entry is untouched
      expect(await store.claim(job.id, 0, 'agent-2', 'x', { entryId: `${job.id}-q0`, key })).toBeNull();
      await store.update(other.id, { status: ['queued'] }, { status: 'canceled', stage: 'done' });
      expect(await store.claim(other.id, 0, 'agent-1', 'x', { entryId: `${other.id}-q0`, key })).toBeNull();
      expect(await intake.getJob(`${other.id}-q0`)).toBeTruthy();
    } finally {
      await intake.close();
    }
  });

  it("wakes the job's and its group's live followers on every accepted write, and nobody on a refused one", async () => {
    const sub = createRedis(REDIS_URL, 'job-store-test-sub');
    try {
      const job = newJob({ group_id: 'g7' });
      await store.create(job);
      const heard: string[] = [];
      const sentinel = `${keys.prefix}:sentinel`;
      let heardAll!: () => void;
      const all = new Promise<void>((r) => (heardAll = r));
      sub.on('message', (channel: string) => (channel === sentinel ? heardAll() : heard.push(channel.slice(keys.prefix.length + 1))));
      await sub.subscribe(keys.jobChanged(job.id), keys.groupChanged('g7'), sentinel);
      await store.update(job.id, { status: ['queued'] }, { status: 'running', stage: 'dispatched', attempt: 1, agent: 'a' });
      await store.setProgress(job.id, 1, { progress: { stage: 'running', step: 1, total: 2 } });
      await store.update(job.id, { status: ['queued'] }, { stage: 'running' }); // refused
      await store.update(job.id, { status: ['running'], attempt: 1 }, { status: 'succeeded', stage: 'done' });
      // Redis delivers a subscriber's messages in the order they were published: once the
      // sentinel is in, every hint the writes published is too
      await redis.publish(sentinel, '1');
      await all;
      expect(heard).toEqual([`changed:job:${job.id}`, 'changed:group:g7', `changed:job:${job.id}`, `changed:job:${job.id}`, 'changed:group:g7']);
    } finally {
      sub.disconnect();
    }
  });

  it('loads its scripts again when Redis lost them (SCRIPT FLUSH, a restart)', async () => {
    const job = await runningJob();
    await redis.script('FLUSH');
    expect(await store.update(job.id, { status: ['running'], attempt: 1 }, { stage: 'running' })).toMatchObject({ stage: 'running' });
    await redis.script('FLUSH');
    expect(await store.setProgress(job.id, 1, { progress: { stage: 'running', step: 2, total: 30 } })).toEqual({ ok: true, cancelRequested: false });
  });

  it('a write that keeps the status of an ended job is refused; the end of a group child counts on its group', async () => {
    const job = newJob({ group_id: 'g1', request: { ...newJob().request, webhook: undefined } as GenerationJob['request'] });
    await store.create(job);
    await redis.hset(keys.group('g1'), { record: '{}', done: '0', total: '1' });
    await store.update(job.id, { status: ['queued'] }, { status: 'running', stage: 'dispatched', attempt: 1, agent: 'a' });
    expect(await store.update(job.id, { status: ['running'] }, { status: 'failed', stage: 'done' }, 'boom')).toMatchObject({ status: 'failed' });
    expect(await store.update(job.id, {}, { stage: 'running' })).toBeNull();
    expect(await store.update(job.id, {}, { status: 'canceled' })).toBeNull();
    expect(await redis.hget(keys.group('g1'), 'done')).toBe('1');
    expect(await redis.zrange(keys.outbox(), 0, -1)).toEqual(['group:g1']); // no webhook: no job announcement
    expect((await store.history(job.id)).events.at(-1)).toMatchObject({ status: 'failed', stage: 'done', attempt: 1, agent: 'a', message: 'boom' });
  });

  it("tells where each job stands (status, attempt, agent) in one round trip, without reading the records", async () => {
    const a = newJob();
    const b = newJob();
    await store.create(a);
    await store.create(b);
    await store.update(b.id, { status: ['queued'] }, { status: 'running', stage: 'dispatched', agent: 'gpu-7', attempt: 1 });
    let standings: Awaited<ReturnType<JobStore['standings']>> = [];
    const sent = await commandsDuring(async () => void (standings = await store.standings([a.id, b.id, 'gone'])));
    expect(sent).toEqual(['hmget', 'hmget', 'hmget']);
    expect(standings).toEqual([{ id: a.id, status: 'queued', attempt: 0, agent: null }, { id: b.id, status: 'running', attempt: 1, agent: 'gpu-7' }, null]);
  });
});
