// The placement function as it was before it was indexed (O(jobs × agents) per placement): the
// oracle placement.test.ts checks the indexed plan() against on random inputs. Not used at run time.
import { type AgentView, type Candidate, type Decision, type PlacementOptions, estimate } from '../src/placement.js';
type AgentState = AgentView;

export function referencePlan(candidates: Candidate[], agents: AgentView[], opts: PlacementOptions): Decision[] {
  const fifo = opts.policy === 'fifo';
  const fairnessMs = opts.agingMs / 10;
  const state: AgentState[] = agents.map((a) => ({ ...a, resident: new Set(a.resident) }));
  const running = new Map(opts.running);
  const decisions: Decision[] = [];

  // jobs no live agent could ever run are decided up front
  const feasibleFor = new Map<string, AgentState[]>();
  let remaining: Candidate[] = [];
  for (const c of candidates) {
    const feasible = state.filter((a) => {
      const members = suite(c).map((name) => a.models.get(name));
      // pinned models stay, so they take from what this job can have
      const pinnedMb = [...(a.pinned ?? [])].filter((name) => !suite(c).includes(name)).reduce((s, name) => s + (a.models.get(name)?.vram_mb ?? 0), 0);
      return members.every((m) => m !== undefined) && pinnedMb + members.reduce((s, m) => s + m!.vram_mb, 0) + c.activationMb <= a.vramTotalMb;
    });
    if (feasible.length === 0) {
      decisions.push({ jobId: c.jobId, kind: 'infeasible', reason: infeasibleReason(c, state) });
    } else {
      feasibleFor.set(c.jobId, feasible);
      remaining.push(c);
    }
  }

  const demand = new Map<string, number>();
  for (const c of remaining) for (const name of suite(c)) demand.set(name, (demand.get(name) ?? 0) + 1);
  // the waiting work per model (expected run time), and how many agents hold each model
  const est = new Map(remaining.map((c) => [c.jobId, estimate(c, feasibleFor.get(c.jobId)!)]));
  const backlog = new Map<string, number>();
  for (const c of remaining) for (const name of suite(c)) backlog.set(name, (backlog.get(name) ?? 0) + est.get(c.jobId)!);
  const holdersOf = (name: string) => state.filter((a) => a.resident.has(name)).length;
  const perHolder = (name: string) => (backlog.get(name) ?? 0) / Math.max(1, holdersOf(name));
  const share = (a: AgentState, c: Candidate) => [...a.resident].filter((name) => !suite(c).includes(name)).reduce((s, name) => s + perHolder(name), 0);

  /** Models a load of `c`'s suite would push out of `a`'s VRAM, least recently used first. */
  const evictions = (a: AgentState, c: Candidate): string[] => {
    const members = suite(c);
    const missing = members.filter((name) => !a.resident.has(name));
    if (missing.length === 0) return [];
    const need = missing.reduce((s, name) => s + a.models.get(name)!.vram_mb, 0) + c.activationMb;
    let used = [...a.resident].reduce((s, name) => s + (a.models.get(name)?.vram_mb ?? 0), 0);
    const out: string[] = [];
    for (const name of a.resident) {
      if (used + need <= a.vramTotalMb) break;
      if (members.includes(name) || a.pinned?.has(name)) continue;
      used -= a.models.get(name)?.vram_mb ?? 0;
      out.push(name);
    }
    return out;
  };
  const cost = (a: AgentState, c: Candidate): number => {
    if (fifo) return a.inflight;
    const warmFactor = opts.warmLoadFactor ?? 0.15;
    const loads = suite(c)
      .filter((name) => !a.resident.has(name))
      .reduce((s, name) => s + a.models.get(name)!.load_ms * (a.warm?.has(name) ? warmFactor : 1), 0);
    if (loads === 0) return a.inflight * a.avgJobMs;
    // evicting a model waiting jobs need costs its reload; any other eviction a tenth of it,
    // since traffic for it may come back (so between equals, an agent with room wins)
    const evictPenalty = evictions(a, c).reduce((s, name) => s + (a.models.get(name)?.load_ms ?? 0) * ((demand.get(name) ?? 0) > 0 ? 1 : 0.1), 0);
    return a.inflight * a.avgJobMs + loads + evictPenalty;
  };

  for (;;) {
    let best: { c: Candidate; a: AgentState; score: number } | null = null;
    for (const c of remaining) {
      const feasible = feasibleFor.get(c.jobId)!;
      const ranked = feasible
        .map((a) => ({ a, cost: cost(a, c) }))
        .sort((x, y) => x.cost - y.cost || x.a.inflight - y.a.inflight || x.a.id.localeCompare(y.a.id));
      const cheapest = ranked[0]!;
      // where this job may go now: its cheapest agent, or — if that one is full — the cheapest
      // free one, when the waiting work for its model per holder exceeds the extra cost of going
      // there plus what that agent would otherwise do, or once the job has waited longer than the
      // extra cost plus that other work (at most agingMs)
      let target = cheapest.a.free > 0 ? cheapest : ranked.find((r) => r.a.free > 0);
      if (!target) continue;
      if (!fifo) {
        const lacking = suite(c).find((name) => !target!.a.resident.has(name));
        const holder = lacking === undefined ? undefined : ranked.find((r) => suite(c).every((name) => r.a.resident.has(name)));
        if (target !== cheapest || holder) {
          const extra = target.cost - (target === cheapest ? holder!.cost : cheapest.cost);
          const slot = holder ? target.cost - (target.a.busyMs ?? target.a.inflight * target.a.avgJobMs) : 0;
          const other = share(target.a, c);
          const evicts = holder !== undefined && evictions(target.a, c).length > 0;
          const bar = extra + (target === cheapest ? slot : 0) + (evicts ? opts.agingMs : Math.min(other, opts.agingMs));
          if (perHolder(lacking ?? c.model) < extra + slot + other) {
            // not worth it: to the holder if it has a free slot, else only once waited long enough
            if (holder && holder.a.free > 0) target = holder;
            else if (c.waitedMs < bar) target = undefined;
          }
        }
      }
      if (!target) continue;
      const score = target.cost + c.rank * opts.agingMs - c.waitedMs + (running.get(c.client) ?? 0) * fairnessMs;
      if (!best || score < best.score) best = { c, a: target.a, score };
    }
    if (!best) break;

    const { c, a } = best;
    const load = suite(c).some((name) => !a.resident.has(name));
    decisions.push({ jobId: c.jobId, kind: 'place', agentId: a.id, load });
    for (const name of evictions(a, c)) a.resident.delete(name);
    for (const name of suite(c)) {
      a.resident.delete(name);
      a.resident.add(name); // most recently used
    }
    a.free -= 1;
    a.inflight += 1;
    running.set(c.client, (running.get(c.client) ?? 0) + 1);
    for (const name of suite(c)) demand.set(name, (demand.get(name) ?? 1) - 1);
    for (const name of suite(c)) backlog.set(name, (backlog.get(name) ?? 0) - est.get(c.jobId)!);
    remaining = remaining.filter((x) => x !== c);
  }
  for (const c of remaining) decisions.push({ jobId: c.jobId, kind: 'wait' });
  return decisions;
}

const suite = (c: Candidate): string[] => [c.model, ...(c.adapters ?? [])];
function infeasibleReason(c: Candidate, agents: AgentState[]): string {
  if (agents.length === 0) return 'no live agent';
  const missing = suite(c).filter((name) => !agents.some((a) => a.models.has(name)));
  if (missing.length) return `no live agent can load model ${missing.join(', ')}`;
  if (!agents.some((a) => suite(c).every((name) => a.models.has(name)))) return `no live agent has every model of this request (${suite(c).join(', ')})`;
  return `no live agent has enough VRAM for ${c.model} with this request`;
}
