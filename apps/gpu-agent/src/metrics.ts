import { AgentState, type WorkerState } from '@kiln/contracts';
import { Counter, Gauge, registry } from '@kiln/runtime';
import type { WorkerProcess } from './worker-process.js';

/**
 * The agent's metrics: its state, how much of the time its GPU works, what moves in and out of
 * VRAM and host RAM, and why its worker was restarted. Every series carries the `agent` label
 * (a default label of this process's registry).
 */

const stateGauge = new Gauge({
  name: 'kiln_agent_state',
  help: "1 for the agent's current state (starting, ready, busy, draining, defunct), 0 for the others",
  labelNames: ['state'] as const,
  registers: [registry],
});

/** Seconds the worker spent on requests; the GPU busy fraction is rate() of it. */
class BusyClock {
  private since: number | null = null;
  private pending = 0;
  busy(): void {
    this.since ??= performance.now();
  }
  idle(): void {
    if (this.since === null) return;
    this.pending += (performance.now() - this.since) / 1000;
    this.since = null;
  }
  /** Seconds accrued since the last take, the running request's so far included. */
  take(): number {
    if (this.since !== null) {
      const now = performance.now();
      this.pending += (now - this.since) / 1000;
      this.since = now;
    }
    const s = this.pending;
    this.pending = 0;
    return s;
  }
}
const clock = new BusyClock();

new Counter({
  name: 'kiln_gpu_busy_seconds_total',
  help: "Seconds this agent's worker spent running requests; rate() of it is the GPU busy fraction",
  registers: [registry],
  collect() {
    this.inc(clock.take());
  },
});

const modelLoads = new Counter({
  name: 'kiln_model_loads_total',
  help: 'Models brought into a tier, by the tier they came from: disk (a cold load) or ram (warm in host RAM, into VRAM)',
  labelNames: ['tier'] as const,
  registers: [registry],
});

const modelEvictions = new Counter({
  name: 'kiln_model_evictions_total',
  help: 'Models that left a tier: vram (moved to host RAM or dropped) or ram (dropped)',
  labelNames: ['tier'] as const,
  registers: [registry],
});

const workerRestarts = new Counter({
  name: 'kiln_worker_restarts_total',
  help: 'Worker processes replaced, by cause: crash, killed (to stop a request), protocol (broke the protocol), start_failed',
  labelNames: ['cause'] as const,
  registers: [registry],
});

let lastState: WorkerState | null = null;
const mb = 1024 * 1024;
new Gauge({
  name: 'kiln_vram_bytes',
  help: "The worker's VRAM: total, and used by resident models",
  labelNames: ['kind'] as const,
  registers: [registry],
  collect() {
    this.set({ kind: 'total' }, (lastState?.vram_total_mb ?? 0) * mb);
    this.set({ kind: 'used' }, (lastState?.vram_used_mb ?? 0) * mb);
  },
});

export const agentMetrics = {
  /** Names this process's series after its agent. */
  init(agentId: string): void {
    registry.setDefaultLabels({ agent: agentId });
  },

  state(state: AgentState): void {
    for (const s of AgentState.options) stateGauge.set({ state: s }, s === state ? 1 : 0);
  },

  busy: () => clock.busy(),
  idle: () => clock.idle(),

  /**
   * Follows one worker: loads and evictions from the difference between the residency it reports
   * after each request, and the cause of its exit when it was not asked to stop.
   */
  watch(w: WorkerProcess): void {
    let prev: WorkerState | null = null;
    w.on('state', (next) => {
      prev ??= w.ready?.state ?? null;
      if (prev) countMoves(prev, next);
      prev = next;
      lastState = next;
    });
    w.on('exit', (err) => {
      clock.idle();
      if (!err && w.ready) return; // stopped on purpose
      const cause = !w.ready ? 'start_failed' : err?.code === 'canceled' ? 'killed' : err?.code === 'worker_protocol' ? 'protocol' : 'crash';
      workerRestarts.inc({ cause });
    });
  },
};

/** Counts what moved between two residency reports of one worker. */
export function countMoves(before: WorkerState, after: WorkerState): void {
  const was = new Map(before.resident.map((r) => [r.name, r.location]));
  const now = new Map(after.resident.map((r) => [r.name, r.location]));
  for (const [name, loc] of now) {
    const from = was.get(name);
    if (from === loc) continue;
    if (from === undefined) modelLoads.inc({ tier: 'disk' });
    else if (from === 'ram' && loc === 'vram') modelLoads.inc({ tier: 'ram' });
    else if (from === 'vram' && loc === 'ram') modelEvictions.inc({ tier: 'vram' });
  }
  for (const [name, loc] of was) if (!now.has(name)) modelEvictions.inc({ tier: loc });
}
