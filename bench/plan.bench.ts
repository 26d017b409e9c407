// Placement's own cost: plan() for N agents × W waiting jobs, with one free slot (the steady
// state) and with every slot free (a fleet coming up, or after a failover), against the plain
// scan it replaced (test/placement-reference.ts), in the same process. Prints a table and a
// final JSON line; nothing fails on timing.
import type { ModelInfo } from '@kiln/contracts';
import { type AgentView, type Candidate, plan, planInSlices } from '../apps/dispatcher/src/placement.js';
import { referencePlan } from '../apps/dispatcher/test/placement-reference.js';

const MODELS: ModelInfo[] = Array.from({ length: 6 }, (_, i) => ({ name: `model-${i}`, kind: 'base', vram_mb: 7_000, load_ms: 3_000 }));
const LORA: ModelInfo = { name: 'lora-0', kind: 'lora', vram_mb: 100, load_ms: 50 };
const catalog = new Map([...MODELS, LORA].map((m) => [m.name, m]));

function farm(n: number, allFree: boolean): AgentView[] {
  return Array.from({ length: n }, (_, i) => ({
    id: `agent-${String(i).padStart(4, '0')}`,
    free: allFree || i === n - 1 ? 2 : 0,
    inflight: allFree ? 0 : 2,
    avgJobMs: 1_000 + (i % 7) * 100,
    vramTotalMb: 24_576,
    resident: new Set([MODELS[i % MODELS.length]!.name, MODELS[(i * 7 + 1) % MODELS.length]!.name]),
    pinned: new Set(),
    models: catalog,
  }));
}

function backlog(w: number): Candidate[] {
  // Zipf-skewed model popularity, three tenants, mixed priorities and ages
  const weights = MODELS.map((_, i) => 1 / (i + 1));
  const total = weights.reduce((a, b) => a + b, 0);
  let seed = 7;
  const r = () => ((seed = (seed * 1103515245 + 12345) & 0x7fffffff) / 0x7fffffff);
  return Array.from({ length: w }, (_, i) => {
    let x = r() * total;
    const m = MODELS.findIndex((_, k) => (x -= weights[k]!) <= 0);
    return {
      jobId: `job-${i}`,
      model: MODELS[Math.max(0, m)]!.name,
      ...(r() < 0.1 ? { adapters: [LORA.name] } : {}),
      rank: [1, 5, 5, 5, 10][i % 5]!,
      waitedMs: Math.floor(r() * 30_000),
      client: `tenant-${i % 3}`,
      activationMb: 1_200,
    };
  });
}

function time(fn: () => unknown, budgetMs = 3_000): number | null {
  const t0 = performance.now();
  fn();
  const first = performance.now() - t0;
  if (first > budgetMs) return first;
  const runs = Math.max(1, Math.min(20, Math.floor(budgetMs / Math.max(first, 0.01) / 4)));
  const t1 = performance.now();
  for (let i = 0; i < runs; i++) fn();
  return (performance.now() - t1) / runs;
}

const opts = { agingMs: 60_000, running: new Map<string, number>() };
const rows: { agents: number; waiting: number; slots: string; placed: number; ms: number; longest_slice_ms: number; reference_ms: number | null }[] = [];
for (const [n, w] of [[10, 500], [100, 500], [200, 500], [500, 500], [500, 5_000]] as const) {
  for (const allFree of [false, true]) {
    const agents = farm(n, allFree);
    const jobs = backlog(w);
    const placed = plan(jobs, agents, opts).filter((d) => d.kind === 'place').length;
    const ms = time(() => plan(jobs, agents, opts))!;
    // as the dispatcher runs it: in slices of 10 ms, the event loop given back between them
    const { longestSliceMs } = await planInSlices(jobs, agents, opts, 10);
    // the old scan grows as waiting × agents per placement: only run it where it ends in seconds
    const reference = n * w * (allFree ? 2 * n : 1) <= 200 * 500 * 400 ? time(() => referencePlan(jobs, agents, opts), 1_000) : null;
    rows.push({ agents: n, waiting: w, slots: allFree ? 'all free' : 'one free', placed, ms: Number(ms.toFixed(2)), longest_slice_ms: Number(longestSliceMs.toFixed(2)), reference_ms: reference === null ? null : Number(reference.toFixed(1)) });
  }
}
console.log('plan(): agents × waiting jobs → time of one plan (ms), indexed against the plain scan it replaced');
console.log('agents  waiting  slots     placed   plan ms   longest slice ms   scan ms   ratio');
for (const r of rows) {
  const ratio = r.reference_ms === null ? '—' : `${(r.ms / r.reference_ms).toFixed(3)}×`;
  console.log(`${String(r.agents).padStart(6)}  ${String(r.waiting).padStart(7)}  ${r.slots.padEnd(8)}  ${String(r.placed).padStart(6)}  ${String(r.ms).padStart(8)}  ${String(r.longest_slice_ms).padStart(17)}  ${String(r.reference_ms ?? '—').padStart(8)}  ${ratio.padStart(6)}`);
}
console.log(JSON.stringify({ bench: 'plan', rows }));
