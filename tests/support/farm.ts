import { createServer, type AddressInfo } from 'node:net';
import { randomBytes, randomUUID } from 'node:crypto';
import { createWriteStream, mkdirSync, readdirSync, readFileSync } from 'node:fs';
import { resolve } from 'node:path';
import type { JobRecord } from '@kiln/contracts';

/** Most tests are about generations; training tests narrow with `kind`. */
export type GenRecord = Extract<JobRecord, { kind: 'generation' }>;
import { Redis } from 'ioredis';
import { ENTRY, REPO_ROOT, startEmbeddedS3, startProcess, type EmbeddedS3 } from '../../scripts/farm-lib.js';

/**
 * A whole farm for one test file, every piece real: Redis (a key prefix of its own), an S3
 * server on loopback, the API, the dispatcher and N agents as separate processes, each agent
 * with its own Python worker. Logs go to .kiln/test-logs/<prefix>/.
 */

export const REDIS_URL = process.env.REDIS_URL ?? 'redis://127.0.0.1:6379';
export const WEBHOOK_SECRET = `whsec_${Buffer.from('kiln-test-secret-key-0123456789').toString('base64')}`;

/** Fast synthetic costs so tests take seconds; loads stay clearly costlier than steps. */
export const FAST_ENV: Record<string, string> = {
  KILN_SYNTHETIC_STEP_MS: '10',
  KILN_SYNTHETIC_LOAD_MS_PER_GB: '100',
  HEARTBEAT_MS: '200',
  AGENT_TTL_MS: '1500',
  DISPATCH_INTERVAL_MS: '100',
  SWEEP_INTERVAL_MS: '1000',
  LEASE_TTL_MS: '2000',
  WEBHOOK_BACKOFF_MS: '100',
  WEBHOOK_ALLOW_PRIVATE: 'true',
  WEBHOOK_SECRET,
  CANCEL_GRACE_MS: '1500',
  SHUTDOWN_TIMEOUT_MS: '5000',
  LOG_LEVEL: 'info',
  LOG_FORMAT: 'json',
};

type Proc = ReturnType<typeof startProcess>;

export interface FarmOptions {
  agents?: number;
  env?: Record<string, string>;
  agentEnv?: (i: number) => Record<string, string>;
  /** start the dispatcher (default true) */
  dispatcher?: boolean;
  /** the key the farm's own helpers (agents(), job(), submit()…) send, when keys are set */
  apiKey?: string;
  /** a Redis of the test's own (one it restarts), instead of the shared REDIS_URL */
  redisUrl?: string;
  /** KILN_PREFIX (default: kiln-test-<random>), e.g. a hash-tagged one for Redis Cluster */
  prefix?: string;
  /** variables for the dispatcher or the API alone (e.g. a METRICS_PORT each) */
  dispatcherEnv?: Record<string, string>;
  apiEnv?: Record<string, string>;
}

export class Farm {
  readonly prefix: string;
  readonly logDir: string;
  api = '';
  s3!: EmbeddedS3;
  redis!: Redis;
  readonly procs = new Map<string, Proc>();
  private env: Record<string, string> = {};
  private port = 0;

  constructor(private readonly opts: FarmOptions = {}) {
    this.prefix = opts.prefix ?? `kiln-test-${randomUUID().slice(0, 8)}`;
    this.logDir = resolve(REPO_ROOT, '.kiln/test-logs', this.prefix);
    mkdirSync(this.logDir, { recursive: true });
  }

  async start(): Promise<this> {
    const redisUrl = this.opts.redisUrl ?? REDIS_URL;
    this.redis = new Redis(redisUrl);
    this.redis.on('error', () => {}); // a test that restarts its Redis expects the reconnects
    this.s3 = await startEmbeddedS3(resolve(REPO_ROOT, '.kiln/test-s3', this.prefix));
    this.port = await freePort();
    this.api = `http://127.0.0.1:${this.port}`;
    this.env = {
      ...FAST_ENV,
      REDIS_URL: redisUrl,
      KILN_PREFIX: this.prefix,
      S3_ENDPOINT: this.s3.endpoint,
      S3_ACCESS_KEY: this.s3.accessKey,
      S3_SECRET_KEY: this.s3.secretKey,
      S3_BUCKET: 'kiln-test',
      PORT: String(this.port),
      PUBLIC_URL: this.api,
      WORK_DIR: resolve(REPO_ROOT, '.kiln/test-work', this.prefix),
      ...this.opts.env,
    };
    const waits: Promise<unknown>[] = [];
    if (this.opts.dispatcher !== false) this.spawn('dispatcher', ENTRY.dispatcher, this.opts.dispatcherEnv);
    this.spawn('api', ENTRY.api, this.opts.apiEnv);
    waits.push(this.waitFor(async () => (await fetch(`${this.api}/healthz`).catch(() => null))?.ok === true, 30_000, 'api up'));
    for (let i = 0; i < (this.opts.agents ?? 2); i++) this.startAgent(i);
    await Promise.all(waits);
    if ((this.opts.agents ?? 2) > 0) await this.waitForAgents(this.opts.agents ?? 2);
    return this;
  }

  agentId(i: number): string {
    return `agent-${i}`;
  }

  startAgent(i: number, extra: Record<string, string> = {}): void {
    this.spawn(this.agentId(i), ENTRY.agent, { GPU_ID: String(i), AGENT_ID: this.agentId(i), ...this.opts.agentEnv?.(i), ...extra });
  }

  spawn(name: string, entry: string, extra: Record<string, string> = {}): Proc {
    const proc = startProcess(entry, { ...this.env, ...extra }, 'pipe');
    const log = createWriteStream(resolve(this.logDir, `${name}.log`), { flags: 'a' });
    proc.stdout?.pipe(log);
    proc.stderr?.pipe(log);
    this.procs.set(name, proc);
    return proc;
  }

  /** Agents that are live and ready with a worker. */
  async agents(): Promise<Array<{ agent_id: string; state: string; worker: { pid: number | null; restarts: number }; resident: { name: string }[]; current_job: string | null }>> {
    return (await this.get('/v1/agents')).body.agents;
  }

  async waitForAgents(n: number, timeoutMs = 60_000): Promise<void> {
    await this.waitFor(async () => (await this.agents()).filter((a) => a.state === 'ready' || a.state === 'busy').length >= n, timeoutMs, `${n} agents ready`);
  }

  async request(method: string, path: string, body?: unknown, headers: Record<string, string> = {}): Promise<{ status: number; body: any; headers: Headers }> {
    const res = await fetch(`${this.api}${path}`, {
      method,
      headers: { ...(body === undefined ? {} : { 'content-type': 'application/json' }), ...(this.opts.apiKey ? { authorization: `Bearer ${this.opts.apiKey}` } : {}), ...headers },
      body: body === undefined ? undefined : typeof body === 'string' ? body : JSON.stringify(body),
    });
    const text = await res.text();
    let parsed: unknown = text;
    try {
      parsed = JSON.parse(text);
    } catch {}
    return { status: res.status, body: parsed, headers: res.headers };
  }

  get(path: string, headers?: Record<string, string>) {
    return this.request('GET', path, undefined, headers);
  }

  async submit(req: unknown, headers?: Record<string, string>): Promise<GenRecord> {
    const res = await this.request('POST', '/v1/generations', req, headers);
    if (res.status !== 202) throw new Error(`submit failed: ${res.status} ${JSON.stringify(res.body)}`);
    return res.body;
  }

  async job(id: string): Promise<GenRecord> {
    const res = await this.get(`/v1/jobs/${id}`);
    if (res.status !== 200) throw new Error(`GET job ${id}: ${res.status} ${JSON.stringify(res.body)}`);
    return res.body;
  }

  /** Polls the job until `pred` holds; fails with the last record when time runs out. */
  async waitForJob(id: string, pred: (j: GenRecord) => boolean, timeoutMs = 30_000): Promise<GenRecord> {
    let last: GenRecord | null = null;
    const deadline = Date.now() + timeoutMs;
    while (Date.now() < deadline) {
      last = await this.job(id);
      if (pred(last)) return last;
      await sleep(50);
    }
    throw new Error(`job ${id} did not reach the expected state in ${timeoutMs} ms; last record:\n${JSON.stringify(last, null, 2)}`);
  }

  waitForDone(id: string, timeoutMs = 30_000): Promise<GenRecord> {
    return this.waitForJob(id, (j) => ['succeeded', 'failed', 'canceled'].includes(j.status), timeoutMs);
  }

  async waitFor(pred: () => Promise<boolean>, timeoutMs: number, what: string): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    while (Date.now() < deadline) {
      if (await pred().catch(() => false)) return;
      await sleep(50);
    }
    throw new Error(`timed out after ${timeoutMs} ms waiting for: ${what} (logs in ${this.logDir})`);
  }

  /** Stops every process (SIGTERM, then SIGKILL), checks none leaked, removes the prefix. */
  async close(): Promise<void> {
    for (const p of this.procs.values()) p.kill('SIGTERM');
    const killer = setTimeout(() => {
      for (const p of this.procs.values()) p.kill('SIGKILL');
    }, 8_000);
    await Promise.all([...this.procs.values()]);
    clearTimeout(killer);
    await this.waitFor(async () => leakedProcesses(this.prefix).length === 0, 5_000, 'every process of the farm to exit').catch((err) => {
      throw new Error(`${err.message}; still running: ${leakedProcesses(this.prefix).join(', ')}`);
    });
    await this.s3?.close();
    const keys = await this.redis.keys(`${this.prefix}:*`);
    if (keys.length) await this.redis.del(...keys);
    this.redis?.disconnect();
  }
}

/** PIDs of processes whose environment carries this farm's prefix (workers included). */
export function leakedProcesses(prefix: string): number[] {
  const needle = `KILN_PREFIX=${prefix}\0`;
  const pids: number[] = [];
  for (const entry of readdirSync('/proc')) {
    if (!/^\d+$/.test(entry) || Number(entry) === process.pid) continue;
    try {
      if (readFileSync(`/proc/${entry}/environ`, 'latin1').includes(needle)) pids.push(Number(entry));
    } catch {}
  }
  return pids;
}

/**
 * A port nothing listens on now, as the OS hands out (not a random pick, which two farms
 * starting together could share).
 */
export function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const srv = createServer();
    srv.unref();
    srv.on('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const { port } = srv.address() as AddressInfo;
      srv.close(() => resolve(port));
    });
  });
}

export const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

export function basicRequest(overrides: Record<string, any> = {}): Record<string, any> {
  return {
    model: { base: 'stabilityai/stable-diffusion-xl-base-1.0' },
    scheduler: { type: 'EulerDiscreteScheduler', steps: 4 },
    hyperparameters: { guidance_scale: 5, seed: 7, width: 512, height: 512, num_images: 1 },
    conditioning: { prompt: 'a lighthouse at dusk', negative_prompt: 'blurry' },
    ...overrides,
  };
}

export function randomKey(): string {
  return randomBytes(24).toString('hex');
}

/** Width and height from a PNG's IHDR chunk; throws if it is not a PNG. */
export function pngSize(buf: Buffer): { width: number; height: number } {
  const sig = Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]);
  if (!buf.subarray(0, 8).equals(sig) || buf.toString('latin1', 12, 16) !== 'IHDR') throw new Error('not a PNG');
  return { width: buf.readUInt32BE(16), height: buf.readUInt32BE(20) };
}
