import { mkdtempSync, readFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { randomUUID } from 'node:crypto';
import { execa } from 'execa';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { REPO_ROOT, startProcess } from '../scripts/farm-lib.js';
import { leakedProcesses, pngSize } from './support/farm.js';

/** The README's walk-through, run verbatim against `npm start` (scripts/farm.ts). */
describe('README walk-through against npm start', () => {
  const prefix = `kiln-readme-${randomUUID().slice(0, 8)}`;
  const port = 20000 + Math.floor(Math.random() * 20000);
  const api = `http://127.0.0.1:${port}`;
  let farm: ReturnType<typeof startProcess>;
  let logs = '';

  beforeAll(async () => {
    farm = startProcess(resolve(REPO_ROOT, 'scripts/farm.ts'), {
      PORT: String(port),
      S3_PORT: String(port + 1),
      KILN_PREFIX: prefix,
      AGENTS: '1',
      AGENT_ID_PREFIX: `${prefix}-gpu`,
      LOG_FORMAT: 'json',
      KILN_SYNTHETIC_LOAD_MS_PER_GB: '50',
    }, 'pipe');
    farm.stdout!.on('data', (d) => (logs += d));
    farm.stderr!.on('data', (d) => (logs += d));
    const deadline = Date.now() + 60_000;
    for (;;) {
      const agents = await fetch(`${api}/v1/agents`).then((r) => r.json()).catch(() => null) as { agents: { state: string }[] } | null;
      if (agents?.agents.some((a) => a.state === 'ready')) break;
      if (Date.now() > deadline) throw new Error(`npm start did not come up:\n${logs.slice(-3000)}`);
      await new Promise((r) => setTimeout(r, 200));
    }
  });

  afterAll(async () => {
    if (farm.exitCode === null) farm.kill('SIGKILL');
  });

  it('runs every step of the walk-through successfully', async () => {
    const readme = readFileSync(resolve(REPO_ROOT, 'README.md'), 'utf8');
    const block = readme.split('<!-- walkthrough:start -->')[1]!.split('<!-- walkthrough:end -->')[0]!.replace(/^```sh\n|```\s*$/gm, '');
    const cwd = mkdtempSync(join(tmpdir(), 'kiln-readme-'));
    const run = await execa('bash', ['-euo', 'pipefail', '-c', block], { cwd, env: { KILN: api }, reject: false, timeout: 90_000, all: true });
    expect(run.exitCode, run.all).toBe(0);
    expect(run.all).toContain('status: succeeded');
    expect(pngSize(readFileSync(join(cwd, 'lighthouse.png')))).toEqual({ width: 512, height: 512 });
    const last = JSON.parse(run.stdout!.trim().split('\n').at(-1)!);
    expect(last.status).toBe('canceled');
    expect(last.error.code).toBe('canceled');
  });

  it('Ctrl-C stops every process of the farm cleanly', async () => {
    farm.kill('SIGINT');
    const r = await farm;
    expect(r.exitCode, logs.slice(-3000)).toBe(0);
    expect(leakedProcesses(prefix)).toEqual([]);
  });
});
