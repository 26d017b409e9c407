import { type ChildProcess, spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Redis } from 'ioredis';
import { Client } from 'minio';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ENTRY } from '../scripts/farm-lib.js';
import { basicRequest, Farm, sleep } from './support/farm.js';
import { gradientPng, shapesPng } from './support/images.js';

/**
 * Ordinary outages cost a job nothing: storage going away for a while, an agent restarted
 * under the same id, an agent frozen past its TTL, Redis restarted. Every piece is real; the
 * Redis restarted here is a server of this file's own on its own loopback port.
 */

const BASE = 'stabilityai/stable-diffusion-xl-base-1.0';
const TURBO = 'stabilityai/sdxl-turbo';
/** ten 400 ms steps at 1024²: time to break things while it runs */
const slow = (seed: number) => basicRequest({ scheduler: { type: 'EulerDiscreteScheduler', steps: 10 }, hyperparameters: { seed, width: 1024, height: 1024 } });
const sha256 = (b: Buffer) => createHash('sha256').update(b).digest('hex');
const messages = (job: { events: { message?: string }[] }) => job.events.map((e) => e.message ?? '').join('\n');

/** The log lines of one process of the farm at error level or worse (pino: 50+), and the unhandled. */
function errorsIn(farm: Farm, name: string): string[] {
  return readFileSync(join(farm.logDir, `${name}.log`), 'utf8')
    .split('\n')
    .filter((l) => /"level":(5|6)\d/.test(l) || /unhandled|Unhandled error event|subscriber mode/i.test(l));
}

describe('storage outages', () => {
  // MAX_ATTEMPTS=1: any attempt charged to a job fails it, so a job that survives an outage
  // here was not charged for it
  const farm = new Farm({
    agents: 1,
    env: { KILN_SYNTHETIC_STEP_MS: '400', KILN_SYNTHETIC_TRAIN_STEP_MS: '6400', TRANSFER_RETRY_MS: '4000', INFRA_RETRY_DEADLINE_S: '120', MAX_ATTEMPTS: '1' },
  });
  let s3: Client;
  beforeAll(async () => {
    await farm.start();
    s3 = new Client({ endPoint: '127.0.0.1', port: Number(new URL(farm.s3.endpoint).port), useSSL: false, accessKey: farm.s3.accessKey, secretKey: farm.s3.secretKey, pathStyle: true, region: 'us-east-1' });
    for (let i = 0; i < 3; i++) {
      const img = i % 2 ? await shapesPng(128, 128) : await gradientPng(128, 128);
      await s3.putObject('kiln-test', `datasets/outage/${i}.png`, img, img.length, { 'Content-Type': 'image/png' });
      const caption = Buffer.from(`a kiln in the rain, ${i}`);
      await s3.putObject('kiln-test', `datasets/outage/${i}.txt`, caption, caption.length, { 'Content-Type': 'text/plain' });
    }
  });
  afterAll(async () => {
    await farm.s3?.resume();
    await farm.close();
  });

  /** Stops S3 once the job is uploading its outputs, for `downMs` (less if the job ends first). */
  async function outageDuringUpload(id: string, downMs: number): Promise<void> {
    await farm.waitForJob(id, (j) => j.stage === 'running' && (j.progress?.step ?? 0) >= 1);
    await farm.s3.stop();
    try {
      const at = await farm.waitForJob(id, (j) => j.stage === 'uploading' || j.stage === 'done', 30_000);
      if (at.stage === 'uploading') await sleep(downMs);
    } finally {
      await farm.s3.resume();
    }
  }

  async function expectOutputsMatchRecord(id: string): Promise<void> {
    const job = await farm.job(id);
    for (const o of job.outputs) {
      const res = await fetch(o.url);
      expect(res.status).toBe(200);
      expect(sha256(Buffer.from(await res.arrayBuffer()))).toBe(o.sha256);
    }
  }

  it('S3 down for a moment while a job uploads: retried in place, the job succeeds on its first attempt', async () => {
    const agentPid = farm.procs.get('agent-0')!.pid;
    const { id } = await farm.submit(slow(1));
    await outageDuringUpload(id, 1_500);
    const job = await farm.waitForDone(id, 60_000);
    expect(job.status, JSON.stringify(job.error)).toBe('succeeded');
    expect(job.attempt).toBe(1);
    expect(messages(job)).not.toMatch(/storage_failed/);
    await expectOutputsMatchRecord(id);
    expect(farm.procs.get('agent-0')!.pid).toBe(agentPid);
  });

  it('S3 down longer than the in-place retries: the job is placed again without spending an attempt, and succeeds', async () => {
    const { id } = await farm.submit(slow(2));
    await outageDuringUpload(id, 8_000);
    const job = await farm.waitForDone(id, 90_000);
    expect(job.status, JSON.stringify(job.error)).toBe('succeeded');
    expect(job.attempt).toBeGreaterThanOrEqual(2);
    expect(job.charged_attempts).toBe(0);
    expect(messages(job)).toMatch(/storage_failed: upload of .* failed after \d+ tries.*no attempt spent/);
    await expectOutputsMatchRecord(id);
  });

  it('a cancel while the job waits for S3 to upload its outputs ends it at once', async () => {
    const { id } = await farm.submit(slow(7));
    await farm.waitForJob(id, (j) => j.stage === 'running' && (j.progress?.step ?? 0) >= 1);
    await farm.s3.stop();
    try {
      await farm.waitForJob(id, (j) => j.stage === 'uploading', 30_000);
      await sleep(2_200); // inside a backoff wait of up to 2 s
      const asked = Date.now();
      expect((await farm.request('DELETE', `/v1/jobs/${id}`)).status).toBe(202);
      const job = await farm.waitForDone(id, 10_000);
      expect(job.status).toBe('canceled');
      expect(Date.now() - asked).toBeLessThan(1_000);
    } finally {
      await farm.s3.resume();
    }
  });

  it('S3 down across a training checkpoint: the agent lives on, a later checkpoint is saved and the training succeeds on its first attempt', async () => {
    const agentPid = farm.procs.get('agent-0')!.pid;
    const res = await farm.request('POST', '/v1/trainings', {
      base_model: BASE,
      dataset: { s3_prefix: 'datasets/outage/' },
      output: { name: 'outage/ckpt' },
      hyperparameters: { rank: 4, steps: 30, checkpoint_every: 2, resolution: 256, seed: 5 },
    });
    expect(res.status).toBe(202);
    const id = res.body.id;
    let job: any;
    await farm.waitFor(async () => ((job = (await farm.get(`/v1/trainings/${id}`)).body).training.last_checkpoint?.step ?? 0) >= 2, 60_000, 'a checkpoint');
    // down for longer than TRANSFER_RETRY_MS: at least one checkpoint upload gives up
    await farm.s3.stop();
    await sleep(7_000);
    await farm.s3.resume();
    await farm.waitFor(async () => ['succeeded', 'failed', 'canceled'].includes((job = (await farm.get(`/v1/trainings/${id}`)).body).status), 90_000, 'training done');
    expect(job.status, JSON.stringify(job.error)).toBe('succeeded');
    expect(job.attempt).toBe(1);
    expect(job.training.last_checkpoint.step).toBeGreaterThan(2);
    expect(farm.procs.get('agent-0')!.exitCode).toBeNull();
    expect(farm.procs.get('agent-0')!.pid).toBe(agentPid);
    expect(errorsIn(farm, 'agent-0')).toEqual([]);
    // the LoRA the record names is the object in the bucket
    const lora = Buffer.from(await (await s3.getObject('kiln-test', job.training.lora.key)).toArray().then((c) => Buffer.concat(c as Buffer[])));
    expect(sha256(lora)).toBe(job.training.lora.sha256);
  }, 180_000);

  it('a training whose worker dies after each new checkpoint is never out of attempts, and resumes through an S3 outage', async () => {
    const res = await farm.request('POST', '/v1/trainings', {
      base_model: BASE,
      dataset: { s3_prefix: 'datasets/outage/' },
      output: { name: 'outage/resume' },
      hyperparameters: { rank: 4, steps: 24, checkpoint_every: 2, resolution: 256, seed: 6 },
    });
    expect(res.status).toBe(202);
    const id = res.body.id;
    let job: any;
    const workerPid = async () => (await farm.agents()).find((a) => a.agent_id === 'agent-0')!.worker.pid!;

    // 1. a checkpoint, then the worker dies while S3 is down: the next attempt's downloads
    //    (dataset and checkpoint) wait for S3 in place
    await farm.waitFor(async () => ((job = (await farm.get(`/v1/trainings/${id}`)).body).training.last_checkpoint?.step ?? 0) >= 2, 60_000, 'a first checkpoint');
    await farm.s3.stop();
    process.kill(await workerPid(), 'SIGKILL');
    await farm.waitFor(async () => (job = (await farm.get(`/v1/trainings/${id}`)).body).attempt === 2 && job.status === 'running', 30_000, 'attempt 2 running');
    await sleep(1_500);
    await farm.s3.resume();
    // 2. progress past where attempt 2 resumed, then the worker dies again
    await farm.waitFor(async () => (job = (await farm.get(`/v1/trainings/${id}`)).body).events.some((e: any) => e.message?.startsWith('resuming')), 30_000, 'resumed');
    const resumedAt = job.training.last_checkpoint.step;
    await farm.waitFor(async () => ((job = (await farm.get(`/v1/trainings/${id}`)).body).training.last_checkpoint?.step ?? 0) > resumedAt, 60_000, 'a new checkpoint');
    process.kill(await workerPid(), 'SIGKILL');

    await farm.waitFor(async () => ['succeeded', 'failed', 'canceled'].includes((job = (await farm.get(`/v1/trainings/${id}`)).body).status), 120_000, 'training done');
    expect(job.status, JSON.stringify(job.error)).toBe('succeeded');
    expect(job.attempt).toBe(3);
    expect(job.charged_attempts).toBe(0);
    expect(messages(job)).toMatch(/worker_crashed.*it made progress, so no attempt is spent/);
    expect(job.training.step).toBe(24);
  }, 240_000);
});

describe('an agent restarted under the same id', () => {
  // a long TTL: the restarted agent is back long before the dispatcher would call it lost
  const farm = new Farm({ agents: 1, env: { KILN_SYNTHETIC_STEP_MS: '400', AGENT_TTL_MS: '30000' } });
  beforeAll(() => farm.start());
  afterAll(() => farm.close());

  it('hands back the job its previous run held at once: no wait for the queue lock (60 s)', async () => {
    const { id } = await farm.submit(slow(3));
    await farm.waitForJob(id, (j) => j.stage === 'running' && (j.progress?.step ?? 0) >= 1);
    const proc = farm.procs.get('agent-0')!;
    proc.kill('SIGKILL');
    await proc;
    const killedAt = Date.now();
    farm.startAgent(0);

    const job = await farm.waitForDone(id, 45_000);
    const tookMs = Date.now() - killedAt;
    expect(job.status, JSON.stringify(job.error)).toBe('succeeded');
    expect(tookMs).toBeLessThan(30_000);
    // the attempt the killed agent ran is over and counted as a lost agent, not as the job's fault
    expect(job.attempt).toBe(2);
    expect(job.charged_attempts).toBe(0);
    expect(messages(job)).toMatch(/agent_lost: agent agent-0 restarted while running it/);
    console.log(`restart: job done ${tookMs} ms after its agent was SIGKILLed and restarted`);
  }, 90_000);

  it('a second agent started under a live agent\'s id refuses to start, naming AGENT_ID, and takes nothing from it', async () => {
    const { id } = await farm.submit(slow(4));
    await farm.waitForJob(id, (j) => j.stage === 'running' && (j.progress?.step ?? 0) >= 1);
    const twin = farm.spawn('agent-0-twin', ENTRY.agent, { GPU_ID: '1', AGENT_ID: 'agent-0' });
    const ended = await twin;
    expect(ended.exitCode).toBe(1);
    const said = readFileSync(join(farm.logDir, 'agent-0-twin.log'), 'utf8');
    expect(said).toMatch(/AGENT_ID agent-0 is held by a live agent/);
    // the live agent's job ran on as if nothing happened: its first attempt, no hand-back
    const job = await farm.waitForDone(id, 60_000);
    expect(job.status).toBe('succeeded');
    expect(job.attempt).toBe(1);
    expect(messages(job)).not.toMatch(/restarted|agent_lost/);
    expect((await farm.agents()).map((a) => a.agent_id)).toEqual(['agent-0']);
  }, 90_000);
});

describe('an agent frozen past its TTL (SIGSTOP) while it runs a job', () => {
  const farm = new Farm({ agents: 2, env: { KILN_SYNTHETIC_STEP_MS: '400' } });
  beforeAll(() => farm.start());
  afterAll(async () => {
    for (const p of farm.procs.values()) if (p.pid) process.kill(p.pid, 'SIGCONT');
    await farm.close();
  });

  it('the job succeeds elsewhere; when the agent wakes, its stale attempt changes nothing a client sees, and it rejoins quietly', async () => {
    const { id } = await farm.submit(slow(4));
    const running = await farm.waitForJob(id, (j) => j.stage === 'running' && (j.progress?.step ?? 0) >= 1);
    const frozen = running.agent!;
    const pid = farm.procs.get(frozen)!.pid!;
    const workerPid = (await farm.agents()).find((a) => a.agent_id === frozen)!.worker.pid;
    process.kill(pid, 'SIGSTOP');
    let done;
    try {
      done = await farm.waitForDone(id, 60_000);
      expect(done.status).toBe('succeeded');
      expect(done.agent).not.toBe(frozen);
      // its worker has long finished the stale attempt; let the clock move past the end
      await sleep(2_000);
    } finally {
      process.kill(pid, 'SIGCONT');
    }
    // the woken agent finishes its stale attempt and is back
    await farm.waitFor(async () => (await farm.agents()).some((a) => a.agent_id === frozen && a.state === 'ready' && a.current_job === null), 30_000, 'the frozen agent back and idle');
    await sleep(2_000);

    const after = await farm.job(id);
    expect(after.outputs).toEqual(done.outputs.map((o) => ({ ...o, url: expect.any(String) })));
    expect(after.status).toBe('succeeded');
    for (const o of after.outputs) {
      const res = await fetch(o.url);
      expect(sha256(Buffer.from(await res.arrayBuffer()))).toBe(o.sha256);
      // the object is the one the winning attempt uploaded, not one written after the job ended
      // (Last-Modified has whole seconds; the stale attempt woke 2 s after the end)
      expect(Date.parse(res.headers.get('last-modified')!)).toBeLessThanOrEqual(Date.parse(after.finished_at!));
      expect(res.headers.get('x-amz-meta-agent')).toBe(after.agent);
      expect(res.headers.get('x-amz-meta-attempt')).toBe(String(after.attempt));
    }
    // nothing of the stale attempt is left beside the outputs
    const s3 = new Client({ endPoint: '127.0.0.1', port: Number(new URL(farm.s3.endpoint).port), useSSL: false, accessKey: farm.s3.accessKey, secretKey: farm.s3.secretKey, pathStyle: true, region: 'us-east-1' });
    const listed: string[] = [];
    for await (const o of s3.listObjectsV2('kiln-test', `outputs/${id}/`, true) as AsyncIterable<{ name: string }>) listed.push(o.name);
    expect(listed.sort()).toEqual(after.outputs.map((o) => o.key).sort());
    // quietly: no error logged, same worker, and it takes work again
    expect(errorsIn(farm, frozen)).toEqual([]);
    expect((await farm.agents()).find((a) => a.agent_id === frozen)!.worker.pid).toBe(workerPid);
    const next = await Promise.all([10, 11, 12, 13].map((s) => farm.submit(basicRequest({ hyperparameters: { seed: s, width: 256, height: 256 } }))));
    const ran = await Promise.all(next.map((j) => farm.waitForDone(j.id, 60_000)));
    expect(ran.every((j) => j.status === 'succeeded')).toBe(true);
  }, 120_000);
});

/** A redis-server of this file's own, which it can restart (AOF on, so a restart keeps the data). */
class OwnRedis {
  readonly port = 30_000 + Math.floor(Math.random() * 10_000);
  readonly url = `redis://127.0.0.1:${this.port}`;
  private readonly dir = mkdtempSync(join(tmpdir(), 'kiln-redis-'));
  private proc: ChildProcess | null = null;

  async start(): Promise<void> {
    this.proc = spawn('redis-server', ['--port', String(this.port), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'yes', '--appendfsync', 'always', '--dir', this.dir], { stdio: 'ignore' });
    const probe = new Redis(this.url, { lazyConnect: true, retryStrategy: () => null, maxRetriesPerRequest: 0 });
    probe.on('error', () => {});
    const deadline = Date.now() + 10_000;
    for (;;) {
      if (await probe.connect().then(() => probe.ping(), () => null)) break;
      if (Date.now() > deadline) throw new Error(`redis-server on ${this.port} did not start`);
      probe.disconnect();
      await sleep(100);
    }
    probe.disconnect();
  }

  async stop(): Promise<void> {
    const p = this.proc;
    if (!p || p.exitCode !== null) return;
    const exited = new Promise((r) => p.once('exit', r));
    p.kill('SIGTERM');
    await exited;
  }

  async close(): Promise<void> {
    await this.stop();
    rmSync(this.dir, { recursive: true, force: true });
  }
}

describe('cancels heard through a Redis restart', () => {
  const redis = new OwnRedis();
  // loads slow enough to cancel one while it runs: SDXL base takes about 5 s
  const farm = new Farm({ agents: 1, redisUrl: redis.url, env: { KILN_SYNTHETIC_LOAD_MS_PER_GB: '700', KILN_SYNTHETIC_STEP_MS: '400' } });
  beforeAll(async () => {
    await redis.start();
    await farm.start();
  });
  afterAll(async () => {
    await farm.close();
    await redis.close();
  });

  const subscribers = async () => Number((await farm.redis.pubsub('NUMSUB', `${farm.prefix}:cancel`))[1]);

  /** Submits a job whose model is not loaded yet, cancels it during the load; ms from the cancel to `canceled`. */
  async function cancelDuringLoad(base: string): Promise<number> {
    const { id } = await farm.submit({ ...slow(1), model: { base } });
    await farm.waitForJob(id, (j) => j.stage === 'loading_model', 30_000);
    const asked = Date.now();
    expect((await farm.request('DELETE', `/v1/jobs/${id}`)).status).toBe(202);
    const job = await farm.waitForDone(id, 20_000);
    expect(job.status).toBe('canceled');
    return Date.now() - asked;
  }

  it('the agent is subscribed to cancels once started, and a cancel during a model load ends the job at once', async () => {
    expect(await subscribers()).toBe(1);
    const ms = await cancelDuringLoad(BASE);
    console.log(`cancel during a model load: canceled ${ms} ms after the request`);
    expect(ms).toBeLessThan(1_500);
  });

  it('after Redis restarts, the agent subscribes again and cancels still land at once', async () => {
    await redis.stop();
    await sleep(2_000);
    await redis.start();
    await farm.waitFor(async () => (await subscribers()) === 1, 15_000, 'the agent subscribed again');
    await farm.waitForAgents(1, 30_000);
    const ms = await cancelDuringLoad(TURBO); // a model this agent has not loaded
    console.log(`cancel during a model load after a Redis restart: canceled ${ms} ms after the request`);
    expect(ms).toBeLessThan(1_500);
    expect(errorsIn(farm, 'agent-0').filter((l) => /subscriber mode|Unhandled/i.test(l))).toEqual([]);
  }, 120_000);
});
