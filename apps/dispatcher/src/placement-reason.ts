import type { PlacementReason } from '@kiln/runtime';
import type { AgentView, Candidate } from './placement.js';

/**
 * Why a placement was made, for its log line and counter: the job's models were resident on the
 * agent, had to be loaded into free VRAM, or had to push other models out. Decided on the agent's
 * projected residency, which it then updates as the worker would (the suite becomes most
 * recently used; least recently used unpinned models leave until it fits), so several
 * placements on one agent in one tick are each explained against what the ones before left.
 */
export function placementReason(agent: AgentView, job: Pick<Candidate, 'model' | 'adapters' | 'activationMb'>): PlacementReason {
  const members = [job.model, ...(job.adapters ?? [])];
  const missing = members.filter((name) => !agent.resident.has(name));
  const mb = (name: string) => agent.models.get(name)?.vram_mb ?? 0;
  let reason: PlacementReason = 'model_resident';
  if (missing.length > 0) {
    let used = [...agent.resident].reduce((s, name) => s + mb(name), 0);
    const need = missing.reduce((s, name) => s + mb(name), 0) + job.activationMb;
    reason = 'load_needed';
    for (const name of [...agent.resident]) {
      if (used + need <= agent.vramTotalMb) break;
      if (members.includes(name) || agent.pinned?.has(name)) continue;
      agent.resident.delete(name);
      used -= mb(name);
      reason = 'eviction';
    }
  }
  for (const name of members) {
    agent.resident.delete(name);
    agent.resident.add(name);
  }
  return reason;
}
