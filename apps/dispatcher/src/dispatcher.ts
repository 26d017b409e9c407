import type { AgentHeartbeat } from '@kiln/contracts';
import { type AgentJobData, type AgentRegistry, type IntakeData, type PlacementReason, type Jobs, Keys, type Logger, lifecycle, type LoraRegistry, contextOf, agentJobId, tracer, tracingOn } from '@kiln/runtime';
import type { ConnectionOptions, Queue } from 'bullmq';
import type { Redis } from 'ioredis';
import { AgentQueues } from './agent-queues.js';
import { AgentViews } from './agent-views.js';
import type { DispatcherEnv } from './env.js';
import { Failover } from './failover.js';
import { IntakeView, type Waiting } from './intake-view.js';
import type { Lease } from './lease.js';
import { countPlacement, leader, noteTick, placementDecisions, placementTickSeconds } from './metrics.js';
import { type Candidate, planInSlices } from './placement.js';
import { placementReason } from './placement-reason.js';
import { Sweep } from './sweep.js';

/** Claims sent in one round trip (a fleet coming up can have a thousand slots free at once). */
const CLAIM_CHUNK = 100;

/** A placement decided this tick: the job, its agent, and why there. */
interface Placement {
  w: Waiting;
  agentId: string;
  reason: PlacementReason;
}

/** How old a registry snapshot a tick accepts (ms). */
const REGISTRY_SNAPSHOT_MS = 100;

/**
 * The active dispatcher's placement loop. Each tick, while holding the lease:
 *  1. a look at the registry (a snapshot up to REGISTRY_SNAPSHOT_MS old; a fresh one before
 *     any failover): lapsed agents are failed over (failover.ts), unless failover is held;
 *  2. every SWEEP_INTERVAL_MS, the repair sweep (sweep.ts);
 *  3. placement: waiting work through an incremental view (intake-view.ts: intake's ids only
 *     when it changed, a new entry and its record's placement fields read once), the fleet
 *     through kept agent views (agent-views.ts), a plan in slices that give the event loop back
 *     every PLAN_SLICE_MS (placement.ts), and for each decision the claim — the record moves to
 *     running and the entry leaves intake in one step, a tick's claims in one round trip —
 *     then the entries on the agents' queues, each agent's in the order placed.
 * Every step is idempotent, so a dispatcher killed at any line loses nothing: the next one
 * (or the same after restart) repeats the half-done step (a claimed job with no agent entry is
 * retried by the sweep).
 */
export class Dispatcher {
  private lastSweep = 0;
  private readonly queues: AgentQueues;
  private readonly waiting: IntakeView;
  private readonly views: AgentViews;
  private readonly failover: Failover;
  private readonly sweep: Sweep;
  /** the longest stretch one tick held the event loop while planning (ms), for the bench */
  longestPlanSliceMs = 0;
  /** when the lease was last renewed (asked at) */
  private renewedAt = 0;

  constructor(
    private readonly env: DispatcherEnv,
    private readonly log: Logger,
    connection: ConnectionOptions,
    private readonly intake: Queue<IntakeData>,
    private readonly jobs: Jobs,
    private readonly registry: AgentRegistry,
    private readonly lease: Lease,
    loras: LoraRegistry,
  ) {
    // main.ts passes the process's ioredis client as the connection
    const redis = connection as Redis;
    const keys = new Keys(env.KILN_PREFIX);
    this.queues = new AgentQueues(connection, env);
    this.waiting = new IntakeView(intake, redis, keys, env.INTAKE_WINDOW);
    this.views = new AgentViews(env, loras, this.queues, redis, keys);
    this.failover = new Failover(env, log, jobs, registry, this.queues);
    this.sweep = new Sweep(log, jobs, redis, intake, this.queues);
  }

  async tick(): Promise<void> {
    const wasLeader = this.lease.held;
    // a held lease is renewed at most every LEASE_TTL_MS / 5: ticks come with every wake
    const asked = Date.now();
    if (!wasLeader || asked - this.renewedAt >= this.env.LEASE_TTL_MS / 5) {
      if (!(await this.lease.acquireOrRenew())) {
        if (wasLeader) this.log.warn('lost the dispatcher lease; standing by');
        leader.set(0);
        return;
      }
      this.renewedAt = asked;
    }
    if (!wasLeader) {
      this.log.info({ owner: this.lease.owner }, 'holding the dispatcher lease: placing jobs');
      // another dispatcher may have placed meanwhile: what this one kept is read again
      this.everythingChanged();
    }
    leader.set(1);
    const timer = placementTickSeconds.startTimer();

    // heartbeats change every second: a snapshot up to REGISTRY_SNAPSHOT_MS old serves the
    // ticks in between (a drain or resume invalidates it); an agent is failed over only on a fresh read
    let { live, lapsed } = await this.registry.snapshot({ maxAgeMs: REGISTRY_SNAPSHOT_MS });
    if (lapsed.length > 0) ({ live, lapsed } = await this.registry.snapshot());
    await this.failover.handle(live.length, lapsed);
    if (Date.now() - this.lastSweep >= this.env.SWEEP_INTERVAL_MS) {
      this.lastSweep = Date.now();
      await this.sweep.run(live);
    }
    await this.place(live);
    noteTick(timer());
  }

  /** An agent's queue changed (its wake named it): placement reads it again. */
  agentChanged(agentId: string): void {
    this.views.changed(agentId);
  }

  /** An entry left an agent's queue (its wake named both): placement drops it from that agent's view. */
  agentEntryLeft(agentId: string, entryId: string): void {
    this.views.entryLeft(agentId, entryId);
  }

  /** An agent's resident models changed (its heartbeat says which): the next tick reads the registry again. */
  residencyChanged(): void {
    this.registry.invalidate();
  }

  /** A job was queued: the next tick reads intake's ids again. */
  intakeChanged(): void {
    this.waiting.changed();
  }

  /** A wake that names nothing (a drain or resume, a cancel): intake, every queue and the registry are read again. */
  everythingChanged(): void {
    this.waiting.changed();
    this.registry.invalidate();
    this.views.changedAll();
  }

  /** This process lost Redis: no failover until it is back (see Failover). */
  redisLost(): void {
    this.failover.redisLost();
  }

  /** Redis is back: agents get a full heartbeat TTL to write a fresh heartbeat before any failover. */
  redisRestored(downMs: number): void {
    this.failover.redisRestored(downMs);
  }

  private async place(live: AgentHeartbeat[]): Promise<void> {
    const { waiting, stale } = await this.waiting.refresh();
    // stale: canceled, finished or re-queued since it was queued
    await Promise.all(stale.map((id) => this.dropEntry(id)));
    if (waiting.length === 0) return;

    const { agents, running } = await this.views.build(live);
    const now = Date.now();
    // every slot taken (a saturated farm): a plan could only say "wait", or fail a job no agent
    // can run — which is due only once a job has waited UNSCHEDULABLE_GRACE_MS
    if (!agents.some((a) => a.free > 0) && !waiting.some((w) => now - Date.parse(w.job.created_at) >= this.env.UNSCHEDULABLE_GRACE_MS)) return;
    const byId = new Map<string, Waiting>();
    const candidates: Candidate[] = waiting.map((w) => {
      byId.set(w.job.id, w);
      return { jobId: w.job.id, ...w.demand, rank: w.rank, waitedMs: now - w.timestamp, client: w.job.client, work: w.work };
    });
    const opts = { agingMs: this.env.AGING_MS, running, policy: this.env.PLACEMENT_POLICY, warmLoadFactor: this.env.WARM_LOAD_FACTOR };
    const { decisions, longestSliceMs } = await planInSlices(candidates, agents, opts, this.env.PLAN_SLICE_MS);
    this.longestPlanSliceMs = Math.max(this.longestPlanSliceMs, longestSliceMs);

    const placements: Placement[] = [];
    const ends: Promise<void>[] = [];
    const views = new Map(agents.map((a) => [a.id, a]));
    for (const d of decisions) {
      const w = byId.get(d.jobId)!;
      if (d.kind === 'wait') continue;
      if (d.kind === 'infeasible') {
        if (now - Date.parse(w.job.created_at) >= this.env.UNSCHEDULABLE_GRACE_MS) ends.push(this.unschedulable(w, d.reason));
        continue;
      }
      placements.push({ w, agentId: d.agentId, reason: placementReason(views.get(d.agentId)!, w.demand) });
    }
    await Promise.all([...ends, this.claim(placements, now)]);
  }

  private async unschedulable(w: Waiting, reason: string): Promise<void> {
    const failed = await this.jobs.update(w.job.id, { status: ['queued'], attempt: w.job.attempt }, {
      status: 'failed',
      stage: 'done',
      error: { code: 'unschedulable', message: `${reason}; gave up after ${this.env.UNSCHEDULABLE_GRACE_MS} ms`, retryable: false },
      finished_at: new Date().toISOString(),
    });
    if (failed) placementDecisions.inc({ decision: 'unschedulable', reason: 'none' }); // its end is logged with its code
    await this.dropEntry(w.entryId);
  }

  /**
   * Claims the tick's placements, CLAIM_CHUNK at a time: each chunk's claims on their records
   * (guarded writes that also take each entry out of intake) in one round trip, then each agent's
   * claimed jobs on its queue, in the order placed, which is the order it runs them. Chunks keep
   * what one turn of the event loop builds and decodes small when a whole fleet's slots are free
   * at once. A refused claim (the job moved on since it was read) drops its entry; a claimed job
   * whose agent entry is lost with a crash here is put back by the sweep.
   */
  private async claim(placements: Placement[], now: number): Promise<void> {
    for (let i = 0; i < placements.length; i += CLAIM_CHUNK) await this.claimChunk(placements.slice(i, i + CLAIM_CHUNK), now);
  }

  private async claimChunk(placements: Placement[], now: number): Promise<void> {
    if (placements.length === 0) return;
    // a span per placement in the job's trace (tracing.ts), under the API request that submitted it
    const spans = tracingOn()
      ? await Promise.all(
          placements.map(async ({ w, agentId, reason }) =>
            tracer().startSpan('dispatcher place', { attributes: { 'kiln.job': w.job.id, 'kiln.agent': agentId, 'kiln.placement.reason': reason } }, contextOf(await this.jobs.store.traceOf(w.job.id))),
          ),
        )
      : [];
    const claimed = await this.jobs.claimMany(placements.map(({ w, agentId, reason }) => ({ job: w.job, agent: agentId, message: `placed on ${agentId} (${reason.replace('_', ' ')})` })));
    const perAgent = new Map<string, { p: Placement; entryId: string; data: AgentJobData }[]>();
    const dropped: Promise<void>[] = [];
    placements.forEach((p, i) => {
      const c = claimed[i];
      if (!c) return void dropped.push(this.dropEntry(p.w.entryId));
      const { job, demand, work } = p.w;
      const data: AgentJobData = {
        job_id: job.id,
        attempt: c.attempt,
        client: job.client,
        models: [demand.model, ...(demand.adapters ?? [])],
        activation_mb: demand.activationMb,
        ...(work ? { work } : {}),
      };
      perAgent.set(p.agentId, [...(perAgent.get(p.agentId) ?? []), { p, entryId: agentJobId(job.id, c.attempt), data }]);
    });
    await Promise.all([
      ...dropped,
      ...[...perAgent].map(async ([agentId, entries]) => {
        const queue = this.queues.get(agentId);
        // one entry (the usual case on a busy farm) is one script call; addBulk is a MULTI around several
        if (entries.length === 1) await queue.add(entries[0]!.p.w.name, entries[0]!.data, { jobId: entries[0]!.entryId });
        else await queue.addBulk(entries.map(({ p, entryId, data }) => ({ name: p.w.name, data, opts: { jobId: entryId } })));
        for (const { p, entryId, data } of entries) {
          this.views.added(agentId, entryId, data);
          countPlacement(p.reason);
          lifecycle.placed({ ...p.w.job, model: p.w.model }, agentId, data.attempt, p.reason, now - p.w.timestamp);
          this.waiting.forget(p.w.entryId);
        }
      }),
    ]);
    for (const span of spans) span.end();
  }

  private async dropEntry(entryId: string): Promise<void> {
    this.waiting.forget(entryId);
    await this.intake.remove(entryId).catch(() => {});
  }

  async close(): Promise<void> {
    await this.queues.close();
  }
}
