import { mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { execa } from 'execa';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { REPO_ROOT } from '../scripts/farm-lib.js';
import { Farm, pngSize } from './support/farm.js';
import { gradientPng, shapesPng } from './support/images.js';

/**
 * The kiln command, driven as a user would against a real farm: KILN_URL and KILN_API_KEY from
 * the environment, human output and --json, --wait with its live progress (a bar in a
 * pseudo-terminal), outputs downloaded, uploads and a training from a local folder, and the
 * exit codes scripts rely on.
 */

const KEY = 'acme-cli-key-0123456789abcdef';
const BIN = resolve(REPO_ROOT, 'packages/client/bin/kiln.mjs');

describe('the kiln command', () => {
  const farm = new Farm({ agents: 1, apiKey: KEY, env: { API_KEYS: `acme:${KEY}`, KILN_SYNTHETIC_STEP_MS: '20', KILN_SYNTHETIC_TRAIN_STEP_MS: '5' } });
  let dir = '';
  const env = () => ({ KILN_URL: farm.api, KILN_API_KEY: KEY });
  const kiln = (...args: string[]) => execa('node', [BIN, ...args], { cwd: dir, env: env(), reject: false, timeout: 120_000 });
  const json = async (...args: string[]) => {
    const r = await kiln('--json', ...args);
    expect(r.exitCode, `kiln ${args.join(' ')}\n${r.stderr}\n${r.stdout}`).toBe(0);
    return JSON.parse(r.stdout);
  };

  beforeAll(async () => {
    await farm.start();
    dir = mkdtempSync(join(tmpdir(), 'kiln-cli-'));
  }, 120_000);
  afterAll(async () => {
    await farm.close();
    rmSync(dir, { recursive: true, force: true });
  });

  it('runs as `npx kiln` from the repo, with KILN_URL and KILN_API_KEY from the environment', async () => {
    const r = await execa('npx', ['kiln', '--json', 'agents'], { cwd: REPO_ROOT, env: env(), reject: false, timeout: 60_000 });
    expect(r.exitCode, r.stderr).toBe(0);
    expect(JSON.parse(r.stdout).map((a: { agent_id: string }) => a.agent_id)).toEqual(['agent-0']);
    const human = await kiln('agents');
    expect(human.stdout).toMatch(/^agent-0\s+(ready|busy)/);
  });

  it('submit --wait follows the job to its end and downloads its outputs; get and ls show it', async () => {
    const job = await json('submit', 'a lighthouse at dusk', '--steps', '4', '--size', '256x256', '--seed', '7', '-n', '2', '--wait', '--out', 'out');
    expect(job.status).toBe('succeeded');
    const files = readdirSync(join(dir, 'out')).sort();
    expect(files).toEqual([`${job.id}-0.png`, `${job.id}-1.png`]);
    expect(pngSize(readFileSync(join(dir, 'out', files[0]!)))).toEqual({ width: 256, height: 256 });
    expect(job.request).toMatchObject({ conditioning: { prompt: 'a lighthouse at dusk' }, hyperparameters: { seed: 7, num_images: 2, width: 256, height: 256 } });
    const got = await kiln('get', job.id);
    expect(got.stdout).toContain(`${job.id}  generation  succeeded`);
    expect(got.stdout).toContain('output 1: 256×256 seed 8');
    const listed = await json('ls', '--limit', '5');
    expect(listed[0].id).toBe(job.id);
    // without a terminal, --wait narrates each state change on stderr
    const plain = await kiln('submit', 'a fox', '--steps', '2', '--size', '128x128', '--wait', '--out', 'out');
    expect(plain.exitCode, plain.stderr).toBe(0);
    expect(plain.stderr).toMatch(/queued · queued · submitted/);
    expect(plain.stderr).toMatch(/succeeded · done/);
    expect(plain.stdout).toMatch(/generation {2}succeeded/);
  });

  // the long job runs about 24 s here (150 steps of eight 1024² images at 20 ms per image-step), so
  // the cancel, three CLI starts later, lands while it runs even on a loaded machine
  it('a request from a file, cancel, retry, queue and models', async () => {
    writeFileSync(join(dir, 'long.json'), JSON.stringify({ model: { base: 'stabilityai/stable-diffusion-xl-base-1.0' }, scheduler: { steps: 150 }, hyperparameters: { width: 1024, height: 1024, num_images: 8 }, conditioning: { prompt: 'a long render' } }));
    const long = await json('submit', '--file', 'long.json', '--seed', '3');
    expect(long.request.hyperparameters.seed).toBe(3);
    expect((await json('queue')).agents.total).toBe(1);
    const canceled = await json('cancel', long.id);
    expect(canceled.cancel_requested).toBe(true);
    await farm.waitForDone(long.id);
    const retried = await json('retry', long.id);
    expect(retried.retry_of).toBe(long.id);
    expect((await kiln('cancel', retried.id)).exitCode).toBe(0);
    const models = await kiln('models');
    expect(models.stdout).toContain('stabilityai/stable-diffusion-xl-base-1.0');
    await farm.waitForDone(retried.id);
  });

  it('upload puts a file in the tenant area; train uploads a folder and trains a LoRA on it', async () => {
    writeFileSync(join(dir, 'scene.png'), await gradientPng(64, 64));
    const up = await json('upload', 'scene.png');
    expect(up.s3_key).toMatch(/^tenants\/acme\/uploads\/.+\.png$/);
    mkdirSync(join(dir, 'kilns'));
    writeFileSync(join(dir, 'kilns/1.png'), await gradientPng(64, 64));
    writeFileSync(join(dir, 'kilns/1.txt'), 'a kiln');
    writeFileSync(join(dir, 'kilns/2.png'), await shapesPng(64, 64));
    writeFileSync(join(dir, 'kilns/2.txt'), 'a kiln at night');
    const training = await json('train', '--dataset', 'kilns', '--name', 'cli-style', '--steps', '4', '--rank', '4', '--resolution', '256', '--wait');
    expect(training.status).toBe('succeeded');
    expect(training.training.lora.name).toBe('acme/cli-style');
    expect(training.request.dataset.items.map((i: { image: string }) => i.image)).toEqual(['tenants/acme/uploads/datasets/cli-style/1.png', 'tenants/acme/uploads/datasets/cli-style/2.png']);
    const use = await json('submit', 'in the style', '--lora', 'cli-style:0.8', '--steps', '2', '--size', '128x128', '--wait');
    expect(use.request.loras).toEqual([{ name: 'acme/cli-style', weight: 0.8 }]);
  });

  it('exit codes: 2 for a bad command line, 1 for a refusal (with the code and the field) or a job that did not succeed', async () => {
    expect((await kiln('submit')).exitCode).toBe(2);
    expect((await kiln('submit', 'x', '--steps', 'many')).exitCode).toBe(2);
    expect((await kiln('frobnicate')).exitCode).toBe(2);
    const refused = await kiln('submit', 'x', '--model', 'no/such-model');
    expect(refused.exitCode).toBe(1);
    expect(refused.stderr).toContain('422 unschedulable');
    expect(refused.stderr).toContain('model.base');
    const badKey = await execa('node', [BIN, 'agents'], { env: { KILN_URL: farm.api, KILN_API_KEY: 'not-a-key-not-a-key' }, reject: false });
    expect(badKey.exitCode).toBe(1);
    expect(badKey.stderr).toContain('401 unauthorized');
    writeFileSync(join(dir, 'timeout.json'), JSON.stringify({ model: { base: 'stabilityai/stable-diffusion-xl-base-1.0' }, scheduler: { steps: 150 }, hyperparameters: { width: 1024, height: 1024 }, conditioning: { prompt: 'x' }, timeout_s: 1 }));
    const timedOut = await kiln('submit', '--file', 'timeout.json', '--wait');
    expect(timedOut.exitCode).toBe(1);
    expect(timedOut.stdout).toContain('error: timeout');
  }, 60_000);

  it('in a terminal, --wait draws a live progress bar with the stages', async () => {
    const cmd = `node ${BIN} submit 'a lighthouse, slowly' --steps 40 --size 1024x1024 --wait --out tty`;
    const r = await execa('script', ['-qefc', cmd, '/dev/null'], { cwd: dir, env: { ...env(), TERM: 'xterm-256color', COLUMNS: '120' }, reject: false, timeout: 60_000 });
    expect(r.exitCode, r.stdout).toBe(0);
    const screen = r.stdout;
    expect(screen).toMatch(/█+░*/); // the bar, drawn and redrawn
    expect(screen).toMatch(/base\s+\|[█░]+\| \d+\/40 steps/);
    expect((screen.match(/\x1b\[1G/g) ?? []).length).toBeGreaterThan(5); // redrawn in place, line after line
    expect(screen).toMatch(/(queued|dispatched|loading_model|running) +\|[░█]+\|[\s\S]*base +\|/); // the stages as they come
    // the base stage's bar is drawn full; whether a frame catches it still `running` or only as the
    // job moves on (uploading, done) depends on when the stream's reads land, not on the client
    expect(screen).toMatch(/\| 40\/40 steps · (running|uploading|succeeded)/);
    expect(screen).toMatch(/done +\|█+\| \d+\/\d+ steps · succeeded/); // full at the end
    expect(readdirSync(join(dir, 'tty'))).toHaveLength(1);
  });
});
