// `npm run bench`: the GPU idle gap between consecutive jobs on one real agent and its real
// Python worker (synthetic backend), through the whole farm (API, dispatcher, Redis, S3 server).
// Nothing here fails on timing.
//
//  1. For each output size (small: 64×64 × 1, large: 1024×1024 × 4) and each PIPELINE_DEPTH
//     (1: each job start to end before the next, the baseline; 2: the pipelined agent), start a
//     farm with one agent whose worker traces its idle time (KILN_IDLE_TRACE, idle_trace.py):
//     for each request, the ms from writing the previous result to starting this request's work.
//  2. With the agent out of rotation (maintenance), submit a backlog of jobs that each run about
//     200 ms on the worker, so the submissions' own CPU is out of the measurement; put it back
//     in rotation, wait for the last job, read every record once.
//  3. Report the gaps (p50, p95, max; the first two requests are left out: model load and an
//     empty pipeline), the gap as a share of a job's worker time, and jobs/s.
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { basicRequest, Farm, type GenRecord } from '../tests/support/farm.js';

const JOBS = { small: Number(process.env.BENCH_GAP_JOBS_SMALL ?? 60), large: Number(process.env.BENCH_GAP_JOBS_LARGE ?? 30) };
const DEPTHS = (process.env.BENCH_GAP_DEPTHS ?? '1,2').split(',').map(Number);

// about 200 ms of worker time per job either way (the issue's job was 220 ms): a step costs
// KILN_SYNTHETIC_STEP_MS × megapixels/1.05, so the small size gets a large step cost
const SIZES = {
  small: { label: '64x64x1', stepMs: '12800', hp: { width: 64, height: 64, num_images: 1 } },
  large: { label: '1024x1024x4', stepMs: '10', hp: { width: 1024, height: 1024, num_images: 4 } },
} as const;

const pct = (xs: number[], p: number) => (xs.length ? [...xs].sort((a, b) => a - b)[Math.min(xs.length - 1, Math.floor((p / 100) * xs.length))]! : NaN);
const r2 = (v: number) => Math.round(v * 100) / 100;
const r4 = (v: number) => Math.round(v * 10_000) / 10_000;

interface Row {
  outputs: string;
  depth: number;
  jobs: number;
  gaps: number;
  gap_p50_ms: number;
  gap_p95_ms: number;
  gap_max_ms: number;
  job_worker_ms: number;
  gap_share_p50: number;
  jobs_per_s: number;
}

async function run(size: keyof typeof SIZES, depth: number): Promise<Row> {
  const s = SIZES[size];
  const dir = mkdtempSync(join(tmpdir(), 'kiln-gap-'));
  const trace = join(dir, 'idle.txt');
  const farm = await new Farm({
    agents: 1,
    env: { KILN_SYNTHETIC_STEP_MS: s.stepMs, LOG_LEVEL: 'warn' },
    agentEnv: () => ({ PIPELINE_DEPTH: String(depth), KILN_IDLE_TRACE: trace }),
  }).start();
  try {
    const body = (seed: number) => basicRequest({ scheduler: { type: 'EulerDiscreteScheduler', steps: 4 }, hyperparameters: { guidance_scale: 5, seed, ...s.hp } });
    // the model loads on the first job: out of the measurement
    await farm.waitForDone((await farm.submit(body(0))).id, 60_000);
    const n = JOBS[size];
    const ids: string[] = [];
    if ((await farm.request('POST', '/v1/agents/agent-0/drain')).status !== 200) throw new Error('could not take the agent out of rotation');
    for (let i = 1; i <= n; i++) ids.push((await farm.submit(body(i))).id);
    const t0 = Date.now();
    if ((await farm.request('POST', '/v1/agents/agent-0/resume')).status !== 200) throw new Error('could not put the agent back in rotation');
    // one agent runs them in order: the last one done is the end; then every record once
    await farm.waitForDone(ids.at(-1)!, 600_000);
    for (const id of ids) await farm.waitForDone(id, 60_000);
    const ms = Date.now() - t0;
    const jobs: GenRecord[] = await Promise.all(ids.map((id) => farm.job(id)));
    const failed = jobs.filter((j) => j.status !== 'succeeded');
    if (failed.length) throw new Error(`${failed.length} jobs did not succeed: ${JSON.stringify(failed[0]?.error)}`);
    // trace lines: one per request after the first (the warm-up job); the first backlog job
    // found an empty pipeline, so it is left out too
    const gaps = readFileSync(trace, 'utf8').trim().split('\n').slice(1).map((l) => Number(l.split(' ')[1]));
    const jobMs = jobs.reduce((t, j) => t + (j.timings.inference_ms ?? 0), 0) / jobs.length;
    const p50 = pct(gaps, 50);
    return {
      outputs: s.label,
      depth,
      jobs: n,
      gaps: gaps.length,
      gap_p50_ms: r2(p50),
      gap_p95_ms: r2(pct(gaps, 95)),
      gap_max_ms: r2(Math.max(...gaps)),
      job_worker_ms: Math.round(jobMs),
      gap_share_p50: r4(p50 / jobMs),
      jobs_per_s: r2((n * 1000) / ms),
    };
  } finally {
    await farm.close();
    rmSync(dir, { recursive: true, force: true });
  }
}

const rows: Row[] = [];
for (const size of ['small', 'large'] as const) for (const depth of DEPTHS) rows.push(await run(size, depth));

console.log('GPU idle gap between consecutive jobs, one agent + worker (worker-side: previous result written → start of the next request)');
console.log('outputs       depth  jobs  gap p50 ms  gap p95 ms  gap max ms  worker ms/job  p50 share  jobs/s');
for (const r of rows) {
  console.log(
    `${r.outputs.padEnd(13)} ${String(r.depth).padStart(5)} ${String(r.jobs).padStart(5)} ${String(r.gap_p50_ms).padStart(11)} ${String(r.gap_p95_ms).padStart(11)} ${String(r.gap_max_ms).padStart(11)} ${String(r.job_worker_ms).padStart(14)} ${`${(r.gap_share_p50 * 100).toFixed(2)}%`.padStart(10)} ${String(r.jobs_per_s).padStart(7)}`,
  );
}
console.log(JSON.stringify({ bench: 'pipeline', rows }));
process.exit(0);
