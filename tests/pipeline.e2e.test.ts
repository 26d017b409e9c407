import { createHash } from 'node:crypto';
import { Client } from 'minio';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { basicRequest, Farm, type GenRecord, sleep } from './support/farm.js';

/**
 * The pipelined agent (PIPELINE_DEPTH=2): it holds the job on its GPU and the next one, which
 * prepares meanwhile and reaches the worker the moment the first one's result is in hand, while
 * the first one uploads. A cancel, a worker crash, a drain or a take-over in any of these stages
 * reaches the job it is meant for and no other. One agent, so both jobs are on it.
 */

/** `steps` 400 ms steps at 1024²: time to act while it runs */
const slow = (seed: number, steps = 6) => basicRequest({ scheduler: { type: 'EulerDiscreteScheduler', steps }, hyperparameters: { seed, width: 1024, height: 1024 } });
const sha256 = (b: Buffer) => createHash('sha256').update(b).digest('hex');
const messages = (job: { events: { message?: string }[] }) => job.events.map((e) => e.message ?? '').join('\n');
const onWorker = (j: GenRecord) => j.stage === 'running' && (j.progress?.step ?? 0) >= 1;
/** taken by the agent (`started` written) and not on the worker: preparing or waiting for the GPU */
const held = (j: GenRecord) => j.status === 'running' && j.started_at !== null && j.progress === null;

function s3Of(farm: Farm): Client {
  return new Client({ endPoint: '127.0.0.1', port: Number(new URL(farm.s3.endpoint).port), useSSL: false, accessKey: farm.s3.accessKey, secretKey: farm.s3.secretKey, pathStyle: true, region: 'us-east-1' });
}

/** Every object under the job's outputs is one the record names, with the bytes it says. */
async function expectOwnOutputs(farm: Farm, job: GenRecord): Promise<void> {
  const listed: string[] = [];
  for await (const o of s3Of(farm).listObjectsV2('kiln-test', `outputs/${job.id}/`, true) as AsyncIterable<{ name: string }>) listed.push(o.name);
  expect(listed.sort()).toEqual(job.outputs.map((o) => o.key).sort());
  for (const o of job.outputs) {
    const res = await fetch(o.url);
    expect(sha256(Buffer.from(await res.arrayBuffer()))).toBe(o.sha256);
    expect(res.headers.get('x-amz-meta-attempt')).toBe(String(job.attempt));
    expect(res.headers.get('x-amz-meta-seed')).toBe(String(o.seed));
  }
}

describe('the pipelined agent: two jobs held, cancels and crashes in each stage', () => {
  const farm = new Farm({ agents: 1, env: { KILN_SYNTHETIC_STEP_MS: '400', TRANSFER_RETRY_MS: '60000', MAX_ATTEMPTS: '3' } });
  beforeAll(() => farm.start());
  afterAll(async () => {
    await farm.s3?.resume();
    await farm.close();
  });

  const workerPid = async () => (await farm.agents()).find((a) => a.agent_id === 'agent-0')!.worker.pid!;

  it('the next job starts while the first runs, and reaches the worker as it ends; outputs never mix', async () => {
    const seeds = [11, 21, 31, 41];
    const jobs = [];
    for (const s of seeds) jobs.push(await farm.submit(basicRequest({ scheduler: { type: 'EulerDiscreteScheduler', steps: 3 }, hyperparameters: { seed: s, width: 512, height: 512, num_images: 2 } })));
    const done = await Promise.all(jobs.map((j) => farm.waitForDone(j.id, 60_000)));
    expect(done.map((j) => j.status)).toEqual(['succeeded', 'succeeded', 'succeeded', 'succeeded']);
    // pipelined: the second job was taken (started) while the first one ran, not after it ended
    const [first, second] = [...done].sort((a, b) => Date.parse(a.started_at!) - Date.parse(b.started_at!));
    expect(Date.parse(second!.started_at!)).toBeLessThan(Date.parse(first!.finished_at!));
    // the GPU takes them in the order they were placed: no job overtakes the one ahead of it
    expect([...done].sort((a, b) => Date.parse(a.finished_at!) - Date.parse(b.finished_at!)).map((j) => j.id)).toEqual(jobs.map((j) => j.id));
    // each job has its own images: its seeds, its bytes, under its own keys
    for (const j of done) {
      expect(j.outputs.map((o) => o.seed)).toEqual([j.request.hyperparameters.seed, j.request.hyperparameters.seed + 1]);
      await expectOwnOutputs(farm, j);
    }
    expect(new Set(done.flatMap((j) => j.outputs.map((o) => o.sha256))).size).toBe(8);
  });

  it('a cancel of the next job while it waits for the GPU ends it at once; the running one is untouched', async () => {
    const a = await farm.submit(slow(21));
    const b = await farm.submit(slow(22));
    await farm.waitForJob(a.id, onWorker);
    await farm.waitForJob(b.id, held);
    expect((await farm.request('DELETE', `/v1/jobs/${b.id}`)).status).toBe(202);
    const canceled = await farm.waitForDone(b.id, 10_000);
    expect(canceled.status).toBe('canceled');
    expect(canceled.timings.inference_ms ?? null).toBeNull(); // it never reached the worker
    const first = await farm.waitForDone(a.id, 30_000);
    expect(first.status).toBe('succeeded');
    expect(first.attempt).toBe(1);
    // canceled well before the job ahead of it ended, not when its turn came
    expect(Date.parse(canceled.finished_at!)).toBeLessThan(Date.parse(first.finished_at!));
  });

  it('a cancel of the running job stops it; the next one runs at once and succeeds', async () => {
    const a = await farm.submit(slow(31, 20));
    const b = await farm.submit(slow(32, 3));
    await farm.waitForJob(a.id, onWorker);
    await farm.waitForJob(b.id, held);
    expect((await farm.request('DELETE', `/v1/jobs/${a.id}`)).status).toBe(202);
    const [ca, cb] = [await farm.waitForDone(a.id, 10_000), await farm.waitForDone(b.id, 30_000)];
    expect(ca.status).toBe('canceled');
    expect(cb.status).toBe('succeeded');
    expect(cb.attempt).toBe(1);
    await expectOwnOutputs(farm, cb);
  });

  it('a cancel of the previous job while it uploads ends it; the job on the GPU goes on and succeeds', async () => {
    const a = await farm.submit(slow(41, 3));
    const b = await farm.submit(slow(42, 8));
    await farm.waitForJob(a.id, onWorker);
    await farm.s3.stop();
    try {
      await farm.waitForJob(a.id, (j) => j.stage === 'uploading', 30_000);
      await farm.waitForJob(b.id, onWorker, 10_000); // b reached the GPU while a waits for storage
      expect((await farm.request('DELETE', `/v1/jobs/${a.id}`)).status).toBe(202);
      const ca = await farm.waitForDone(a.id, 5_000);
      expect(ca.status).toBe('canceled');
      expect((await farm.job(b.id)).status).toBe('running');
    } finally {
      await farm.s3.resume();
    }
    const cb = await farm.waitForDone(b.id, 60_000);
    expect(cb.status, JSON.stringify(cb.error)).toBe('succeeded');
    expect(cb.attempt).toBe(1);
    await expectOwnOutputs(farm, cb);
  });

  it('a worker crash while one job runs and the next waits: the running one is retried, the next is not charged', async () => {
    const a = await farm.submit(slow(51));
    const b = await farm.submit(slow(52, 3));
    await farm.waitForJob(a.id, onWorker);
    await farm.waitForJob(b.id, held);
    const pid = await workerPid();
    process.kill(pid, 'SIGKILL');
    const [da, db] = await Promise.all([farm.waitForDone(a.id, 60_000), farm.waitForDone(b.id, 60_000)]);
    expect(da.status).toBe('succeeded');
    expect(da.attempt).toBe(2);
    expect(messages(da)).toMatch(/worker_crashed/);
    expect(db.status).toBe('succeeded');
    expect(db.attempt).toBe(1);
    expect(messages(db)).not.toMatch(/worker_crashed/);
    await expectOwnOutputs(farm, da);
    await expectOwnOutputs(farm, db);
    expect(await workerPid()).not.toBe(pid);
  });

  it('a worker crash while the previous job uploads: that one still succeeds on its attempt, the one on the GPU is retried', async () => {
    const a = await farm.submit(slow(61, 3));
    const b = await farm.submit(slow(62, 10));
    await farm.waitForJob(a.id, onWorker);
    await farm.s3.stop();
    try {
      await farm.waitForJob(a.id, (j) => j.stage === 'uploading', 30_000);
      await farm.waitForJob(b.id, onWorker, 10_000);
      process.kill(await workerPid(), 'SIGKILL');
      await farm.waitForJob(b.id, (j) => j.attempt === 2 || j.status !== 'running', 20_000);
      expect((await farm.job(a.id)).stage).toBe('uploading');
    } finally {
      await farm.s3.resume();
    }
    const [da, db] = await Promise.all([farm.waitForDone(a.id, 60_000), farm.waitForDone(b.id, 60_000)]);
    expect(da.status, JSON.stringify(da.error)).toBe('succeeded');
    expect(da.attempt).toBe(1);
    expect(db.status, JSON.stringify(db.error)).toBe('succeeded');
    expect(db.attempt).toBe(2);
    expect(messages(db)).toMatch(/worker_crashed/);
    await expectOwnOutputs(farm, da);
    await expectOwnOutputs(farm, db);
  });
});

describe('the pipelined agent stopped or cut off with two jobs held', () => {
  const farm = new Farm({ agents: 1, env: { KILN_SYNTHETIC_STEP_MS: '400', SHUTDOWN_TIMEOUT_MS: '15000' } });
  beforeAll(() => farm.start());
  afterAll(async () => {
    for (const p of farm.procs.values()) if (p.pid) process.kill(p.pid, 'SIGCONT');
    await farm.s3?.resume();
    await farm.close();
  });

  it('SIGTERM: the job not yet on the GPU is handed back at once, the running one finishes here', async () => {
    const a = await farm.submit(slow(71, 8));
    const b = await farm.submit(slow(72, 3));
    await farm.waitForJob(a.id, onWorker);
    await farm.waitForJob(b.id, held);
    const proc = farm.procs.get('agent-0')!;
    proc.kill('SIGTERM');
    // handed back before the running job ended
    const back = await farm.waitForJob(b.id, (j) => j.status === 'queued' || /handed back/.test(messages(j)), 5_000);
    expect(messages(back)).toMatch(/handed back: agent agent-0/);
    expect((await farm.job(a.id)).status).toBe('running');
    expect((await proc).exitCode).toBe(0);
    const da = await farm.job(a.id);
    expect(da.status).toBe('succeeded');
    expect(da.agent).toBe('agent-0');
    farm.startAgent(0);
    const db = await farm.waitForDone(b.id, 60_000);
    expect(db.status).toBe('succeeded');
    // a hand-back spends nothing; the next placement is a new attempt with its own number
    expect(db.attempt, messages(db)).toBe(2);
    expect(db.charged_attempts ?? 0).toBe(0);
    await expectOwnOutputs(farm, da);
    await expectOwnOutputs(farm, db);
    await farm.waitForAgents(1);
  }, 90_000);

  it('taken back while it uploads (agent cut off past its TTL): its late result is refused and leaves nothing behind', async () => {
    const a = await farm.submit(slow(81, 3));
    const b = await farm.submit(slow(82, 6));
    await farm.waitForJob(a.id, onWorker);
    await farm.s3.stop();
    const pid = farm.procs.get('agent-0')!.pid!;
    let frozen = false;
    try {
      await farm.waitForJob(a.id, (j) => j.stage === 'uploading', 30_000);
      await farm.waitForJob(b.id, onWorker, 10_000);
      process.kill(pid, 'SIGSTOP');
      frozen = true;
      await farm.s3.resume();
      // the dispatcher gives both jobs to a fresh agent
      farm.startAgent(1);
      const [da, db] = await Promise.all([farm.waitForDone(a.id, 60_000), farm.waitForDone(b.id, 60_000)]);
      expect([da.status, db.status]).toEqual(['succeeded', 'succeeded']);
      expect([da.agent, db.agent]).toEqual(['agent-1', 'agent-1']);
      expect([da.attempt, db.attempt]).toEqual([2, 2]);
    } finally {
      await farm.s3.resume();
      if (frozen) process.kill(pid, 'SIGCONT');
    }
    // the woken agent finishes its stale uploads and results: every write refused
    await farm.waitFor(async () => (await farm.agents()).some((x) => x.agent_id === 'agent-0' && x.state === 'ready' && x.current_job === null), 30_000, 'the cut-off agent back and idle');
    await sleep(1_000);
    for (const id of [a.id, b.id]) {
      const job = await farm.job(id);
      expect(job.status).toBe('succeeded');
      expect(job.attempt).toBe(2);
      expect(job.outputs.every((o) => o.key.startsWith(`outputs/${id}/a2-`))).toBe(true);
      await expectOwnOutputs(farm, job);
    }
  }, 120_000);
});
