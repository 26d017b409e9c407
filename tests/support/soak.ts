import { createHash, randomUUID } from 'node:crypto';
import { createServer, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { Client } from 'minio';
import { Webhook } from 'standardwebhooks';
import { ENTRY } from '../../scripts/farm-lib.js';
import { Farm, sleep, WEBHOOK_SECRET } from './farm.js';
import { gradientPng, shapesPng } from './images.js';
import { RedisServer } from './redis-server.js';

/**
 * The soak: a mixed workload on a whole farm while processes and dependencies fail under it,
 * then a check of everything a client could notice. `npm run soak` runs the long version
 * (scripts/soak.ts) and prints the table; tests/soak.e2e.test.ts runs a short one in `npm test`.
 *
 * Workload: generations over four models (each with a `completed` webhook; a few meant to
 * fail on their own, a few canceled), batches (a batch webhook), a cache request, a LoRA
 * training with checkpoints. Faults: worker, agent and dispatcher SIGKILLs at random times
 * (agents come back under the same id, dispatchers too, a standby running meanwhile), Redis
 * (AOF on) restarted once cleanly and once by SIGKILL, S3 stopped, the webhook receiver stopped.
 *
 * Checks: every job terminal and none lost; none failed for an infrastructure reason (only the
 * jobs meant to fail failed, with their own error); every succeeded job's outputs present with
 * the sha256 its record claims and nothing else under its prefix, a failed job with none;
 * every `completed` webhook delivered, signature verified, exactly once; every batch closed
 * once, its webhook once; the training finished (from its checkpoint when interrupted).
 */

export interface SoakConfig {
  /** how long work is submitted and faults are injected */
  durationMs: number;
  agents: number;
  generations: number;
  batches: number;
  batchSize: number;
  /** generations canceled while they wait or run */
  cancels: number;
  /** generations meant to fail on their own (the worker raises on their prompt) */
  failing: number;
  faults: {
    workerKills: number;
    agentKills: number;
    dispatcherKills: number;
    redisRestart: boolean;
    redisKill: boolean;
    /** S3 stopped this long (0: never) */
    s3DownMs: number;
    /** the webhook receiver stopped this long (0: never) */
    receiverDownMs: number;
    /** SIGKILL the training's agent once, after its first checkpoint */
    trainingKill: boolean;
  };
  /** after the workload, how long jobs and webhooks may take to settle */
  settleMs: number;
  seed: number;
  say: (line: string) => void;
}

export interface SoakCheck {
  check: string;
  ok: boolean;
  detail: string;
}

export interface SoakReport {
  checks: SoakCheck[];
  counts: Record<string, number>;
  faults: string[];
  durationMs: number;
  logDir: string;
  ok: boolean;
}

const MODELS = ['stabilityai/stable-diffusion-xl-base-1.0', 'stabilityai/sdxl-turbo', 'RunDiffusion/Juggernaut-XL-v9', 'playgroundai/playground-v2.5-1024px-aesthetic'];
const FAIL_WORD = 'soak-explode';
const BUCKET = 'kiln-test';

/** A receiver that verifies each delivery's signature as it arrives; it can be stopped and started on the same port. */
class VerifyingReceiver {
  readonly received: Array<{ msgId: string; type: string; id: string; verified: boolean; at: number }> = [];
  private server: Server | null = null;
  private port = 0;
  private readonly signer = new Webhook(WEBHOOK_SECRET);

  get url(): string {
    return `http://127.0.0.1:${this.port}/hook`;
  }

  async start(): Promise<void> {
    this.server = createServer((req, res) => {
      const chunks: Buffer[] = [];
      req.on('data', (c) => chunks.push(c));
      req.on('end', () => {
        const body = Buffer.concat(chunks).toString('utf8');
        let verified = false;
        let payload: any = null;
        try {
          payload = this.signer.verify(body, req.headers as Record<string, string>);
          verified = true;
        } catch {
          payload = JSON.parse(body);
        }
        this.received.push({ msgId: String(req.headers['webhook-id']), type: payload?.type, id: payload?.data?.id, verified, at: Date.now() });
        res.statusCode = verified ? 204 : 400;
        res.end();
      });
    });
    await new Promise<void>((r) => this.server!.listen(this.port, '127.0.0.1', r));
    this.port = (this.server!.address() as AddressInfo).port;
  }

  async stop(): Promise<void> {
    const closed = new Promise((r) => this.server?.close(r));
    this.server?.closeAllConnections();
    await closed;
    this.server = null;
  }
}

/** A small seeded generator, so a run's fault schedule can be repeated from its seed. */
function rng(seed: number): () => number {
  let s = seed >>> 0 || 1;
  return () => {
    s ^= s << 13;
    s ^= s >>> 17;
    s ^= s << 5;
    return (s >>> 0) / 4294967296;
  };
}

export async function runSoak(cfg: SoakConfig): Promise<SoakReport> {
  const t0 = Date.now();
  const rand = rng(cfg.seed);
  const pick = <T>(xs: T[]) => xs[Math.floor(rand() * xs.length)]!;
  const say = (line: string) => cfg.say(`[soak +${((Date.now() - t0) / 1000).toFixed(1)}s] ${line}`);
  const faults: string[] = [];
  const fault = (what: string) => {
    faults.push(what);
    say(`fault: ${what}`);
  };

  const redis = await new RedisServer({ aof: true }).start();
  const receiver = new VerifyingReceiver();
  await receiver.start();
  const farm = new Farm({
    agents: cfg.agents,
    redisUrl: redis.url,
    env: {
      // jobs of a second or two, so kills land on running work; a training step of 400 ms
      KILN_SYNTHETIC_STEP_MS: '60',
      KILN_SYNTHETIC_TRAIN_STEP_MS: '6400',
      KILN_SYNTHETIC_RAISE_ON_PROMPT: FAIL_WORD,
      AGENT_TTL_MS: '3000',
      HEARTBEAT_MS: '300',
      LEASE_TTL_MS: '3000',
      SWEEP_INTERVAL_MS: '2000',
      // the receiver is down up to a minute: retries must outlast it
      WEBHOOK_MAX_ATTEMPTS: '12',
      WEBHOOK_BACKOFF_MS: '1000',
      SHUTDOWN_TIMEOUT_MS: '5000',
    },
  });
  let stopping = false;
  try {
    await farm.start();
    farm.spawn('dispatcher-b', ENTRY.dispatcher); // a standby, so killing the active one hands over
    const s3 = new Client({ endPoint: '127.0.0.1', port: Number(new URL(farm.s3.endpoint).port), useSSL: false, accessKey: farm.s3.accessKey, secretKey: farm.s3.secretKey, pathStyle: true, region: 'us-east-1' });
    for (let i = 0; i < 3; i++) {
      const img = i % 2 ? await shapesPng(128, 128) : await gradientPng(128, 128);
      await s3.putObject(BUCKET, `datasets/soak/${i}.png`, img, img.length, { 'Content-Type': 'image/png' });
      await s3.putObject(BUCKET, `datasets/soak/${i}.txt`, Buffer.from(`a photo of a kiln, number ${i}`), undefined, { 'Content-Type': 'text/plain' });
    }
    say(`farm up: ${cfg.agents} agents, 2 dispatchers, Redis (AOF) on :${redis.port}; logs in ${farm.logDir}`);

    // ---- the client side: every request retried through outages, submissions idempotent ----
    const call = async (method: string, path: string, body?: unknown, idem?: string): Promise<{ status: number; body: any }> => {
      const deadline = Date.now() + 120_000;
      for (;;) {
        try {
          const res = await farm.request(method, path, body, idem ? { 'idempotency-key': idem } : {});
          if (res.status < 500 && res.status !== 429) return res;
          if (Date.now() > deadline) return res;
        } catch (err) {
          if (Date.now() > deadline) throw err;
        }
        await sleep(500);
      }
    };

    const jobs = new Map<string, { kind: string; meantToFail: boolean; canceled: boolean; hook: boolean }>();
    const batches: string[] = [];
    let training: string | null = null;
    const refused: string[] = [];
    const submit = async (path: string, body: unknown): Promise<any | null> => {
      const res = await call('POST', path, body, randomUUID());
      if (res.status === 202) return res.body;
      refused.push(`${path}: ${res.status} ${JSON.stringify(res.body).slice(0, 200)}`);
      say(`submission refused: ${refused.at(-1)}`);
      return null;
    };
    const generation = (i: number, failing: boolean) => ({
      model: { base: MODELS[i % MODELS.length] },
      scheduler: { type: 'EulerDiscreteScheduler', steps: 12 + Math.floor(rand() * 20) },
      hyperparameters: { seed: i, width: 1024, height: 1024 },
      conditioning: { prompt: failing ? `soak ${i} ${FAIL_WORD}` : `a kiln at dusk, soak ${i}` },
      webhook: { url: receiver.url, events: ['completed'] },
    });

    // the work, spread over the duration
    const workload = (async () => {
      const cache = await submit('/v1/cache', { models: { base: MODELS[1] }, target: { agents: [farm.agentId(0)] }, pin: true });
      for (const c of cache?.children ?? []) jobs.set(c.id, { kind: 'cache', meantToFail: false, canceled: false, hook: false });
      const t = await submit('/v1/trainings', {
        base_model: MODELS[0],
        dataset: { s3_prefix: 'datasets/soak/' },
        output: { name: `soak/style-${cfg.seed}` },
        hyperparameters: { rank: 4, steps: 24, checkpoint_every: 4, resolution: 256, seed: 3 },
      });
      if (t) {
        training = t.id;
        jobs.set(t.id, { kind: 'training', meantToFail: false, canceled: false, hook: false });
      }
      const failingAt = new Set(Array.from({ length: cfg.failing }, () => Math.floor(rand() * cfg.generations)));
      const batchAt = new Set(Array.from({ length: cfg.batches }, (_, b) => Math.floor(((b + 0.5) * cfg.generations) / cfg.batches)));
      const gap = cfg.durationMs / Math.max(1, cfg.generations);
      for (let i = 0; i < cfg.generations && !stopping; i++) {
        const failing = failingAt.has(i);
        const g = await submit('/v1/generations', generation(i, failing));
        if (g) jobs.set(g.id, { kind: 'generation', meantToFail: failing, canceled: false, hook: true });
        if (batchAt.has(i)) {
          const b = await submit('/v1/batches', {
            defaults: { model: { base: pick(MODELS) }, scheduler: { steps: 10 }, conditioning: { prompt: 'a batch of kilns' }, hyperparameters: { width: 512, height: 512 } },
            items: Array.from({ length: cfg.batchSize }, (_, k) => ({ hyperparameters: { seed: 1000 * i + k } })),
            webhook: { url: receiver.url },
          });
          if (b) {
            batches.push(b.id);
            for (const c of b.children) jobs.set(c.id, { kind: 'batch child', meantToFail: false, canceled: false, hook: false });
          }
        }
        await sleep(gap * (0.5 + rand()));
      }
    })();

    const cancels = (async () => {
      for (let k = 0; k < cfg.cancels && !stopping; k++) {
        await sleep(cfg.durationMs / (cfg.cancels + 1));
        const candidates = [...jobs.entries()].filter(([, j]) => j.kind === 'generation' && !j.meantToFail && !j.canceled);
        if (!candidates.length) continue;
        const [id, j] = pick(candidates.slice(-6));
        j.canceled = true;
        await call('DELETE', `/v1/jobs/${id}`);
      }
    })();

    // ---- faults, at random times within the duration ----
    const tw = Date.now(); // the workload's start: faults are placed within its duration
    const at = (frac: number) => sleep(Math.max(0, tw + 2_000 + frac * cfg.durationMs - Date.now()));
    const hitJobs = new Set<string>();
    const schedule: Array<Promise<unknown>> = [];
    for (let k = 0; k < cfg.faults.workerKills; k++) {
      schedule.push((async () => {
        await at(rand() * 0.9);
        const agents = (await call('GET', '/v1/agents')).body.agents as Array<{ agent_id: string; current_job: string | null; worker: { pid: number | null } }>;
        const busy = agents.filter((a) => a.worker.pid && a.current_job && !hitJobs.has(a.current_job));
        if (!busy.length) return;
        const a = pick(busy);
        hitJobs.add(a.current_job!); // a job is hit at most once: a job crashing its worker 3 times is the job's fault
        try {
          process.kill(a.worker.pid!, 'SIGKILL');
          fault(`SIGKILL worker of ${a.agent_id} (pid ${a.worker.pid}, running ${a.current_job})`);
        } catch {}
      })());
    }
    for (let k = 0; k < cfg.faults.agentKills; k++) {
      schedule.push((async () => {
        await at(rand() * 0.9);
        const i = Math.floor(rand() * cfg.agents);
        const id = farm.agentId(i);
        const proc = farm.procs.get(id);
        if (!proc || proc.exitCode !== null) return;
        const agents = (await call('GET', '/v1/agents')).body.agents as Array<{ agent_id: string; current_job: string | null }>;
        const current = agents.find((a) => a.agent_id === id)?.current_job;
        if (current) hitJobs.add(current);
        proc.kill('SIGKILL');
        await proc;
        const back = 500 + Math.floor(rand() * 2500);
        fault(`SIGKILL agent ${id}${current ? ` (running ${current})` : ''}; back under the same id in ${back} ms`);
        await sleep(back);
        if (!stopping) farm.startAgent(i);
      })());
    }
    for (let k = 0; k < cfg.faults.dispatcherKills; k++) {
      schedule.push((async () => {
        await at(rand() * 0.9);
        const name = pick(['dispatcher', 'dispatcher-b']);
        const proc = farm.procs.get(name);
        if (!proc || proc.exitCode !== null) return;
        proc.kill('SIGKILL');
        await proc;
        fault(`SIGKILL ${name}`);
        await sleep(1_000 + Math.floor(rand() * 2_000));
        if (!stopping) farm.spawn(name, ENTRY.dispatcher);
      })());
    }
    // Redis, S3 and the receiver: at fixed shares of the run so the outages do not overlap
    if (cfg.faults.redisRestart) {
      schedule.push((async () => {
        await at(0.3);
        await redis.stop();
        fault('Redis stopped cleanly (SHUTDOWN); back in 3 s');
        await sleep(3_000);
        await redis.start();
      })());
    }
    if (cfg.faults.redisKill) {
      schedule.push((async () => {
        await at(0.7);
        await redis.kill();
        fault('Redis SIGKILLed; back in 3 s (AOF everysec)');
        await sleep(3_000);
        await redis.start();
      })());
    }
    if (cfg.faults.s3DownMs > 0) {
      schedule.push((async () => {
        await at(0.45);
        await farm.s3.stop();
        fault(`S3 stopped for ${cfg.faults.s3DownMs / 1000} s`);
        await sleep(cfg.faults.s3DownMs);
        await farm.s3.resume();
      })());
    }
    if (cfg.faults.receiverDownMs > 0) {
      schedule.push((async () => {
        await at(0.05);
        await receiver.stop();
        fault(`webhook receiver stopped for ${cfg.faults.receiverDownMs / 1000} s`);
        await sleep(cfg.faults.receiverDownMs);
        await receiver.start();
      })());
    }
    if (cfg.faults.trainingKill) {
      schedule.push((async () => {
        const deadline = Date.now() + cfg.durationMs;
        while (Date.now() < deadline) {
          await sleep(300);
          if (!training) continue;
          const t = (await call('GET', `/v1/trainings/${training}`)).body;
          if (t.status !== 'running' || (t.training?.last_checkpoint?.step ?? 0) < 4 || !t.agent) continue;
          const i = Number(String(t.agent).split('-').at(-1));
          const proc = farm.procs.get(t.agent);
          if (!proc || proc.exitCode !== null) continue;
          proc.kill('SIGKILL');
          await proc;
          fault(`SIGKILL agent ${t.agent} mid-training (checkpoint at step ${t.training.last_checkpoint.step}); back in 2 s`);
          await sleep(2_000);
          if (!stopping) farm.startAgent(i);
          return;
        }
      })());
    }

    await Promise.all([workload, cancels, ...schedule]);
    stopping = true;
    say(`workload and faults done: ${jobs.size} jobs, ${batches.length} batches, ${faults.length} faults; settling`);

    // ---- settle: every job terminal, every expected webhook in ----
    const settleDeadline = Date.now() + cfg.settleMs;
    let records = new Map<string, any>();
    for (;;) {
      records = new Map();
      for (const id of jobs.keys()) {
        const r = await call('GET', `/v1/jobs/${id}`);
        records.set(id, r.status === 200 ? r.body : null);
      }
      const open = [...records.values()].filter((r) => r && !['succeeded', 'failed', 'canceled'].includes(r.status)).length;
      const hooksDue = [...jobs.entries()].filter(([id, j]) => j.hook && records.get(id) && !receiver.received.some((x) => x.verified && x.id === id && x.type === 'job.completed')).length;
      if ((open === 0 && hooksDue === 0) || Date.now() > settleDeadline) break;
      await sleep(2_000);
    }
    await sleep(3_000); // room for a late duplicate to show up
    const groups = new Map<string, any>();
    for (const id of batches) groups.set(id, (await call('GET', `/v1/batches/${id}`)).body);

    // ---- checks ----
    const checks: SoakCheck[] = [];
    const check = (name: string, bad: string[], total: number, what: string) =>
      checks.push({ check: name, ok: bad.length === 0, detail: bad.length ? `${bad.length} of ${total} ${what}: ${bad.slice(0, 4).join('; ')}${bad.length > 4 ? '; …' : ''}` : `${total} ${what}` });
    const all = [...jobs.entries()].map(([id, meta]) => ({ id, meta, rec: records.get(id) }));

    check('every submission accepted', refused, refused.length + all.length, 'submissions');
    check('no job lost (each acknowledged job still has its record)', all.filter((j) => !j.rec).map((j) => `${j.meta.kind} ${j.id}`), all.length, 'jobs');
    check('every job terminal (none stuck)', all.filter((j) => j.rec && !['succeeded', 'failed', 'canceled'].includes(j.rec.status)).map((j) => `${j.id} ${j.rec.status}/${j.rec.stage} attempt ${j.rec.attempt}`), all.length, 'jobs');
    const infra = all.filter((j) => j.rec?.status === 'failed' && !(j.meta.meantToFail && j.rec.error?.code === 'internal'));
    check('no job failed for an infrastructure reason', infra.map((j) => `${j.meta.kind} ${j.id}: ${j.rec.error?.code}: ${String(j.rec.error?.message).slice(0, 160)}`), all.filter((j) => j.rec?.status === 'failed').length, 'failed jobs, all meant to');
    check('jobs meant to fail failed with their own error', all.filter((j) => j.meta.meantToFail && j.rec?.status !== 'failed').map((j) => `${j.id} ${j.rec?.status}`), all.filter((j) => j.meta.meantToFail).length, 'jobs');

    // outputs: each succeeded job's objects download with the recorded sha256, and its prefix holds nothing else
    const badOutputs: string[] = [];
    let objects = 0;
    for (const j of all.filter((x) => x.rec && x.meta.kind !== 'cache' && x.meta.kind !== 'training')) {
      const listed: string[] = [];
      for await (const o of s3.listObjectsV2(BUCKET, `outputs/${j.id}/`, true)) if (o.name) listed.push(o.name);
      const recorded = (j.rec.outputs ?? []) as Array<{ key: string; sha256: string; url: string }>;
      if (j.rec.status !== 'succeeded') {
        if (recorded.length || listed.length) badOutputs.push(`${j.id} ${j.rec.status} has outputs: ${[...recorded.map((o) => o.key), ...listed].join(', ')}`);
        continue;
      }
      if (!recorded.length) badOutputs.push(`${j.id} succeeded without outputs`);
      for (const o of recorded) {
        const res = await fetch(o.url).catch(() => null);
        const body = res?.ok ? Buffer.from(await res.arrayBuffer()) : null;
        const sha = body ? createHash('sha256').update(body).digest('hex') : null;
        if (sha !== o.sha256) badOutputs.push(`${o.key}: ${sha ? `sha256 ${sha.slice(0, 12)} ≠ recorded ${o.sha256.slice(0, 12)}` : `download failed (${res?.status})`}`);
        else objects += 1;
      }
      const extra = listed.filter((k) => !recorded.some((o) => o.key === k));
      if (extra.length) badOutputs.push(`${j.id}: objects the record does not describe: ${extra.join(', ')}`);
    }
    check('outputs present with their recorded sha256, none for failed jobs, nothing extra', badOutputs, objects, 'objects verified');

    // webhooks: exactly one verified delivery of each job's and batch's `completed` message
    const hookBad: string[] = [];
    const expected = [
      ...all.filter((j) => j.meta.hook && j.rec && ['succeeded', 'failed', 'canceled'].includes(j.rec.status)).map((j) => ({ id: j.id, type: 'job.completed' })),
      ...batches.map((id) => ({ id, type: 'batch.completed' })),
    ];
    for (const e of expected) {
      const got = receiver.received.filter((r) => r.id === e.id && r.type === e.type);
      const verified = got.filter((r) => r.verified);
      if (verified.length !== 1) hookBad.push(`${e.type} ${e.id}: ${verified.length} verified deliveries${verified.length > 1 ? ` (ids ${[...new Set(verified.map((r) => r.msgId))].join(', ')})` : ''}`);
    }
    const forged = receiver.received.filter((r) => !r.verified);
    if (forged.length) hookBad.push(`${forged.length} deliveries failed signature verification`);
    check('every completed webhook delivered, verified, exactly once', hookBad, expected.length, 'webhooks');

    // batches: closed once
    const batchBad: string[] = [];
    for (const [id, g] of groups) {
      const ends = (g?.events ?? []).filter((e: any) => ['succeeded', 'failed', 'partially_succeeded', 'canceled'].includes(e.status));
      if (!['succeeded', 'failed', 'partially_succeeded', 'canceled'].includes(g?.status) || ends.length !== 1) batchBad.push(`${id}: ${g?.status}, ${ends.length} end events`);
    }
    check('every batch closed once', batchBad, groups.size, 'batches');

    // training: finished, and from its checkpoint if it was interrupted
    const t = training ? records.get(training) : null;
    const resumed = t?.events?.some((e: any) => /resuming from the checkpoint/.test(e.message ?? ''));
    const trainBad = !t ? ['no training record'] : t.status !== 'succeeded' ? [`training ${t.status}: ${t.error?.code} ${t.error?.message}`] : t.attempt > 1 && !resumed ? [`attempt ${t.attempt} did not resume from a checkpoint`] : [];
    checks.push({ check: 'training finished from its checkpoints', ok: trainBad.length === 0, detail: trainBad.length ? trainBad.join('; ') : `succeeded on attempt ${t.attempt}${resumed ? ', resumed from its checkpoint' : ''}, last checkpoint at step ${t.training?.last_checkpoint?.step}` });

    const count = (pred: (j: (typeof all)[number]) => boolean) => all.filter(pred).length;
    const counts = {
      jobs: all.length,
      generations: count((j) => j.meta.kind === 'generation'),
      'batch children': count((j) => j.meta.kind === 'batch child'),
      batches: batches.length,
      succeeded: count((j) => j.rec?.status === 'succeeded'),
      'failed (meant to)': count((j) => j.rec?.status === 'failed' && j.meta.meantToFail),
      'failed (infrastructure)': infra.length,
      canceled: count((j) => j.rec?.status === 'canceled'),
      'retried (attempt > 1)': count((j) => (j.rec?.attempt ?? 0) > 1),
      'webhooks received (all tries answered)': receiver.received.length,
    };
    return { checks, counts, faults, durationMs: Date.now() - t0, logDir: farm.logDir, ok: checks.every((c) => c.ok) };
  } finally {
    stopping = true;
    await farm.close().catch((err) => say(`closing the farm: ${err.message}`));
    await receiver.stop().catch(() => {});
    await redis.close();
  }
}

/** The report as a plain-text table. */
export function soakTable(r: SoakReport): string {
  const rows = [
    ...Object.entries(r.counts).map(([k, v]) => [k, String(v), '']),
    ['faults injected', String(r.faults.length), ''],
    ...r.checks.map((c) => [c.check, c.ok ? 'PASS' : 'FAIL', c.detail]),
  ];
  const w0 = Math.max(...rows.map((x) => x[0]!.length));
  const w1 = Math.max(...rows.map((x) => x[1]!.length));
  const line = (x: string[]) => `| ${x[0]!.padEnd(w0)} | ${x[1]!.padEnd(w1)} | ${x[2]}`;
  return [
    `soak: ${(r.durationMs / 1000).toFixed(0)} s, logs in ${r.logDir}`,
    ...r.faults.map((f) => `  fault: ${f}`),
    line(['', '', '']).replace(/ /g, '-'),
    ...rows.map(line),
    `soak ${r.ok ? 'PASSED' : 'FAILED'}`,
  ].join('\n');
}
