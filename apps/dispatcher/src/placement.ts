import type { ModelInfo } from '@kiln/contracts';

/**
 * Placement, as a pure function of what the dispatcher sees, so it can be tested and
 * benchmarked without Redis.
 *
 * For each waiting job (most urgent first) the cost of running it on an agent is the
 * agent's expected wait plus the cold-load time of its model when the agent does not hold it.
 * The job goes to the cheapest agent if that agent has a free slot (late binding keeps each
 * agent at about one job beyond the running one). If the cheapest agent is full, the job
 * waits for it — unless it has already waited longer than going elsewhere would cost, so a
 * job is never stuck behind a slow agent while another idles.
 */

export interface AgentView {
  id: string;
  /** slots left: AGENT_SLOTS minus jobs queued or running on it */
  free: number;
  inflight: number;
  /** typical run time of one job on this agent */
  avgJobMs: number;
  vramTotalMb: number;
  resident: Set<string>;
  models: Map<string, ModelInfo>;
}

export interface Candidate {
  jobId: string;
  model: string;
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
}

export type Decision =
  | { jobId: string; kind: 'place'; agentId: string; load: boolean }
  | { jobId: string; kind: 'wait' }
  | { jobId: string; kind: 'infeasible'; reason: string };

export function plan(candidates: Candidate[], agents: AgentView[], opts: PlacementOptions): Decision[] {
  const state = agents.map((a) => ({ ...a, resident: new Set(a.resident) }));
  const running = new Map(opts.running);
  const urgency = (c: Candidate) => c.rank - c.waitedMs / opts.agingMs;
  const order = [...candidates].sort(
    (a, b) =>
      urgency(a) - urgency(b) ||
      (running.get(a.client) ?? 0) - (running.get(b.client) ?? 0) ||
      b.waitedMs - a.waitedMs,
  );

  const decisions: Decision[] = [];
  for (const c of order) {
    const feasible = state.filter((a) => {
      const m = a.models.get(c.model);
      return m !== undefined && m.vram_mb + c.activationMb <= a.vramTotalMb;
    });
    if (feasible.length === 0) {
      const anyHasModel = state.some((a) => a.models.has(c.model));
      decisions.push({
        jobId: c.jobId,
        kind: 'infeasible',
        reason: state.length === 0
          ? 'no live agent'
          : anyHasModel
            ? `no live agent has enough VRAM for ${c.model} with this request`
            : `no live agent can load model ${c.model}`,
      });
      continue;
    }
    const cost = (a: (typeof state)[number]) =>
      a.inflight * a.avgJobMs + (a.resident.has(c.model) ? 0 : a.models.get(c.model)!.load_ms);
    const byCost = [...feasible].sort((a, b) => cost(a) - cost(b) || a.inflight - b.inflight || a.id.localeCompare(b.id));
    const best = byCost[0]!;
    const open = byCost.find((a) => a.free > 0);
    let chosen: (typeof state)[number] | undefined;
    if (best.free > 0) chosen = best;
    else if (open && c.waitedMs >= cost(open) - cost(best)) chosen = open;

    if (!chosen) {
      decisions.push({ jobId: c.jobId, kind: 'wait' });
      continue;
    }
    const load = !chosen.resident.has(c.model);
    decisions.push({ jobId: c.jobId, kind: 'place', agentId: chosen.id, load });
    chosen.free -= 1;
    chosen.inflight += 1;
    chosen.resident.add(c.model);
    running.set(c.client, (running.get(c.client) ?? 0) + 1);
  }
  return decisions;
}
