import { AgentState, type Priority } from '@kiln/contracts';
import { type AgentRegistry, Counter, Gauge, Histogram, type IntakeData, type Keys, type PlacementReason, PRIORITY_RANK, registry } from '@kiln/runtime';
import { monitorEventLoopDelay } from 'node:perf_hooks';
import type { Queue } from 'bullmq';
import type { Redis } from 'ioredis';
import { readWaiting } from './intake-view.js';

/**
 * The dispatcher's metrics: placement (tick time, decisions and why), the queue depth meant for
 * autoscaling and its breakdown, the fleet by state, failovers and the webhook messages given up
 * on. Every dispatcher reports the queue and the fleet (read from Redis at scrape time, so a
 * standby's figures are as good as the leader's: take `max` across dispatchers); only the leader
 * counts placements.
 */

export const placementTickSeconds = new Histogram({
  name: 'kiln_placement_tick_seconds',
  help: "One placement tick of the lease holder: failover, sweep (when due) and placement",
  buckets: [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5],
  registers: [registry],
});

let tickMax = 0;
/** Notes a tick's duration for the longest-tick gauge. */
export function noteTick(seconds: number): void {
  tickMax = Math.max(tickMax, seconds);
}
export const placementTickMax = new Gauge({
  name: 'kiln_placement_tick_max_seconds',
  help: 'The longest placement tick (wall time, awaits included) since the previous scrape',
  registers: [registry],
  collect() {
    this.set(tickMax);
    tickMax = 0;
  },
});

/** The longest the dispatcher's event loop was held (a timer came late), reset by each scrape. */
const loopDelay = monitorEventLoopDelay({ resolution: 1 });
loopDelay.enable();
export const eventLoopBlockMax = new Gauge({
  name: 'kiln_dispatcher_event_loop_block_max_seconds',
  help: 'The longest stretch the dispatcher held its event loop (placement, reads, GC) since the previous scrape',
  registers: [registry],
  collect() {
    this.set(loopDelay.max / 1e9);
    loopDelay.reset();
  },
});

export const placementDecisions = new Counter({
  name: 'kiln_placement_decisions_total',
  help: 'Placement decisions: placed (reason: model_resident, load_needed, eviction), waiting (no slot worth taking yet), unschedulable (no live agent can run it; counted when it fails)',
  labelNames: ['decision', 'reason'] as const,
  registers: [registry],
});

export const failovers = new Counter({
  name: 'kiln_agent_failovers_total',
  help: 'Agents whose heartbeat lapsed and whose jobs were re-placed',
  registers: [registry],
});

export const webhookMessagesFailed = new Counter({
  name: 'kiln_webhook_messages_failed_total',
  help: 'Webhook messages given up on after their last try (WEBHOOK_MAX_ATTEMPTS) or refused',
  registers: [registry],
});

export const leader = new Gauge({
  name: 'kiln_dispatcher_leader',
  help: '1 while this dispatcher holds the placement lease',
  registers: [registry],
});

/** BullMQ priority rank on intake → the request's priority (a batch child ranks one below its peers). */
function priorityOf(rank: number | undefined): Priority {
  const r = rank ?? PRIORITY_RANK.normal;
  if (r < PRIORITY_RANK.normal) return 'high';
  if (r < PRIORITY_RANK.low) return 'normal';
  return 'low';
}

/** Jobs read per scrape for the breakdown; the total is exact whatever the depth. */
const BREAKDOWN_LIMIT = 5_000;

/** Queue-depth and fleet gauges, read from Redis when Prometheus scrapes. */
export function registerQueueGauges(intake: Queue<IntakeData>, redis: Redis, keys: Keys, agents: AgentRegistry): void {
  new Gauge({
    name: 'kiln_queue_depth',
    help: 'Jobs waiting for a GPU (queued, not yet placed on an agent): the series to autoscale agents on',
    registers: [registry],
    async collect() {
      const counts = await intake.getJobCounts('waiting', 'prioritized', 'delayed');
      this.set(Object.values(counts).reduce((s, n) => s + n, 0));
    },
  });
  new Gauge({
    name: 'kiln_queue_jobs',
    help: `Jobs waiting for a GPU by priority, model and tenant (the first ${BREAKDOWN_LIMIT} in queue order)`,
    labelNames: ['priority', 'model', 'tenant'] as const,
    registers: [registry],
    async collect() {
      // the placement fields only, a chunk at a time (readWaiting): a scrape of a deep backlog
      // must not hold the lease holder's event loop
      const ids = [...new Set(await intake.getRanges(['prioritized', 'waiting', 'delayed'], 0, BREAKDOWN_LIMIT - 1, true))];
      const { waiting } = await readWaiting(redis, keys, intake, ids); // a stale entry is placement's to drop
      this.reset();
      for (const w of waiting.values()) this.inc({ priority: priorityOf(w.rank), model: w.model ?? 'cache', tenant: w.job.client });
    },
  });
  new Gauge({
    name: 'kiln_agents',
    help: 'Live agents by state (starting, ready, busy, draining, defunct)',
    labelNames: ['state'] as const,
    registers: [registry],
    async collect() {
      const live = await agents.live();
      for (const state of AgentState.options) this.set({ state }, live.filter((a) => a.state === state).length);
    },
  });
}

/** The reason a placement was made, as its counter and log line name it. */
export function countPlacement(reason: PlacementReason): void {
  placementDecisions.inc({ decision: 'placed', reason });
}
