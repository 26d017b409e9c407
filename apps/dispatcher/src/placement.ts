import type { ModelInfo } from '@kiln/contracts';

/**
 * Placement, as a pure function of what the dispatcher sees, so it can be tested and
 * benchmarked without Redis.
 *
 * The cost of running a job on an agent is what the GPU would spend before starting it:
 * the agent's expected wait (jobs ahead × its typical job time), plus the cold load of the
 * job's model when the agent does not hold it, plus — when that load would evict models
 * other waiting jobs need — those models' reload cost.
 *
 * Placement fills free slots one at a time, always with the (job, agent) pair of lowest score
 *   score = cost + rank × AGING_MS − waited + running(client) × FAIRNESS_MS
 * so priority dominates, waiting time ages a job up, a job whose model is resident beats one
 * that would evict it (until the latter has waited about the cost it would cause), and a client
 * with many jobs running yields to others. Late binding: an agent holds at most its slots (the
 * running job plus the next); everything else stays in intake. A job whose cheapest agent is
 * full waits for it, unless it has already waited longer than going elsewhere would cost — so
 * a job is never stuck behind a slow agent while another idles.
 */

export interface AgentView {
  id: string;
  /** slots left: AGENT_SLOTS minus jobs queued or running on it */
  free: number;
  inflight: number;
  /** typical run time of one job on this agent */
  avgJobMs: number;
  vramTotalMb: number;
  /** models in VRAM, least recently used first */
  resident: Set<string>;
  /** models a cache request pinned: never evicted */
  pinned?: Set<string>;
  /** models kept warm in host RAM: bringing one into VRAM costs a fraction of a cold load */
  warm?: Set<string>;
  models: Map<string, ModelInfo>;
}

export interface Candidate {
  jobId: string;
  /** the base model */
  model: string;
  /** the rest of the suite: refiner, VAE, LoRAs, ControlNets, upscaler */
  adapters?: string[];
  /** BullMQ-style priority rank: lower runs first */
  rank: number;
  waitedMs: number;
  client: string;
  activationMb: number;
}

export interface PlacementOptions {
  agingMs: number;
  /** how many jobs each client already has running, for fairness */
  running: Map<string, number>;
  /**
   * `affinity` (default) as described above; `fifo` is plain competing consumers — any agent
   * with a free slot, ignoring what is resident — kept as the benchmark's baseline.
   */
  policy?: 'affinity' | 'fifo';
  /** a warm (host RAM) model loads in this fraction of its cold load time; default 0.15 */
  warmLoadFactor?: number;
}

export type Decision =
  | { jobId: string; kind: 'place'; agentId: string; load: boolean }
  | { jobId: string; kind: 'wait' }
  | { jobId: string; kind: 'infeasible'; reason: string };

type AgentState = AgentView;

export function plan(candidates: Candidate[], agents: AgentView[], opts: PlacementOptions): Decision[] {
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
      // where this job may go now: its cheapest agent, or — if that one is full — a free one,
      // once the job has waited longer than the extra cost of going there
      const target = cheapest.a.free > 0
        ? cheapest
        : ranked.find((r) => r.a.free > 0 && (fifo || c.waitedMs >= r.cost - cheapest.cost));
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
    remaining = remaining.filter((x) => x !== c);
  }
  for (const c of remaining) decisions.push({ jobId: c.jobId, kind: 'wait' });
  return decisions;
}

const suite = (c: Candidate): string[] => [c.model, ...(c.adapters ?? [])];

/**
 * What an agent's VRAM will hold once the jobs already on its queue have run: heartbeats show
 * the present, but a job placed a moment ago will load its models and evict others (least
 * recently used, never pinned) before anything placed now runs. Without this, placement keeps
 * sending jobs for a model that a queued job is about to evict.
 */
export function projectResidency(a: Pick<AgentView, 'resident' | 'pinned' | 'models' | 'vramTotalMb'>, queued: { models: string[]; activationMb: number }[]): Set<string> {
  const resident = new Set(a.resident);
  const vram = (name: string) => a.models.get(name)?.vram_mb ?? 0;
  for (const { models: members, activationMb } of queued) {
    const missing = members.filter((name) => !resident.has(name) && a.models.has(name));
    let used = [...resident].reduce((s, name) => s + vram(name), 0);
    const need = missing.reduce((s, name) => s + vram(name), 0) + activationMb;
    for (const name of [...resident]) {
      if (used + need <= a.vramTotalMb) break;
      if (members.includes(name) || a.pinned?.has(name)) continue;
      resident.delete(name);
      used -= vram(name);
    }
    for (const name of members) {
      if (!a.models.has(name)) continue;
      resident.delete(name);
      resident.add(name); // most recently used
    }
  }
  return resident;
}

function infeasibleReason(c: Candidate, agents: AgentState[]): string {
  if (agents.length === 0) return 'no live agent';
  const missing = suite(c).filter((name) => !agents.some((a) => a.models.has(name)));
  if (missing.length) return `no live agent can load model ${missing.join(', ')}`;
  if (!agents.some((a) => suite(c).every((name) => a.models.has(name)))) return `no live agent has every model of this request (${suite(c).join(', ')})`;
  return `no live agent has enough VRAM for ${c.model} with this request`;
}
