import { readdirSync, readFileSync } from 'node:fs';
import { randomUUID } from 'node:crypto';
import { resolve } from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { REPO_ROOT, startProcess } from '../scripts/farm-lib.js';
import { basicRequest, Farm, type GenRecord, leakedProcesses, sleep } from './support/farm.js';
import { ResolvedGenerationRequest } from '@kiln/contracts';
import { GroupStore, JobStore, Keys, newJobFields } from '@kiln/runtime';
import { freePort, RedisServer, TcpProxy } from './support/redis-server.js';
import { WebhookReceiver } from './support/webhook-receiver.js';

/**
 * The control plane under ordinary outages: Redis restarting or stalling is not an agent
 * death, and the processes say so in two quiet log lines each, not in stack traces. And a
 * farm started with a bad variable stops as a whole, naming it, with exit code 2.
 */

/** Every line each process logged, parsed; lines that are not JSON are kept as `raw`. */
function logsOf(farm: Farm): Map<string, Array<{ msg?: string; level?: number; raw?: string; [k: string]: unknown }>> {
  const out = new Map<string, Array<{ msg?: string; raw?: string }>>();
  for (const file of readdirSync(farm.logDir)) {
    const lines = readFileSync(resolve(farm.logDir, file), 'utf8').split('\n').filter((l) => l.trim());
    out.set(file.replace(/\.log$/, ''), lines.map((l) => {
      try {
        return JSON.parse(l);
      } catch {
        return { raw: l };
      }
    }));
  }
  return out;
}

describe('a Redis outage is not an agent death', () => {
  const redis = new RedisServer();
  // the agents reach Redis through a relay the test can cut, so they can come back after the
  // dispatcher does (other hosts, other backoff): the case the dispatcher must wait out
  const agentLink = new TcpProxy(() => redis.port);
  // jobs of about eight seconds (32 steps of 250 ms at 1024²), so they run across the outage
  let farm: Farm;
  const slow = (seed: number) => basicRequest({ scheduler: { type: 'EulerDiscreteScheduler', steps: 32 }, hyperparameters: { seed, width: 1024, height: 1024 } });

  beforeAll(async () => {
    await redis.start();
    await agentLink.start();
    farm = new Farm({ agents: 2, redisUrl: redis.url, env: { KILN_SYNTHETIC_STEP_MS: '250', AGENT_TTL_MS: '3000' }, agentEnv: () => ({ REDIS_URL: agentLink.url }) });
    await farm.start();
  });
  afterAll(async () => {
    redis.thaw();
    await farm?.close().catch(() => {});
    await agentLink.close();
    await redis.close();
  });

  async function runningPair(seeds: number[]): Promise<GenRecord[]> {
    const jobs = await Promise.all(seeds.map((s) => farm.submit(slow(s))));
    await farm.waitFor(async () => {
      const now = await Promise.all(jobs.map((j) => farm.job(j.id)));
      return now.some((j) => j.stage === 'running' && (j.progress?.step ?? 0) >= 1);
    }, 30_000, 'a job running');
    return jobs;
  }

  async function expectNobodyLost(jobs: GenRecord[]): Promise<void> {
    const done = await Promise.all(jobs.map((j) => farm.waitForDone(j.id, 90_000)));
    for (const j of done) {
      expect(j.status, JSON.stringify(j.error)).toBe('succeeded');
      expect(j.attempt).toBe(1); // not re-placed
      expect(j.events.some((e) => /agent_lost|handed back/.test(e.message ?? '')), JSON.stringify(j.events)).toBe(false);
    }
    const dispatcher = logsOf(farm).get('dispatcher')!;
    expect(dispatcher.filter((l) => /agent removed|agent lost/.test(l.msg ?? '')).map((l) => l.msg)).toEqual([]);
    expect((await farm.agents()).map((a) => a.agent_id).sort()).toEqual(['agent-0', 'agent-1']);
  }

  it('Redis stopped for about five seconds and restarted, the agents back a second after the dispatcher: no agent declared lost, no job re-placed, no attempt spent; one warning when it went and one when it came back', async () => {
    const jobs = await runningPair([1, 2]);
    await Promise.all([redis.stop(), agentLink.cut()]);
    const t0 = Date.now();
    await sleep(5_000); // longer than AGENT_TTL_MS (3 s): every heartbeat has expired when Redis is back
    await redis.start();
    const downMs = Date.now() - t0;
    await sleep(1_000);
    await agentLink.restore();
    await expectNobodyLost(jobs);

    for (const [name, lines] of logsOf(farm)) {
      // BullMQ prints errors of objects without an `error` listener with console.error: never
      // here (Node's own one-off process warnings at start are not about the outage)
      const raw = lines.filter((l) => l.raw && !/^\(node:\d+\) |^\(Use `node --trace-warnings/.test(l.raw)).map((l) => l.raw);
      expect(raw.slice(0, 5), `${name}: lines that are not JSON`).toEqual([]);
      expect(lines.filter((l) => /Unhandled error event|unhandled rejection/i.test(JSON.stringify(l))), name).toEqual([]);
      const lost = lines.filter((l) => l.msg === 'lost the connection to Redis; retrying');
      const back = lines.filter((l) => /^Redis is back after/.test(l.msg ?? ''));
      expect(lost, `${name}: outage warnings`).toHaveLength(1);
      expect(back, `${name}: recovery warnings`).toHaveLength(1);
      expect(back[0]!.down_ms as number).toBeGreaterThanOrEqual(downMs - 1_500);
      expect(back[0]!.down_ms as number).toBeLessThan(downMs + 4_000);
      // no stack traces for an expected reconnect
      expect(lines.filter((l) => JSON.stringify(l).includes('    at ')).map((l) => l.msg), name).toEqual([]);
    }
  }, 150_000);

  it('Redis stalled past AGENT_TTL_MS, the dispatcher still connected and the agents not yet back: every agent lapsed at once, and nobody is failed over', async () => {
    const jobs = await runningPair([3, 4]);
    redis.freeze();
    await agentLink.cut();
    await sleep(4_000); // AGENT_TTL_MS is 3000: every heartbeat expires the moment Redis runs again
    redis.thaw();
    await sleep(1_000);
    await agentLink.restore();
    await expectNobodyLost(jobs);
  }, 150_000);
});

describe('atomic ends: an end whose announcement a crash interrupted is announced by the sweep', () => {
  const farm = new Farm({ agents: 0 });
  const receiver = new WebhookReceiver();
  beforeAll(async () => {
    await receiver.start();
    await farm.start();
  });
  afterAll(async () => {
    await farm.close();
    await receiver.close();
  });

  it('a job ended by a process that died right after its terminal write still gets its webhook, and its batch closes with its own', async () => {
    // what a crashed agent leaves: the terminal writes done (one script each), nothing after them
    const keys = new Keys(farm.prefix);
    const store = new JobStore(farm.redis, keys, 3_600);
    const groups = new GroupStore(farm.redis, keys, 3_600);
    const batchId = randomUUID();
    const now = new Date().toISOString();
    const request = (seed: number) =>
      ResolvedGenerationRequest.parse({ model: { base: 'stabilityai/stable-diffusion-xl-base-1.0' }, conditioning: { prompt: 'x' }, hyperparameters: { seed }, webhook: { url: receiver.url, events: ['completed'] } });
    const children = [1, 2].map((seed) => ({ ...newJobFields(randomUUID(), 'anonymous', 'normal', batchId, now), kind: 'generation' as const, request: request(seed), status: 'running' as const, attempt: 1, agent: 'gone' }));
    await groups.create({ id: batchId, kind: 'batch', client: 'anonymous', status: 'running', priority: 'normal', children: children.map((c) => c.id), webhook: { url: receiver.url, events: ['completed'] }, cancel_requested: false, created_at: now, finished_at: null });
    for (const c of children) {
      await store.create(c);
      expect(await store.update(c.id, { status: ['running'], attempt: 1 }, { status: 'succeeded', stage: 'done', finished_at: now })).not.toBeNull();
    }
    // the dispatcher's sweep (every SWEEP_INTERVAL_MS) makes the announcements
    await farm.waitFor(async () => receiver.received.length >= 3, 15_000, 'two job webhooks and the batch webhook');
    await sleep(2_500); // another sweep: nothing is announced twice
    const types = receiver.received.map((r) => JSON.parse(r.body).type).sort();
    expect(types).toEqual(['batch.completed', 'job.completed', 'job.completed']);
    expect((await groups.get(batchId))!.status).toBe('succeeded');
    expect((await groups.history(batchId)).events.filter((e) => e.status === 'succeeded')).toHaveLength(1);
  });
});

describe('a farm with a bad variable stops as a whole, naming it, with exit code 2', () => {
  let running: ReturnType<typeof startProcess> | null = null;
  afterEach(() => {
    if (running?.pid && running.exitCode === null) {
      try {
        process.kill(-running.pid, 'SIGKILL');
      } catch {}
    }
  });

  async function farmWith(env: Record<string, string>): Promise<{ code: number | undefined; output: string; prefix: string }> {
    const prefix = `kiln-badenv-${randomUUID().slice(0, 8)}`;
    const port = await freePort();
    running = startProcess(resolve(REPO_ROOT, 'scripts/farm.ts'), {
      PORT: String(port),
      S3_PORT: String(await freePort()),
      KILN_PREFIX: prefix,
      AGENTS: '2',
      AGENT_ID_PREFIX: `${prefix}-gpu`,
      LOG_FORMAT: 'json',
      ...env,
    }, 'pipe', { detached: true });
    let output = '';
    running.stdout!.on('data', (d) => (output += d));
    running.stderr!.on('data', (d) => (output += d));
    const timer = setTimeout(() => running?.kill('SIGKILL'), 60_000);
    const r = await running;
    clearTimeout(timer);
    await sleep(200);
    return { code: r.exitCode, output, prefix };
  }

  it('an agent that refuses its configuration (HEARTBEAT_MS=-5) stops the farm with its message and code 2', async () => {
    const { code, output, prefix } = await farmWith({ HEARTBEAT_MS: '-5' });
    expect(code, output.slice(-2000)).toBe(2);
    expect(output).toMatch(/kiln gpu-agent: invalid configuration:[\s\S]*HEARTBEAT_MS/);
    expect(output).toContain('bad configuration');
    expect(leakedProcesses(prefix)).toEqual([]);
  }, 90_000);

  it('PORT=-1 is reported as a bad PORT, not as a bad PUBLIC_URL, with code 2', async () => {
    const { code, output, prefix } = await farmWith({ PORT: '-1' });
    expect(code, output.slice(-2000)).toBe(2);
    expect(output).toMatch(/kiln api: invalid configuration:[\s\S]*PORT/);
    expect(output).not.toContain('PUBLIC_URL');
    expect(leakedProcesses(prefix)).toEqual([]);
  }, 90_000);
});
