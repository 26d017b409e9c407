import { execFileSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { type CheckpointMessage, type ProgressMessage, ResolvedGenerationRequest, ResolvedTrainingRequest } from '@kiln/contracts';
import { KilnError } from '@kiln/runtime';
import { pino } from 'pino';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { type WorkerCommand, WorkerProcess } from './worker-process.js';

// Drives real Python processes: the synthetic worker for the happy paths and one tiny fixture
// per failure mode (test/fixtures/*.py) for the rest.

const repoRoot = resolve(import.meta.dirname, '../../..');
const workersPy = join(repoRoot, 'workers-py');
const python = join(workersPy, '.venv/bin/python');
const fixtures = resolve(import.meta.dirname, '../test/fixtures');
const log = pino({ level: 'silent' });
const START_TIMEOUT_MS = 20_000;
const MODEL = 'stabilityai/stable-diffusion-xl-base-1.0';
const VAE = 'madebyollin/sdxl-vae-fp16-fix';
const TURBO = 'stabilityai/sdxl-turbo';

const realWorker: WorkerCommand = {
  file: python,
  args: ['-m', 'kiln_worker'],
  cwd: workersPy,
  // 256² images: 160 ms per 1024² step → 10 ms per step; model loads take ~35 ms; training steps are free
  env: { KILN_BACKEND: 'synthetic', KILN_SYNTHETIC_STEP_MS: '160', KILN_SYNTHETIC_LOAD_MS_PER_GB: '5', KILN_SYNTHETIC_TRAIN_STEP_MS: '0', PYTHONDONTWRITEBYTECODE: '1' },
};

const fixture = (name: string): WorkerCommand => ({
  file: python,
  args: [join(fixtures, `${name}.py`)],
  cwd: fixtures,
  env: { PYTHONUNBUFFERED: '1', PYTHONDONTWRITEBYTECODE: '1' },
});

interface Spawned {
  worker: WorkerProcess;
  /** what the worker reported on 'exit', subscribed before it starts so no exit is missed */
  exited: Promise<KilnError | null>;
}

let spawned: Spawned[] = [];
let jobDir = '';

function spawnWorker(cmd: WorkerCommand, logger = log): Spawned {
  const worker = new WorkerProcess(cmd, logger);
  const exited = new Promise<KilnError | null>((r) => worker.once('exit', r));
  const s = { worker, exited };
  spawned.push(s);
  return s;
}

/** A logger that keeps what it writes, to check what reaches the agent's log. */
function capturingLog() {
  const lines: string[] = [];
  // at info, the agent's default: stderr lines logged one by one at debug do not count
  const logger = pino({ level: 'info' }, { write: (line: string) => void lines.push(line) });
  return { logger, text: () => lines.join('') };
}

function isAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}

function request(opts: { steps?: number; prompt?: string } = {}) {
  return ResolvedGenerationRequest.parse({
    model: { base: MODEL },
    scheduler: { steps: opts.steps ?? 5 },
    hyperparameters: { seed: 7, width: 256, height: 256 },
    conditioning: { prompt: opts.prompt ?? 'a kiln at night' },
  });
}

function generateMsg(opts: { steps?: number; prompt?: string } = {}) {
  return { job_id: 'job-1', attempt: 1, job_dir: jobDir, files: {}, request: request(opts) };
}

const sha256Of = (path: string) => createHash('sha256').update(readFileSync(path)).digest('hex');

/** A dataset directory of `<index>.png` images (tiny solid squares, written by the worker's own PNG encoder). */
function writeDataset(dir: string, colors: [number, number, number][]): void {
  mkdirSync(dir, { recursive: true });
  const script = `
import json, sys
import numpy as np
from kiln_worker.png import write_png
for i, rgb in enumerate(json.loads(sys.argv[2])):
    write_png(f"{sys.argv[1]}/{i}.png", np.full((32, 32, 3), rgb, dtype=np.uint8))
`;
  execFileSync(python, ['-c', script, dir, JSON.stringify(colors)], { cwd: workersPy });
}

function trainMsg(datasetDir: string, steps: number, checkpointEvery: number) {
  const request = ResolvedTrainingRequest.parse({
    base_model: MODEL,
    dataset: {
      items: [
        { image: 'datasets/squares/0.png', caption: 'a red square' },
        { image: 'datasets/squares/1.png', caption: 'a blue square' },
      ],
    },
    output: { name: 'test/squares' },
    hyperparameters: { resolution: 256, steps, checkpoint_every: checkpointEvery, seed: 3 },
  });
  return { job_id: 'train-job-1', attempt: 1, job_dir: jobDir, dataset_dir: datasetDir, resume: null, request };
}

/** Resolves with the first progress message of `stage`, so a test can act mid-request. */
function progressTracker() {
  const seen: ProgressMessage[] = [];
  let notify: (m: ProgressMessage) => void = () => {};
  const firstRunning = new Promise<ProgressMessage>((r) => (notify = r));
  return {
    seen,
    firstRunning,
    onProgress: (m: ProgressMessage) => {
      seen.push(m);
      if (m.stage === 'base') notify(m);
    },
  };
}

async function rejection(p: Promise<unknown>): Promise<KilnError> {
  const err = await p.then(
    () => {
      throw new Error('expected the promise to reject, but it resolved');
    },
    (e: unknown) => e,
  );
  expect(err).toBeInstanceOf(KilnError);
  return err as KilnError;
}

beforeEach(() => {
  jobDir = mkdtempSync(join(tmpdir(), 'kiln-worker-test-'));
});

afterEach(async () => {
  const leaked: number[] = [];
  for (const { worker } of spawned) {
    const pid = worker.pid;
    if (pid !== null && isAlive(pid)) {
      leaked.push(pid);
      process.kill(pid, 'SIGKILL'); // clean up, then fail the test that leaked it
    }
  }
  spawned = [];
  rmSync(jobDir, { recursive: true, force: true });
  expect(leaked, `test left worker processes running: ${leaked.join(', ')}`).toEqual([]);
});

describe('WorkerProcess with the real synthetic worker', () => {
  it('starts, reports its capabilities, and runs a generation with progress to an output file', async () => {
    const { worker, exited } = spawnWorker(realWorker);
    const ready = await worker.start('agent-test', '0', START_TIMEOUT_MS);
    expect(worker.state).toBe('ready');
    expect(ready.worker.pid).toBe(worker.pid);
    expect(ready.capabilities.backend).toBe('synthetic');
    expect(ready.capabilities.models.map((m) => m.name)).toContain(MODEL);
    expect(ready.capabilities.schedulers).toContain('EulerDiscreteScheduler');

    const progress = progressTracker();
    const { done } = worker.generate(generateMsg({ steps: 5 }), progress.onProgress);
    expect(worker.state).toBe('busy');
    const result = await done;
    expect(worker.state).toBe('ready');

    const running = progress.seen.filter((p) => p.stage === 'base');
    expect(running.map((p) => p.step)).toEqual([1, 2, 3, 4, 5]);
    expect(running.every((p) => p.total === 5)).toBe(true);
    expect(result.outputs).toHaveLength(1);
    const out = result.outputs[0]!;
    expect(out).toMatchObject({ width: 256, height: 256, seed: 7, content_type: 'image/png' });
    expect(out.path.startsWith(jobDir)).toBe(true);
    expect(existsSync(out.path)).toBe(true);
    expect(statSync(out.path).size).toBe(out.bytes);
    expect(result.loaded_models).toContain(MODEL);
    expect(result.state.resident.map((r) => r.name)).toContain(MODEL);

    await worker.stop();
    expect(await exited).toBeNull();
  });

  it('cancel(id) stops the request cooperatively with `canceled`, and the worker stays usable', async () => {
    const { worker, exited } = spawnWorker(realWorker);
    await worker.start('agent-test', '0', START_TIMEOUT_MS);
    const progress = progressTracker();
    const { id, done } = worker.generate(generateMsg({ steps: 150 }), progress.onProgress);
    await progress.firstRunning;
    worker.cancel(id);
    const err = await rejection(done);
    expect(err.code).toBe('canceled');
    expect(err.retryable).toBe(false);
    expect(progress.seen.filter((p) => p.stage === 'base').length).toBeLessThan(150);
    expect(worker.state).toBe('ready');
    expect(isAlive(worker.pid!)).toBe(true);

    const again = worker.generate(generateMsg({ steps: 2 }), () => {});
    expect((await again.done).outputs).toHaveLength(1);

    await worker.stop();
    expect(await exited).toBeNull();
  });

  it('onAnswer runs before the request settles, with the worker ready: a request sent from it (the next job) is answered', async () => {
    const { worker, exited } = spawnWorker(realWorker);
    await worker.start('agent-test', '0', START_TIMEOUT_MS);
    const order: string[] = [];
    const first = worker.generate(generateMsg({ steps: 2 }), () => {});
    let second: ReturnType<WorkerProcess['generate']> | null = null;
    first.onAnswer(() => {
      order.push(`answered (worker ${worker.state})`);
      second = worker.generate({ ...generateMsg({ steps: 2 }), job_id: 'job-2' }, () => {});
      expect(worker.state).toBe('busy');
    });
    const result = await first.done.then((r) => (order.push('settled'), r));
    expect(order).toEqual(['answered (worker ready)', 'settled']);
    expect(result.outputs).toHaveLength(1);
    expect(second).not.toBeNull();
    expect((await second!.done).outputs).toHaveLength(1);

    // an error answer frees the worker the same way; the request still rejects with it
    const canceled = worker.generate(generateMsg({ steps: 150 }), () => {});
    let answered = 0;
    canceled.onAnswer(() => void (answered += 1));
    worker.cancel(canceled.id);
    expect((await rejection(canceled.done)).code).toBe('canceled');
    expect(answered).toBe(1);

    await worker.stop();
    expect(await exited).toBeNull();
  });

  it("kill('SIGKILL', 'kill') during a request is reported as canceled, not as a crash", async () => {
    const { worker, exited } = spawnWorker(realWorker);
    await worker.start('agent-test', '0', START_TIMEOUT_MS);
    const progress = progressTracker();
    const { done } = worker.generate(generateMsg({ steps: 150 }), progress.onProgress);
    await progress.firstRunning;
    worker.kill('SIGKILL', 'kill');
    const err = await rejection(done);
    expect(err.code).toBe('canceled');
    expect(err.message).toContain('SIGKILL');
    const exitErr = await exited;
    expect(exitErr?.code).toBe('canceled');
    expect(worker.state).toBe('defunct');
  });

  it('load() makes models resident (pinned when asked) and resolves with `loaded`; unload() frees them', async () => {
    const { worker, exited } = spawnWorker(realWorker);
    await worker.start('agent-test', '0', START_TIMEOUT_MS);

    const hot = worker.load([MODEL, VAE], 'vram', true);
    expect(worker.state).toBe('busy');
    const loaded = await hot.done;
    expect(worker.state).toBe('ready');
    expect(loaded.type).toBe('loaded');
    expect(loaded.id).toBe(hot.id);
    expect(loaded.models).toEqual([MODEL, VAE]);
    expect(loaded.timings.load_ms).toBeGreaterThanOrEqual(0);
    const resident = Object.fromEntries(loaded.state.resident.map((r) => [r.name, r]));
    expect(resident[MODEL]).toMatchObject({ location: 'vram', pinned: true });
    expect(resident[VAE]).toMatchObject({ location: 'vram', pinned: true });
    expect(worker.lastState).toEqual(loaded.state);

    const warm = await worker.load([TURBO], 'ram', false).done;
    expect(warm.models).toEqual([TURBO]);
    expect(warm.state.resident.find((r) => r.name === TURBO)).toMatchObject({ location: 'ram', pinned: false });

    const freed = await worker.unload([VAE, TURBO]).done;
    expect(freed.type).toBe('loaded');
    expect([...freed.models].sort()).toEqual([VAE, TURBO].sort());
    expect(freed.state.resident.map((r) => r.name)).toEqual([MODEL]);

    const err = await rejection(worker.load(['someone/unknown-model'], 'vram', false).done);
    expect(err.code).toBe('model_not_found');
    expect(worker.state).toBe('ready');

    await worker.stop();
    expect(await exited).toBeNull();
  });

  it('train() reports progress with loss and checkpoints as it goes, and resolves with `trained`', async () => {
    const { worker, exited } = spawnWorker(realWorker);
    await worker.start('agent-test', '0', START_TIMEOUT_MS);
    const datasetDir = join(jobDir, 'dataset');
    writeDataset(datasetDir, [[200, 30, 30], [30, 30, 200]]);

    const progress: ProgressMessage[] = [];
    // the file must be complete when the agent hears of it (it uploads it right away): hash it then
    const checkpoints: (CheckpointMessage & { sha256_on_arrival: string })[] = [];
    const run = worker.train(trainMsg(datasetDir, 5, 2), (m) => progress.push(m), (m) => checkpoints.push({ ...m, sha256_on_arrival: sha256Of(m.path) }));
    expect(worker.state).toBe('busy');
    const trained = await run.done;
    expect(worker.state).toBe('ready');

    expect(trained.type).toBe('trained');
    expect(trained.id).toBe(run.id);
    expect(trained.steps).toBe(5);
    expect(Number.isFinite(trained.final_loss)).toBe(true);
    expect(trained.path.startsWith(jobDir)).toBe(true);
    expect(statSync(trained.path).size).toBe(trained.bytes);
    expect(sha256Of(trained.path)).toBe(trained.sha256);
    expect(trained.state.resident.map((r) => r.name)).toContain(MODEL);

    // every 2 steps, never at the last one (the result is that file)
    expect(checkpoints.map((c) => c.step)).toEqual([2, 4]);
    for (const c of checkpoints) {
      expect(c.id).toBe(run.id);
      expect(c.path.startsWith(jobDir)).toBe(true);
      expect(c.sha256_on_arrival).toBe(c.sha256);
      expect(statSync(c.path).size).toBe(c.bytes);
    }
    const steps = progress.filter((p) => p.stage === 'train');
    expect(steps.map((p) => p.step)).toEqual([1, 2, 3, 4, 5]);
    expect(steps.every((p) => p.total === 5 && typeof p.loss === 'number')).toBe(true);
    expect(steps.at(-1)!.loss).toBe(trained.final_loss);

    await worker.stop();
    expect(await exited).toBeNull();
  });

  it('train() with a dataset image missing rejects as invalid_request naming the item, and the worker stays usable', async () => {
    const { worker, exited } = spawnWorker(realWorker);
    await worker.start('agent-test', '0', START_TIMEOUT_MS);
    const datasetDir = join(jobDir, 'dataset');
    writeDataset(datasetDir, [[200, 30, 30]]); // item 1 has no file
    const err = await rejection(worker.train(trainMsg(datasetDir, 4, 2), () => {}, () => {}).done);
    expect(err.code).toBe('invalid_request');
    expect(err.message).toContain('dataset.items.1.image');
    expect(worker.state).toBe('ready');
    expect((await worker.load([MODEL], 'vram', false).done).models).toEqual([MODEL]);
    await worker.stop();
    expect(await exited).toBeNull();
  });

  it('stop() ends an idle worker cleanly: no exit error, state defunct, process gone', async () => {
    const { worker, exited } = spawnWorker(realWorker);
    await worker.start('agent-test', '0', START_TIMEOUT_MS);
    const pid = worker.pid!;
    await worker.stop(2_000);
    expect(await exited).toBeNull();
    expect(worker.state).toBe('defunct');
    expect(isAlive(pid)).toBe(false);
  });
});

describe('WorkerProcess with a misbehaving worker', () => {
  it('a worker that raises during generate rejects with the code and message it reported, and stays usable', async () => {
    const { worker, exited } = spawnWorker(fixture('raises'));
    await worker.start('agent-test', '0', START_TIMEOUT_MS);
    const err = await rejection(worker.generate(generateMsg(), () => {}).done);
    expect(err.code).toBe('out_of_memory');
    expect(err.message).toBe('CUDA out of memory: tried to allocate 2.00 GiB');
    expect(err.retryable).toBe(true);
    expect(worker.state).toBe('ready');
    await worker.stop();
    expect(await exited).toBeNull();
  });

  it('a worker that exits 1 mid-request fails it as worker_crashed with the exit code; its stderr goes to the agent log only', async () => {
    const captured = capturingLog();
    const { worker, exited } = spawnWorker(fixture('exits_1'), captured.logger);
    await worker.start('agent-test', '0', START_TIMEOUT_MS);
    const progress = progressTracker();
    const err = await rejection(worker.generate(generateMsg(), progress.onProgress).done);
    expect(progress.seen).toHaveLength(1);
    expect(err.code).toBe('worker_crashed');
    expect(err.retryable).toBe(true);
    expect(err.message).toBe('worker died (exit code 1)');
    expect((await exited)?.code).toBe('worker_crashed');
    expect(worker.state).toBe('defunct');
    expect(captured.text()).toContain('CUDA error: an illegal memory access was encountered');
  });

  it('a worker that is SIGKILLed mid-request fails it as worker_crashed naming the signal', async () => {
    const { worker, exited } = spawnWorker(fixture('kills_itself'));
    await worker.start('agent-test', '0', START_TIMEOUT_MS);
    const req = worker.generate(generateMsg(), () => {});
    let answered = false;
    req.onAnswer(() => (answered = true)); // a death is no answer: the pipeline frees the GPU itself
    const err = await rejection(req.done);
    expect(err.code).toBe('worker_crashed');
    expect(err.message).toBe('worker died (signal SIGKILL)');
    expect(answered).toBe(false);
    expect((await exited)?.code).toBe('worker_crashed');
  });

  it('a worker that never answers hello makes start() reject after the timeout, and is killed', async () => {
    const { worker, exited } = spawnWorker(fixture('hangs_on_hello'));
    const t0 = Date.now();
    const err = await rejection(worker.start('agent-test', '0', 500));
    const elapsed = Date.now() - t0;
    expect(err.code).toBe('worker_crashed');
    expect(err.message).toContain('did not answer hello within 500 ms');
    expect(elapsed).toBeGreaterThanOrEqual(450);
    expect(elapsed).toBeLessThan(5_000);
    const pid = worker.pid!;
    await exited;
    expect(worker.state).toBe('defunct');
    expect(isAlive(pid)).toBe(false);
  });

  it('a worker that prints non-JSON on stdout fails the request as worker_protocol and is killed; the line goes to the agent log only', async () => {
    const captured = capturingLog();
    const { worker, exited } = spawnWorker(fixture('prints_non_json'), captured.logger);
    await worker.start('agent-test', '0', START_TIMEOUT_MS);
    const pid = worker.pid!;
    const err = await rejection(worker.generate(generateMsg(), () => {}).done);
    expect(err.code).toBe('worker_protocol');
    expect(err.message).not.toContain('Loading pipeline components');
    expect(captured.text()).toContain('Loading pipeline components');
    expect((await exited)?.code).toBe('worker_protocol');
    expect(worker.state).toBe('defunct');
    expect(isAlive(pid)).toBe(false);
  });

  it('a worker that fails on import makes start() reject with its exit code, and logs the error from stderr', async () => {
    const captured = capturingLog();
    const { worker, exited } = spawnWorker(fixture('fails_on_import'), captured.logger);
    const err = await rejection(worker.start('agent-test', '0', START_TIMEOUT_MS));
    expect(err.code).toBe('worker_crashed');
    expect(err.message).toBe('worker died (exit code 1)');
    expect(captured.text()).toContain("ModuleNotFoundError: No module named 'kiln_fixture_missing_dependency'");
    expect((await exited)?.code).toBe('worker_crashed');
    expect(worker.state).toBe('defunct');
  });
});
