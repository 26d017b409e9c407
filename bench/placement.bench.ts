// `npm run bench`: Kiln's placement against plain competing consumers, measured through the
// real farm (Redis, S3 server, API, dispatcher, agents, Python workers), same process, same
// workload. Reported as ratios against the baseline; nothing here ever fails on timing.
//
//  1. Throughput: zero-cost synthetic steps, N tiny jobs — jobs/s through the whole farm and
//     submit→completion latency (p50/p95).
//  2. Placement: a mixed workload over three models on two agents whose GPUs hold only one
//     model each (so a wrong placement evicts), with realistic-ratio load and step costs.
//     Run once with PLACEMENT_POLICY=fifo (competing consumers, the baseline) and once with
//     affinity; compare model loads and makespan — with evicted models dropped, and with them
//     kept warm in host RAM (cheaper misses, so less to win).
import type { JobRecord } from '@kiln/contracts';
import { basicRequest, Farm } from '../tests/support/farm.js';

const N_THROUGHPUT = Number(process.env.BENCH_JOBS ?? 200);
const N_MIXED = Number(process.env.BENCH_MIXED_JOBS ?? 36);
const MODELS = ['stabilityai/stable-diffusion-xl-base-1.0', 'stabilityai/sdxl-turbo', 'RunDiffusion/Juggernaut-XL-v9'];

const pct = (xs: number[], p: number) => [...xs].sort((a, b) => a - b)[Math.min(xs.length - 1, Math.floor((p / 100) * xs.length))]!;

async function runWorkload(farm: Farm, bodies: unknown[]): Promise<{ ms: number; jobs: JobRecord[] }> {
  const t0 = Date.now();
  const submitted = [];
  for (const b of bodies) submitted.push(await farm.submit(b));
  const jobs = await Promise.all(submitted.map((j) => farm.waitForDone(j.id, 600_000)));
  const failed = jobs.filter((j) => j.status !== 'succeeded');
  if (failed.length) throw new Error(`${failed.length} jobs did not succeed: ${JSON.stringify(failed[0]?.error)}`);
  return { ms: Date.now() - t0, jobs };
}

async function throughput(): Promise<void> {
  const farm = await new Farm({ agents: 2, env: { KILN_SYNTHETIC_STEP_MS: '0', LOG_LEVEL: 'warn' } }).start();
  try {
    // warm both agents so loads are out of the measurement
    await runWorkload(farm, [0, 1].map((i) => basicRequest({ hyperparameters: { seed: i, width: 64, height: 64 } })));
    const bodies = Array.from({ length: N_THROUGHPUT }, (_, i) => basicRequest({ scheduler: { type: 'EulerDiscreteScheduler', steps: 1 }, hyperparameters: { seed: i, width: 64, height: 64 } }));
    const { ms, jobs } = await runWorkload(farm, bodies);
    const lat = jobs.map((j) => j.timings.total_ms!);
    console.log(`throughput: ${N_THROUGHPUT} jobs (64×64, 1 zero-cost step) on 2 agents in ${ms} ms = ${((N_THROUGHPUT * 1000) / ms).toFixed(1)} jobs/s`);
    console.log(`  submit→succeeded latency: p50 ${pct(lat, 50)} ms, p95 ${pct(lat, 95)} ms, max ${Math.max(...lat)} ms`);
  } finally {
    await farm.close();
  }
}

async function mixed(policy: 'fifo' | 'affinity', ramMb: number): Promise<{ ms: number; loads: number; p95: number }> {
  // 10 GB GPUs: one 7 GB SDXL model (+1.2 GB working memory) fits at a time, so placing a job on the wrong agent evicts.
  const farm = await new Farm({
    agents: 2,
    env: { PLACEMENT_POLICY: policy, KILN_SYNTHETIC_RAM_MB: String(ramMb), KILN_SYNTHETIC_VRAM_MB: '10240', KILN_SYNTHETIC_STEP_MS: '20', KILN_SYNTHETIC_LOAD_MS_PER_GB: '100', LOG_LEVEL: 'warn' },
  }).start();
  try {
    // bursts of the same model, interleaved, as traffic from a few products looks
    const bodies = Array.from({ length: N_MIXED }, (_, i) =>
      basicRequest({ model: { base: MODELS[Math.floor(i / 3) % MODELS.length] }, scheduler: { type: 'EulerDiscreteScheduler', steps: 20 }, hyperparameters: { seed: i, width: 1024, height: 1024 } }),
    );
    const { ms, jobs } = await runWorkload(farm, bodies);
    return { ms, loads: jobs.filter((j) => (j.timings.model_load_ms ?? 0) > 0).length, p95: pct(jobs.map((j) => j.timings.total_ms!), 95) };
  } finally {
    await farm.close();
  }
}

await throughput();
for (const [label, ramMb] of [
  ['evicted models are dropped (no host-RAM cache): every miss is a load from disk', 0],
  ['evicted models stay warm in host RAM: a miss costs 15% of a disk load', 65536],
] as const) {
  const base = await mixed('fifo', ramMb);
  const aff = await mixed('affinity', ramMb);
  console.log(`placement, ${N_MIXED} jobs over ${MODELS.length} models, 2 agents with VRAM for one model each (disk load ≈ 0.7 s, job ≈ 0.4 s); ${label}:`);
  console.log(`  baseline (competing consumers): ${base.ms} ms, ${base.loads} model loads, p95 latency ${base.p95} ms`);
  console.log(`  affinity (Kiln's placement):    ${aff.ms} ms, ${aff.loads} model loads, p95 latency ${aff.p95} ms`);
  console.log(`  ratios affinity/baseline: makespan ${(aff.ms / base.ms).toFixed(2)}×, loads ${(aff.loads / Math.max(1, base.loads)).toFixed(2)}×, p95 ${(aff.p95 / base.p95).toFixed(2)}×`);
}
process.exit(0);
