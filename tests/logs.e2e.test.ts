import { randomUUID } from 'node:crypto';
import { mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { execa } from 'execa';
import { Redis } from 'ioredis';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { REPO_ROOT, startProcess } from '../scripts/farm-lib.js';
import { REDIS_URL, sleep } from './support/farm.js';

/**
 * What an operator's terminal shows for the README walk-through against `npm start`, at the
 * default level in pretty mode: one line per entry, the story of each job, no request noise —
 * a screenful, not thousands of lines.
 */
describe('logs that tell the story', () => {
  const prefix = `kiln-logs-${randomUUID().slice(0, 8)}`;
  const port = 20000 + Math.floor(Math.random() * 12000); // below the ephemeral range (32768+) other farms' ports come from
  const api = `http://127.0.0.1:${port}`;
  const cwd = mkdtempSync(join(tmpdir(), 'kiln-logs-'));
  const redis = new Redis(REDIS_URL);
  let farm: ReturnType<typeof startProcess>;
  let out = '';

  beforeAll(async () => {
    // the default farm (two agents) at the default level; pretty forced, as a terminal would get it
    farm = startProcess(resolve(REPO_ROOT, 'scripts/farm.ts'), {
      PORT: String(port),
      S3_PORT: String(port + 1),
      METRICS_PORT_BASE: String(port + 2),
      KILN_PREFIX: prefix,
      AGENT_ID_PREFIX: `${prefix}-gpu`,
      LOG_FORMAT: 'pretty',
      KILN_SYNTHETIC_LOAD_MS_PER_GB: '50',
    }, 'pipe', { detached: true });
    farm.stdout!.on('data', (d) => (out += d));
    farm.stderr!.on('data', (d) => (out += d));
    const deadline = Date.now() + 60_000;
    for (;;) {
      const agents = (await fetch(`${api}/v1/agents`).then((r) => r.json()).catch(() => null)) as { agents: { state: string }[] } | null;
      if (agents?.agents.filter((a) => a.state === 'ready').length === 2) break;
      if (Date.now() > deadline) throw new Error(`npm start did not come up:\n${out.slice(-3000)}`);
      await sleep(200);
    }
  }, 90_000);

  afterAll(async () => {
    if (farm.exitCode === null && farm.pid) {
      try {
        process.kill(-farm.pid, 'SIGKILL');
      } catch {}
    }
    const keys = await redis.keys(`${prefix}:*`);
    if (keys.length) await redis.del(...keys);
    redis.disconnect();
    rmSync(cwd, { recursive: true, force: true });
  });

  it('the walk-through, start to Ctrl-C, is a few dozen one-line entries that tell each job’s story', async () => {
    const readme = readFileSync(resolve(REPO_ROOT, 'README.md'), 'utf8');
    const block = readme.split('<!-- walkthrough:start -->')[1]!.split('<!-- walkthrough:end -->')[0]!.replace(/^```sh\n|```\s*$/gm, '');
    const run = await execa('bash', ['-euo', 'pipefail', '-c', block], { cwd, env: { KILN: api }, reject: false, timeout: 90_000, all: true });
    expect(run.exitCode, run.all).toBe(0);
    const polls = (run.stdout!.match(/^status: /gm) ?? []).length;
    await sleep(500);
    process.kill(-farm.pid!, 'SIGINT');
    expect((await farm).exitCode, out.slice(-3000)).toBe(0);

    // eslint-disable-next-line no-control-regex
    const lines = out.replace(/\x1b\[[0-9;]*m/g, '').split('\n').filter((l) => l.trim() !== '');
    const logDir = resolve(REPO_ROOT, '.kiln/test-logs', prefix);
    mkdirSync(logDir, { recursive: true });
    writeFileSync(join(logDir, 'terminal.log'), out); // what the terminal showed, for a look
    // every line is one whole entry: a timestamped log line or the farm's own [kiln] line
    const strays = lines.filter((l) => !/^\[\d\d:\d\d:\d\d\.\d{3}\] [A-Z]+ \(/.test(l) && !l.startsWith('[kiln] '));
    expect(strays, lines.join('\n')).toEqual([]);
    // the story of each job, not the requests that polled it
    const story = (msg: string) => lines.filter((l) => l.includes(msg)).length;
    expect(story('job submitted')).toBe(2);
    expect(story('job placed on')).toBe(2);
    expect(story('job started')).toBe(2);
    expect(story('job succeeded')).toBe(1);
    expect(story('job canceled')).toBe(1);
    // the finished job always logs its base stage; the canceled one only if the cancel landed after
    // its first step (the walk-through cancels once the record says running, which it says as the
    // attempt starts, before the worker's first progress)
    expect(story('job stage base')).toBeGreaterThanOrEqual(1);
    expect(story('job stage base')).toBeLessThanOrEqual(2);
    expect(lines.filter((l) => /job (submitted|placed|started|stage|succeeded|canceled)/.test(l)).every((l) => l.includes('"job":') || l.includes('job: '))).toBe(true);
    expect(lines.filter((l) => / GET \/v1\/jobs/.test(l))).toEqual([]);
    expect(polls).toBeGreaterThan(0);
    // a screenful: start-up, two jobs' stories and the drain
    expect(lines.length, lines.join('\n')).toBeLessThanOrEqual(60);
  }, 150_000);
});
