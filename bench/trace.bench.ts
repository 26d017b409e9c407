// Placement on a skewed trace: the dispatcher's own plan() drives a simulated farm in virtual
// time, so the figures are placement's decisions alone (no machine noise): 4 agents, 2 slots
// each, room in VRAM for two of 6 models whose popularity is Zipf-skewed, bursty arrivals, model
// loads much longer than jobs. Affinity against FIFO (competing consumers) and against a lower
// bound on the makespan; model loads against the minimum (each model used loaded once). Prints a
// table and a final JSON line (bench/README.md); nothing fails on timing.
import type { ModelInfo } from '@kiln/contracts';
import { type AgentView, type Candidate, plan, projectResidency } from '../apps/dispatcher/src/placement.js';

const AGENTS = Number(process.env.BENCH_TRACE_AGENTS ?? 4);
const JOBS = Number(process.env.BENCH_TRACE_JOBS ?? 400);
const SLOTS = 2;
const LOAD_MS = 8_000;
const VRAM_MB = 24_576;
const MODELS: ModelInfo[] = Array.from({ length: 6 }, (_, i) => ({ name: `model-${i}`, kind: 'base', vram_mb: 10_000, load_ms: LOAD_MS }));
const catalog = new Map(MODELS.map((m) => [m.name, m]));

interface Job {
  id: string;
  model: string;
  client: string;
  arrive: number;
  runMs: number;
  start?: number;
  end?: number;
}

/** The trace: Zipf popularity, bursts of arrivals, three tenants, jobs of 0.5–1.5 s. */
function trace(seed: number): Job[] {
  let s = seed;
  const r = () => ((s = (s * 1103515245 + 12345) & 0x7fffffff) / 0x7fffffff);
  const weights = MODELS.map((_, i) => 1 / (i + 1));
  const total = weights.reduce((a, b) => a + b, 0);
  const jobs: Job[] = [];
  let t = 0;
  while (jobs.length < JOBS) {
    const burst = 10 + Math.floor(r() * 40);
    for (let k = 0; k < burst && jobs.length < JOBS; k++) {
      let x = r() * total;
      const m = Math.max(0, MODELS.findIndex((_, i) => (x -= weights[i]!) <= 0));
      jobs.push({ id: `job-${jobs.length}`, model: MODELS[m]!.name, client: `tenant-${jobs.length % 3}`, arrive: t + Math.floor(r() * 200), runMs: 500 + Math.floor(r() * 1000) });
    }
    t += 2_000 + Math.floor(r() * 8_000);
  }
  return jobs.sort((a, b) => a.arrive - b.arrive);
}

interface Agent {
  id: string;
  /** models in VRAM, least recently used first */
  resident: Set<string>;
  /** held jobs, the running one first */
  held: Job[];
  /** when the running job (with its load) ends */
  busyUntil: number;
}

/** Runs the trace with one policy; plan() is called at every arrival and every job end. */
function simulate(jobs: Job[], policy: 'affinity' | 'fifo') {
  const agents: Agent[] = Array.from({ length: AGENTS }, (_, i) => ({ id: `agent-${i}`, resident: new Set(), held: [], busyUntil: 0 }));
  const waiting: Job[] = [];
  const done: Job[] = [];
  let loads = 0;
  let next = 0;
  let now = 0;
  const running = new Map<string, number>();
  const startNext = (a: Agent) => {
    const j = a.held[0];
    if (!j || j.start !== undefined) return;
    let cost = 0;
    if (!a.resident.has(j.model)) {
      // evict least recently used until the model fits, as the worker does
      while (a.resident.size * 10_000 + 10_000 > VRAM_MB) a.resident.delete(a.resident.values().next().value!);
      loads++;
      cost = LOAD_MS;
    }
    a.resident.delete(j.model);
    a.resident.add(j.model);
    j.start = now;
    a.busyUntil = now + cost + j.runMs;
  };
  const place = () => {
    if (waiting.length === 0) return;
    const views: AgentView[] = agents.map((a) => ({
      id: a.id,
      free: SLOTS - a.held.length,
      inflight: a.held.length,
      avgJobMs: 1_000,
      // what it holds runs for: the rest of the running job (its load included), then the next
      busyMs: a.held.reduce((s, j, i) => s + (i === 0 && j.start !== undefined ? Math.max(0, a.busyUntil - now) : j.runMs), 0),
      runMs: (c) => jobs[Number(c.jobId.slice(4))]!.runMs,
      vramTotalMb: VRAM_MB,
      resident: projectResidency({ resident: a.resident, models: catalog, vramTotalMb: VRAM_MB }, a.held.filter((j) => j.start === undefined).map((j) => ({ models: [j.model], activationMb: 1_000 }))),
      models: catalog,
    }));
    const candidates: Candidate[] = waiting.map((j) => ({ jobId: j.id, model: j.model, rank: 5, waitedMs: now - j.arrive, client: j.client, activationMb: 1_000 }));
    for (const a of agents) for (const j of a.held) running.set(j.client, (running.get(j.client) ?? 0) + 1);
    for (const d of plan(candidates, views, { agingMs: 60_000, running, policy })) {
      if (d.kind !== 'place') continue;
      const i = waiting.findIndex((j) => j.id === d.jobId);
      const [j] = waiting.splice(i, 1);
      const a = agents.find((x) => x.id === d.agentId)!;
      a.held.push(j!);
      startNext(a);
    }
    running.clear();
  };
  while (done.length < jobs.length) {
    const ends = agents.filter((a) => a.held[0]?.start !== undefined).map((a) => a.busyUntil);
    const nextEnd = ends.length ? Math.min(...ends) : Infinity;
    const nextArrival = next < jobs.length ? jobs[next]!.arrive : Infinity;
    now = Math.min(nextEnd, nextArrival);
    if (nextArrival <= nextEnd) {
      while (next < jobs.length && jobs[next]!.arrive <= now) waiting.push(jobs[next++]!);
    } else {
      for (const a of agents) {
        if (a.held[0]?.start !== undefined && a.busyUntil <= now) {
          const j = a.held.shift()!;
          j.end = now;
          done.push(j);
          startNext(a);
        }
      }
    }
    place();
  }
  const makespan = Math.max(...done.map((j) => j.end!)) - jobs[0]!.arrive;
  const latencies = done.map((j) => j.end! - j.arrive).sort((a, b) => a - b);
  return { makespan_ms: makespan, p95_ms: latencies[Math.floor(0.95 * latencies.length)]!, loads };
}

const jobs = trace(Number(process.env.BENCH_TRACE_SEED ?? 11));
const used = new Set(jobs.map((j) => j.model)).size;
// lower bound on the makespan: every model used must load once somewhere, and the agents share
// the work; and no job ends before its arrival plus its run
const work = jobs.reduce((s, j) => s + j.runMs, 0);
const lower = Math.max((work + used * LOAD_MS) / AGENTS, Math.max(...jobs.map((j) => j.arrive + j.runMs)) - jobs[0]!.arrive);
const fresh = () => jobs.map((j) => ({ ...j, start: undefined, end: undefined }));
const aff = simulate(fresh(), 'affinity');
const fifo = simulate(fresh(), 'fifo');
const row = (name: string, r: typeof aff) => ({ policy: name, ...r, makespan_of_lower_bound: Number((r.makespan_ms / lower).toFixed(3)), loads_of_minimum: Number((r.loads / used).toFixed(2)) });
const rows = [row('affinity', aff), row('fifo', fifo)];
console.log(`placement trace: ${JOBS} jobs over ${used} Zipf-skewed models, ${AGENTS} agents × ${SLOTS} slots, room for 2 models each, loads ${LOAD_MS} ms, jobs 0.5–1.5 s, bursty arrivals (virtual time)`);
console.log(`lower bound on makespan ${(lower / 1000).toFixed(1)} s; minimum loads ${used}`);
console.log('policy     makespan s   of bound   p95 s   loads   of minimum');
for (const r of rows) {
  console.log(`${r.policy.padEnd(9)}  ${(r.makespan_ms / 1000).toFixed(1).padStart(10)}  ${`${r.makespan_of_lower_bound}×`.padStart(9)}  ${(r.p95_ms / 1000).toFixed(1).padStart(6)}  ${String(r.loads).padStart(6)}  ${`${r.loads_of_minimum}×`.padStart(11)}`);
}
console.log(JSON.stringify({ bench: 'trace', lower_bound_ms: lower, minimum_loads: used, rows }));
