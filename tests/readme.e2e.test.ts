import { existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { randomUUID } from 'node:crypto';
import { execa } from 'execa';
import { Redis } from 'ioredis';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { REPO_ROOT, startProcess } from '../scripts/farm-lib.js';
import { leakedProcesses, pngSize, REDIS_URL, sleep } from './support/farm.js';

/**
 * The README's walk-through, run verbatim against `npm start` (scripts/farm.ts), then Ctrl-C
 * the way a terminal sends it: SIGINT to the farm's whole process group.
 */
describe('README walk-through against npm start', () => {
  const prefix = `kiln-readme-${randomUUID().slice(0, 8)}`;
  const port = 20000 + Math.floor(Math.random() * 12000); // below the ephemeral range (32768+) other farms' ports come from
  const api = `http://127.0.0.1:${port}`;
  const redis = new Redis(REDIS_URL);
  const cwd = mkdtempSync(join(tmpdir(), 'kiln-readme-'));
  let farm: ReturnType<typeof startProcess>;
  let logs = '';

  beforeAll(async () => {
    // detached: the farm leads a process group of its own, as `npm start` does in a terminal
    farm = startProcess(resolve(REPO_ROOT, 'scripts/farm.ts'), {
      PORT: String(port),
      S3_PORT: String(port + 1),
      KILN_PREFIX: prefix,
      AGENTS: '1',
      AGENT_ID_PREFIX: `${prefix}-gpu`,
      LOG_FORMAT: 'json',
      KILN_SYNTHETIC_LOAD_MS_PER_GB: '50',
    }, 'pipe', { detached: true });
    farm.stdout!.on('data', (d) => (logs += d));
    farm.stderr!.on('data', (d) => (logs += d));
    const deadline = Date.now() + 60_000;
    for (;;) {
      const agents = await fetch(`${api}/v1/agents`).then((r) => r.json()).catch(() => null) as { agents: { state: string }[] } | null;
      if (agents?.agents.some((a) => a.state === 'ready')) break;
      if (Date.now() > deadline) throw new Error(`npm start did not come up:\n${logs.slice(-3000)}`);
      await sleep(200);
    }
  });

  afterAll(async () => {
    if (farm.exitCode === null && farm.pid) {
      try {
        process.kill(-farm.pid, 'SIGKILL');
      } catch {}
    }
    // leave nothing behind: the job records and queues, the objects the jobs wrote, the scratch folder
    const keys = await redis.keys(`${prefix}:*`);
    const outputs = new Set<string>();
    for (const k of keys.filter((k) => /:job:[^:]+$/.test(k))) {
      for (const o of JSON.parse((await redis.hget(k, 'outputs')) ?? '[]') as { key: string }[]) outputs.add(o.key);
    }
    for (const key of outputs) {
      // s3rver keeps an object as <dir>/<bucket>/<key>._S3rver_object (+ metadata files)
      const dir = resolve(REPO_ROOT, '.kiln/s3/kiln', dirname(key));
      if (dir.startsWith(resolve(REPO_ROOT, '.kiln/s3/kiln/outputs/'))) rmSync(dir, { recursive: true, force: true });
    }
    if (keys.length) await redis.del(...keys);
    redis.disconnect();
    rmSync(cwd, { recursive: true, force: true });
  });

  it('runs every step of the walk-through successfully', async () => {
    const readme = readFileSync(resolve(REPO_ROOT, 'README.md'), 'utf8');
    const block = readme.split('<!-- walkthrough:start -->')[1]!.split('<!-- walkthrough:end -->')[0]!.replace(/^```sh\n|```\s*$/gm, '');
    const run = await execa('bash', ['-euo', 'pipefail', '-c', block], { cwd, env: { KILN: api }, reject: false, timeout: 90_000, all: true });
    expect(run.exitCode, run.all).toBe(0);
    expect(run.all).toContain('status: succeeded');
    expect(pngSize(readFileSync(join(cwd, 'lighthouse.png')))).toEqual({ width: 512, height: 512 });
    const last = JSON.parse(run.stdout!.trim().split('\n').at(-1)!);
    expect(last.status).toBe('canceled');
    expect(last.error.code).toBe('canceled');
  });

  it('Ctrl-C (SIGINT to the whole process group) drains every process once: the running job finishes, nothing is left running', async () => {
    // a job of about three seconds, running when the terminal's Ctrl-C arrives
    const res = await fetch(`${api}/v1/generations`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ model: { base: 'stabilityai/stable-diffusion-xl-base-1.0' }, scheduler: { steps: 60 }, conditioning: { prompt: 'still running at Ctrl-C' } }),
    });
    expect(res.status).toBe(202);
    const id = ((await res.json()) as { id: string }).id;
    for (let i = 0; ; i++) {
      const job = (await (await fetch(`${api}/v1/jobs/${id}`)).json()) as { stage: string; progress: { step: number } | null };
      if (job.stage === 'running' && (job.progress?.step ?? 0) >= 1) break;
      if (i > 300) throw new Error(`job never ran:\n${logs.slice(-3000)}`);
      await sleep(50);
    }
    process.kill(-farm.pid!, 'SIGINT');
    const r = await farm;
    expect(r.exitCode, logs.slice(-3000)).toBe(0);
    // each process drained (one signal each) instead of being forced by a second one
    expect(logs).not.toContain('second signal: forcing exit');
    expect(logs).not.toContain('not cleanly');
    expect(leakedProcesses(prefix)).toEqual([]);
    // the running job was finished by the draining agent: not left running, not retried next start
    const [status, attempt] = await redis.hmget(`${prefix}:job:${id}`, 'status', 'attempt');
    expect(JSON.parse(status!)).toBe('succeeded');
    expect(JSON.parse(attempt!)).toBe(1);
    expect(existsSync(cwd)).toBe(true); // removed in afterAll, with the keys and objects
  });
});
