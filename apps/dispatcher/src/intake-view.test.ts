import { randomUUID } from 'node:crypto';
import { type GenerationJob, ResolvedGenerationRequest } from '@kiln/contracts';
import { createRedis, type IntakeData, intakeJobId, JobStore, Keys, newJobFields, QUEUES, type Redis } from '@kiln/runtime';
import { Queue } from 'bullmq';
import { afterAll, afterEach, beforeAll, beforeEach, expect, it } from 'vitest';
import { IntakeView } from './intake-view.js';

const REDIS_URL = process.env.REDIS_URL ?? 'redis://127.0.0.1:6379';
let redis: Redis;
let keys: Keys;
let store: JobStore;
let intake: Queue<IntakeData>;

beforeAll(() => {
  redis = createRedis(REDIS_URL, 'intake-view-test');
});
afterAll(async () => {
  await redis.quit();
});
beforeEach(() => {
  keys = new Keys(`kiln-test-${randomUUID()}`);
  store = new JobStore(redis, keys, 3_600);
  intake = new Queue<IntakeData>(QUEUES.intake, { connection: redis, prefix: keys.prefix });
});
afterEach(async () => {
  await intake.close();
  const left = await redis.keys(`${keys.prefix}:*`);
  if (left.length) await redis.del(...left);
});

async function queued(priority: number, steps = 30): Promise<GenerationJob> {
  const job: GenerationJob = {
    ...newJobFields(randomUUID(), 'client-a', 'normal'),
    kind: 'generation',
    request: ResolvedGenerationRequest.parse({
      model: { base: 'stabilityai/sdxl-turbo' },
      conditioning: { prompt: 'a kiln' },
      scheduler: { steps },
      hyperparameters: { seed: 1, width: 512, height: 512, num_images: 2 },
    }),
  };
  await store.create(job);
  await intake.add('job', { job_id: job.id, attempt: 0, client: job.client }, { jobId: intakeJobId(job.id, 0), priority });
  return job;
}

/** The commands sent on the test's connection while `fn` runs, lower case. */
async function commandsDuring(fn: () => Promise<unknown>): Promise<string[]> {
  const names: string[] = [];
  const send = redis.sendCommand.bind(redis);
  redis.sendCommand = ((cmd: Parameters<typeof send>[0]) => {
    names.push(String(cmd.name).toLowerCase());
    return send(cmd);
  }) as typeof redis.sendCommand;
  try {
    await fn();
  } finally {
    redis.sendCommand = send;
  }
  return names;
}

it('reads a waiting job once, then only the ids of the window; drops what left intake and reports stale entries', async () => {
  const view = new IntakeView(intake, redis, keys, 100);
  const low = await queued(10);
  const high = await queued(1, 4);
  const first = await view.refresh();
  expect(first.waiting.map((w) => w.job.id)).toEqual([high.id, low.id]); // priority order
  expect(first.waiting[0]).toMatchObject({ rank: 1, demand: { model: 'stabilityai/sdxl-turbo', adapters: [] }, work: { key: 'generation stabilityai/sdxl-turbo', steps: 4, pixels: 512 * 512 * 2 } });

  // nothing changed: no command at all; told intake changed with nothing new: one id read
  expect(await commandsDuring(() => view.refresh())).toEqual([]);
  view.changed();
  const sent = await commandsDuring(() => view.refresh());
  expect(sent.filter((c) => c !== 'evalsha' && c !== 'eval')).toEqual([]);
  expect(sent).toHaveLength(1);

  // an entry that left intake leaves the view; a new one is read (entry and record, one round trip)
  await intake.remove(intakeJobId(low.id, 0));
  const next = await queued(5);
  view.changed();
  const arrivals = await commandsDuring(async () => expect((await view.refresh()).waiting.map((w) => w.job.id)).toEqual([high.id, next.id]));
  expect(arrivals.filter((c) => c === 'hmget')).toHaveLength(2);
  expect(arrivals).not.toContain('hgetall');
  expect(view.size).toBe(2);

  // an entry whose job moved on (re-queued under another attempt) is stale
  await store.update(next.id, { status: ['queued'] }, { attempt: 3 });
  const again = new IntakeView(intake, redis, keys, 100);
  expect(await again.refresh()).toMatchObject({ waiting: [{ job: { id: high.id } }], stale: [intakeJobId(next.id, 0)] });
});

it('takes entries beyond a full window into view as placed ones leave it, without being told', async () => {
  const view = new IntakeView(intake, redis, keys, 2);
  const jobs = [await queued(5), await queued(5), await queued(5)];
  expect((await view.refresh()).waiting.map((w) => w.job.id)).toEqual([jobs[0]!.id, jobs[1]!.id]);
  await intake.remove(intakeJobId(jobs[0]!.id, 0));
  view.forget(intakeJobId(jobs[0]!.id, 0));
  expect((await view.refresh()).waiting.map((w) => w.job.id)).toEqual([jobs[1]!.id, jobs[2]!.id]);
});
