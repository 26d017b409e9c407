// `npm run bench`: Kiln's placement against plain competing consumers, measured through the
// real farm (Redis, S3 server, API, dispatcher, agents, Python workers), same process, same
// workload. Reported as ratios against the baseline; nothing here ever fails on timing.
//
//  1. Throughput: zero-cost synthetic steps, N tiny jobs — jobs/s through the whole farm,
//     submit→completion latency (p50/p95) and CPU per job of each process, once with the client
//     polling every job's record at 20 Hz (what this bench did until it measured what that
//     costs) and once waiting as a client watching many jobs would: one list call per poll.
//  2. Placement: a mixed workload over three models on two agents whose GPUs hold only one
//     model each (so a wrong placement evicts), with realistic-ratio load and step costs.
//     Run once with PLACEMENT_POLICY=fifo (competing consumers, the baseline) and once with
//     affinity; compare model loads and makespan — with evicted models dropped, and with them
//     kept warm in host RAM (cheaper misses, so less to win).
import { readFileSync } from 'node:fs';
import type { JobRecord } from '@kiln/contracts';
import { basicRequest, Farm } from '../tests/support/farm.js';

const N_THROUGHPUT = Number(process.env.BENCH_JOBS ?? 200);
const N_MIXED = Number(process.env.BENCH_MIXED_JOBS ?? 36);
const MODELS = ['stabilityai/stable-diffusion-xl-base-1.0', 'stabilityai/sdxl-turbo', 'RunDiffusion/Juggernaut-XL-v9'];

const pct = (xs: number[], p: number) => [...xs].sort((a, b) => a - b)[Math.min(xs.length - 1, Math.floor((p / 100) * xs.length))]!;

/**
 * How the bench waits for its jobs: `list` — as a client watching many jobs would, one list call
 * (`GET /v1/jobs?status=queued,running`, following its cursor) every 50 ms until none is left,
 * then every record once; `each` — every job's record polled at 20 Hz: 200 GETs per poll, each
 * computing the job's queue position and ETA, which on 2 cores costs the farm throughput.
 */
type Wait = 'list' | 'each';

/** user + system CPU of a process so far, ms (/proc/<pid>/stat, 10 ms ticks) */
function cpuMs(pid: number | undefined): number {
  if (!pid) return 0;
  const f = readFileSync(`/proc/${pid}/stat`, 'utf8').split(') ')[1]!.split(' ');
  return (Number(f[11]) + Number(f[12])) * 10;
}

let gets = 0;

async function unfinished(farm: Farm): Promise<number> {
  let n = 0;
  let cursor: string | null = null;
  do {
    const res = await farm.get(`/v1/jobs?status=queued,running&limit=100${cursor ? `&cursor=${cursor}` : ''}`);
    if (res.status !== 200) throw new Error(`list: ${res.status} ${JSON.stringify(res.body)}`);
    n += res.body.data.length;
    cursor = res.body.next_cursor;
  } while (cursor);
  return n;
}

async function runWorkload(farm: Farm, bodies: unknown[], wait: Wait = 'list'): Promise<{ ms: number; jobs: JobRecord[] }> {
  const t0 = Date.now();
  const submitted = [];
  for (const b of bodies) submitted.push(await farm.submit(b));
  let jobs: JobRecord[];
  let ms: number;
  if (wait === 'list') {
    await farm.waitFor(async () => (await unfinished(farm)) === 0, 600_000, 'every job ended');
    ms = Date.now() - t0;
    jobs = await Promise.all(submitted.map((j) => farm.job(j.id)));
  } else {
    jobs = await Promise.all(submitted.map((j) => farm.waitForDone(j.id, 600_000)));
    ms = Date.now() - t0;
  }
  const failed = jobs.filter((j) => j.status !== 'succeeded');
  if (failed.length) throw new Error(`${failed.length} jobs did not succeed: ${JSON.stringify(failed[0]?.error)}`);
  return { ms, jobs };
}

interface ThroughputRow {
  wait: Wait;
  jobs: number;
  jobs_per_s: number;
  p50_ms: number;
  p95_ms: number;
  client_gets: number;
  api_cpu_ms_per_job: number;
  dispatcher_cpu_ms_per_job: number;
  agents_cpu_ms_per_job: number;
}

async function throughput(): Promise<ThroughputRow[]> {
  const farm = await new Farm({ agents: 2, env: { KILN_SYNTHETIC_STEP_MS: '0', LOG_LEVEL: 'warn' } }).start();
  const rows: ThroughputRow[] = [];
  try {
    // warm both agents so loads are out of the measurement
    await runWorkload(farm, [0, 1].map((i) => basicRequest({ hyperparameters: { seed: i, width: 64, height: 64 } })));
    const pids = { api: farm.procs.get('api')?.pid, dispatcher: farm.procs.get('dispatcher')?.pid, agents: [0, 1].map((i) => farm.procs.get(`agent-${i}`)?.pid) };
    // every GET the client sends, whichever way it waits
    const get = farm.get.bind(farm);
    farm.get = (path, headers) => ((gets += 1), get(path, headers));
    const cpu = () => ({ api: cpuMs(pids.api), dispatcher: cpuMs(pids.dispatcher), agents: pids.agents.reduce<number>((s, p) => s + cpuMs(p), 0) });
    for (const wait of ['each', 'list'] as const) {
      const bodies = Array.from({ length: N_THROUGHPUT }, (_, i) => basicRequest({ scheduler: { type: 'EulerDiscreteScheduler', steps: 1 }, hyperparameters: { seed: i, width: 64, height: 64 } }));
      gets = 0;
      const c0 = cpu();
      const { ms, jobs } = await runWorkload(farm, bodies, wait);
      const c1 = cpu();
      const lat = jobs.map((j) => j.timings.total_ms!);
      const per = (k: 'api' | 'dispatcher' | 'agents') => Math.round(((c1[k] - c0[k]) / N_THROUGHPUT) * 100) / 100;
      rows.push({ wait, jobs: N_THROUGHPUT, jobs_per_s: Math.round((N_THROUGHPUT * 10_000) / ms) / 10, p50_ms: pct(lat, 50), p95_ms: pct(lat, 95), client_gets: gets, api_cpu_ms_per_job: per('api'), dispatcher_cpu_ms_per_job: per('dispatcher'), agents_cpu_ms_per_job: per('agents') });
      const r = rows.at(-1)!;
      console.log(`throughput: ${N_THROUGHPUT} jobs (64×64, 1 zero-cost step) on 2 agents in ${ms} ms = ${r.jobs_per_s} jobs/s; the client waits: ${wait === 'each' ? 'every record polled at 20 Hz' : 'one list call per 50 ms'} (${gets} GETs)`);
      console.log(`  submit→succeeded latency: p50 ${r.p50_ms} ms, p95 ${r.p95_ms} ms, max ${Math.max(...lat)} ms; CPU per job: API ${r.api_cpu_ms_per_job} ms, dispatcher ${r.dispatcher_cpu_ms_per_job} ms, agents ${r.agents_cpu_ms_per_job} ms`);
    }
  } finally {
    await farm.close();
  }
  return rows;
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
    return { ms, loads: jobs.filter((j) => j.kind === 'generation' && (j.loaded_models ?? []).length > 0).length, p95: pct(jobs.map((j) => j.timings.total_ms!), 95) };
  } finally {
    await farm.close();
  }
}

const throughputRows = await throughput();
const mixedRows: Array<{ ram: 'dropped' | 'warm'; policy: 'fifo' | 'affinity'; ms: number; loads: number; p95_ms: number }> = [];
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
  for (const [policy, m] of [['fifo', base], ['affinity', aff]] as const) mixedRows.push({ ram: ramMb ? 'warm' : 'dropped', policy, ms: m.ms, loads: m.loads, p95_ms: m.p95 });
}
console.log(JSON.stringify({ bench: 'placement', throughput: throughputRows, mixed: mixedRows }));
process.exit(0);
