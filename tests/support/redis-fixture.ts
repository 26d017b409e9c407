import { randomUUID } from 'node:crypto';
import { type GenerationJob, ResolvedGenerationRequest } from '@kiln/contracts';
import { createRedis, type IntakeData, intakeJobId, JobStore, Keys, newJobFields, QUEUES, type Redis } from '@kiln/runtime';
import { Queue } from 'bullmq';
import { afterAll, afterEach, beforeAll, beforeEach } from 'vitest';

const REDIS_URL = process.env.REDIS_URL ?? 'redis://127.0.0.1:6379';

/** The commands `redis` sends while `fn` runs, lower case (what a code path costs in Redis). */
export async function commandsDuring(redis: Redis, fn: () => Promise<unknown>): Promise<string[]> {
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

/**
 * A unit test's Redis (the shared server, a fresh key prefix per test, everything under it
 * deleted after), with a job store and the intake queue under that prefix. Read the fields
 * inside tests: they are replaced before each one.
 */
export function intakeFixture(name: string) {
  const f = {} as { redis: Redis; keys: Keys; store: JobStore; intake: Queue<IntakeData> };
  beforeAll(() => {
    f.redis = createRedis(REDIS_URL, name);
  });
  afterAll(async () => {
    await f.redis.quit();
  });
  beforeEach(() => {
    f.keys = new Keys(`kiln-test-${randomUUID()}`);
    f.store = new JobStore(f.redis, f.keys, 3_600);
    f.intake = new Queue<IntakeData>(QUEUES.intake, { connection: f.redis, prefix: f.keys.prefix });
  });
  afterEach(async () => {
    await f.intake.close();
    const left = await f.redis.keys(`${f.keys.prefix}:*`);
    if (left.length) await f.redis.del(...left);
  });
  return f;
}

/** A generation job stored and waiting in intake at `priority`, as the API leaves one. */
export async function queuedJob(f: ReturnType<typeof intakeFixture>, priority: number, steps = 30): Promise<GenerationJob> {
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
  await f.store.create(job);
  await f.intake.add('job', { job_id: job.id, attempt: 0, client: job.client }, { jobId: intakeJobId(job.id, 0), priority });
  return job;
}
