import { randomUUID } from 'node:crypto';
import { type ErrorCode, type GenerationJob, ResolvedGenerationRequest, type SelfTestJob, type StoredJob } from '@kiln/contracts';
import { Queue } from 'bullmq';
import { afterAll, afterEach, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { KilnError } from './errors.js';
import { GroupStore } from './groups.js';
import { JobStore } from './job-store.js';
import { type IntakeData, Jobs, newJobFields } from './jobs.js';
import { Keys, QUEUES } from './keys.js';
import { createRedis, type Redis } from './redis.js';

/**
 * What a failed attempt costs (Jobs.retryOrFail): the job's own failures spend MAX_ATTEMPTS,
 * counted since its last progress; infrastructure failures spend nothing until
 * INFRA_RETRY_DEADLINE_S; anything else fails the job at once.
 */

const REDIS_URL = process.env.REDIS_URL ?? 'redis://127.0.0.1:6379';
const MAX_ATTEMPTS = 3;
const DEADLINE_S = 60;

let redis: Redis;
let keys: Keys;
let store: JobStore;
let intake: Queue<IntakeData>;
let jobs: Jobs;

beforeAll(() => {
  redis = createRedis(REDIS_URL, 'retry-policy-test');
});
afterAll(async () => {
  await redis.quit();
});
beforeEach(() => {
  keys = new Keys(`kiln-test-${randomUUID()}`);
  store = new JobStore(redis, keys, 3_600);
  intake = new Queue<IntakeData>(QUEUES.intake, { connection: redis, prefix: keys.prefix });
  jobs = new Jobs(store, intake, redis, keys, null, MAX_ATTEMPTS, new GroupStore(redis, keys, 3_600), DEADLINE_S);
});
afterEach(async () => {
  await intake.close();
  const left = await redis.keys(`${keys.prefix}:*`);
  if (left.length) await redis.del(...left);
});

async function submitted(): Promise<GenerationJob> {
  const job: GenerationJob = {
    ...newJobFields(randomUUID(), 'client-a', 'normal'),
    kind: 'generation',
    request: ResolvedGenerationRequest.parse({ model: { base: 'stabilityai/stable-diffusion-xl-base-1.0' }, conditioning: { prompt: 'a kiln' }, hyperparameters: { seed: 1 } }),
  };
  await store.create(job);
  return job;
}

/** Places the job as the dispatcher does (attempt + 1), then ends that attempt with `code`. */
async function failAttempt(id: string, code: ErrorCode, opts: { progressed?: boolean } = {}): Promise<StoredJob> {
  const queued = (await store.get(id))!;
  const placed = await store.update(id, { status: ['queued'], attempt: queued.attempt }, { status: 'running', stage: 'running', agent: 'agent-1', attempt: queued.attempt + 1 });
  expect(placed).not.toBeNull();
  await jobs.retryOrFail(placed!, new KilnError(code, `${code} on purpose`), placed!.attempt, opts);
  return (await store.get(id))!;
}

describe('what a failed attempt costs', () => {
  it("the job's own failures fail it after MAX_ATTEMPTS, with the last cause", async () => {
    const { id } = await submitted();
    expect(await failAttempt(id, 'worker_crashed')).toMatchObject({ status: 'queued', charged_attempts: 1 });
    expect(await failAttempt(id, 'out_of_memory')).toMatchObject({ status: 'queued', charged_attempts: 2 });
    const failed = await failAttempt(id, 'worker_crashed');
    expect(failed).toMatchObject({ status: 'failed', attempt: 3, error: { code: 'max_attempts_exceeded', retryable: false } });
    expect(failed.error?.message).toMatch(/gave up after 3 attempts.*worker_crashed/);
  });

  it('infrastructure failures spend no attempt: many in a row, then the job still gets all of its own', async () => {
    const { id } = await submitted();
    for (const code of ['storage_failed', 'agent_lost', 'unavailable', 'storage_failed', 'agent_lost', 'storage_failed'] as const) {
      expect(await failAttempt(id, code)).toMatchObject({ status: 'queued', charged_attempts: 0 });
    }
    const job = await store.get(id);
    expect(job?.attempt).toBe(6);
    expect(job?.infra_since).toEqual(expect.any(String));
    const { events } = await store.history(id);
    expect(events.at(-1)?.message).toMatch(/storage_failed.*no attempt spent/);
    // the job's own failures still get their full budget
    expect(await failAttempt(id, 'worker_crashed')).toMatchObject({ status: 'queued', charged_attempts: 1, infra_since: null });
    expect(await failAttempt(id, 'worker_crashed')).toMatchObject({ status: 'queued', charged_attempts: 2 });
    expect(await failAttempt(id, 'worker_crashed')).toMatchObject({ status: 'failed', error: { code: 'max_attempts_exceeded' } });
  });

  it('infrastructure failures are bounded by INFRA_RETRY_DEADLINE_S from the first of their run, not by a count', async () => {
    const { id } = await submitted();
    expect(await failAttempt(id, 'storage_failed')).toMatchObject({ status: 'queued' });
    const since = (await store.get(id))!.infra_since!;
    // still within the deadline: the start of the run is kept, not moved
    expect(await failAttempt(id, 'storage_failed')).toMatchObject({ status: 'queued', infra_since: since });
    // the run began longer ago than the deadline
    await store.update(id, {}, { infra_since: new Date(Date.now() - (DEADLINE_S + 1) * 1000).toISOString() });
    const failed = await failAttempt(id, 'storage_failed');
    expect(failed).toMatchObject({ status: 'failed', error: { code: 'storage_failed', retryable: false } });
    expect(failed.error?.message).toMatch(/gave up after 6\d s of infrastructure failures \(INFRA_RETRY_DEADLINE_S=60\)/);
  });

  it('an attempt that made progress spends nothing: the budget counts consecutive attempts without progress', async () => {
    const { id } = await submitted();
    expect(await failAttempt(id, 'worker_crashed')).toMatchObject({ charged_attempts: 1 });
    expect(await failAttempt(id, 'worker_crashed')).toMatchObject({ charged_attempts: 2 });
    // ten attempts that each advanced the checkpoint before the worker died: never fails
    for (let i = 0; i < 10; i++) expect(await failAttempt(id, 'worker_crashed', { progressed: true })).toMatchObject({ status: 'queued', charged_attempts: 0 });
    // progress also restarts a run of infrastructure trouble
    await store.update(id, {}, { infra_since: new Date(Date.now() - (DEADLINE_S + 1) * 1000).toISOString() });
    expect(await failAttempt(id, 'agent_lost', { progressed: true })).toMatchObject({ status: 'queued' });
    expect(Date.now() - Date.parse((await store.get(id))!.infra_since!)).toBeLessThan(5_000);
    expect(await failAttempt(id, 'worker_crashed')).toMatchObject({ status: 'queued', charged_attempts: 1 });
  });

  it('a failure no retry can help fails the job at once with its own code', async () => {
    const { id } = await submitted();
    expect(await failAttempt(id, 'invalid_request')).toMatchObject({ status: 'failed', attempt: 1, error: { code: 'invalid_request', retryable: false } });
  });

  it('a task that belongs to its agent (self-test, cache) is never retried or handed back elsewhere: it fails, agent_lost', async () => {
    const task: SelfTestJob = {
      ...newJobFields(randomUUID(), 'ops', 'high'),
      kind: 'self_test',
      status: 'running',
      stage: 'dispatched',
      attempt: 1,
      agent: 'agent-1',
      request: { checks: ['environment'], benchmark: {}, timeout_s: 60, target_agent: 'agent-1' },
      self_test: null,
    };
    await store.create(task);
    // an agent shutting down hands back what it holds: this one cannot run anywhere else
    await jobs.handBack(task, 1, 'agent agent-1 is shutting down');
    expect(await store.get(task.id)).toMatchObject({ status: 'failed', error: { code: 'agent_lost', message: 'agent agent-1 is shutting down' } });
    expect(await intake.count()).toBe(0);
    // and an infrastructure failure that would re-queue a generation fails it too
    const other: SelfTestJob = { ...task, id: randomUUID() };
    await store.create(other);
    await jobs.retryOrFail(other, new KilnError('agent_lost', 'agent agent-1 stopped heartbeating'), 1);
    expect(await store.get(other.id)).toMatchObject({ status: 'failed', error: { code: 'agent_lost' } });
  });

  it('a hand-back spends nothing, and the next placement is a new attempt with its own number (never the handed-back one)', async () => {
    const { id } = await submitted();
    const placed = await store.update(id, { status: ['queued'], attempt: 0 }, { status: 'running', stage: 'dispatched', agent: 'agent-1', attempt: 1 });
    const back = await jobs.handBack(placed!, 1, 'agent agent-1 is shutting down');
    expect(back).toMatchObject({ status: 'queued', attempt: 1 });
    expect(back!.charged_attempts ?? 0).toBe(0);
    // queued for a placement as attempt 2: the agent's entry for it (`<id>-a2`) cannot collide with attempt 1's
    const entries = await intake.getJobs(['prioritized', 'waiting']);
    expect(entries.map((e) => e.data)).toEqual([expect.objectContaining({ job_id: id, attempt: 1 })]);
    // and the handed-back attempt's late writes are refused once it is placed again
    await store.update(id, { status: ['queued'], attempt: 1 }, { status: 'running', stage: 'dispatched', agent: 'agent-1', attempt: 2 });
    expect(await store.update(id, { status: ['running'], attempt: 1 }, { status: 'succeeded' })).toBeNull();
    // its own failures still fail it only after MAX_ATTEMPTS
    expect((await store.get(id))!.charged_attempts ?? 0).toBe(0);
  });

  it('a record written before these fields existed is read and retried as having spent nothing', async () => {
    const { id } = await submitted();
    await redis.hdel(keys.job(id), 'charged_attempts', 'infra_since');
    expect(await failAttempt(id, 'worker_crashed')).toMatchObject({ status: 'queued', charged_attempts: 1 });
  });
});
