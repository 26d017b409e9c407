import type { AgentHeartbeat, ModelInfo } from '@kiln/contracts';
import {
  type AgentJobData,
  type AgentRegistry,
  agentJobId,
  entryName,
  type IntakeData,
  keepHistory,
  intakeJobId,
  type Jobs,
  Keys,
  isConnectionError,
  KilnError,
  type Logger,
  lifecycle,
  type LoraRegistry,
  QUEUES,
  quietErrors,
  contextOf,
  tracer,
  tracingOn,
} from '@kiln/runtime';
import { Queue, type ConnectionOptions } from 'bullmq';
import type { Redis } from 'ioredis';
import type { DispatcherEnv } from './env.js';
import type { Lease } from './lease.js';
import { countPlacement, failovers, leader, placementDecisions, placementTickSeconds } from './metrics.js';
import { demandOf, HeldView, IntakeView, runMsOf, type Waiting } from './intake-view.js';
import { type AgentView, type Candidate, planInSlices, projectResidency } from './placement.js';
import { placementReason } from './placement-reason.js';


/** How old a registry snapshot a tick accepts (ms). */
const REGISTRY_SNAPSHOT_MS = 100;
/** How often the list of trained LoRAs is read (ms); a new one is usable on agents within this. */
const TRAINED_LORAS_MS = 1_000;

type AgentBase = Pick<AgentView, 'vramTotalMb' | 'resident' | 'pinned' | 'models'>;

/**
 * The active dispatcher's loop. Each tick, while holding the lease:
 *  1. agents whose heartbeat lapsed: their queued and running jobs go back to intake
 *     (attempt + 1 at the next placement), and their queue is removed — unless failover is
 *     held: a Redis outage is not an agent death, so while this process has lost Redis, for
 *     AGENT_TTL_MS after it is back, and for AGENT_TTL_MS after every agent lapsed at once
 *     (Redis stalled, or its clock jumped), agents get a full TTL of fresh heartbeats first;
 *  2. every few seconds, a sweep that repairs anything a crash left half-done: a queued job
 *     missing from intake is added again, a running job whose agent no longer holds it is
 *     retried, ends not yet announced (webhook, group end) are announced, and a job no live
 *     agent can run fails as unschedulable after a grace period;
 *  3. placement: look at intake through an incremental view (IntakeView: ids each tick, a new
 *     entry and its record read once), plan in slices that give the event loop back every
 *     PLAN_SLICE_MS, and for each decision claim the job on its record (a guarded write — the
 *     claim), hand it to the agent's queue, then drop the intake entry; agents are claimed for
 *     in parallel, each agent's jobs in order.
 * Every step is idempotent, so a dispatcher killed at any line loses nothing: the next one
 * (or the same after restart) repeats the half-done step.
 */
export class Dispatcher {
  private readonly agentQueues = new Map<string, Queue<AgentJobData>>();
  private lastSweep = 0;
  /** no failover before this time (ms); Infinity while Redis is away */
  private holdUntil = 0;
  private holdReason = '';
  private holdLogged = false;
  /** agents live at the last look, to tell "every agent lapsed at once" from agents dying one by one */
  private liveBefore = 0;
  private readonly waiting: IntakeView;
  private readonly held: HeldView;
  /** the longest stretch one tick held the event loop while planning (ms), for the bench */
  longestPlanSliceMs = 0;
  /** when every agent's queue was last read (HeldView) */
  private lastFullRead = 0;
  /** when the lease was last renewed (asked at) */
  private renewedAt = 0;
  /** each heartbeat's part of its agent's view (a registry snapshot keeps a heartbeat's object until it changes) */
  private readonly bases = new WeakMap<AgentHeartbeat, { trained: ModelInfo[]; base: AgentBase }>();
  private readonly trained: { at: number; list: ModelInfo[] } = { at: -Infinity, list: [] };
  /** each usable agent's view, and what it was built from */
  private readonly views = new Map<string, { key: { hb: AgentHeartbeat; trained: ModelInfo[]; held: unknown[]; n: number; avgJobMs: number }; view: AgentView }>();

  constructor(
    private readonly env: DispatcherEnv,
    private readonly log: Logger,
    private readonly connection: ConnectionOptions,
    private readonly intake: Queue<IntakeData>,
    private readonly jobs: Jobs,
    private readonly registry: AgentRegistry,
    private readonly lease: Lease,
    private readonly loras: LoraRegistry,
  ) {
    // main.ts passes the process's ioredis client as the connection
    const keys = new Keys(env.KILN_PREFIX);
    this.waiting = new IntakeView(intake, connection as Redis, keys, env.INTAKE_WINDOW);
    this.held = new HeldView(connection as Redis, keys);
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
    if (!wasLeader) this.log.info({ owner: this.lease.owner }, 'holding the dispatcher lease: placing jobs');
    leader.set(1);
    const timer = placementTickSeconds.startTimer();

    // heartbeats change every second: a snapshot up to REGISTRY_SNAPSHOT_MS old serves the
    // ticks in between (a drain or resume invalidates it); an agent is failed over only on a fresh read
    let { live, lapsed } = await this.registry.snapshot({ maxAgeMs: REGISTRY_SNAPSHOT_MS });
    if (lapsed.length > 0) ({ live, lapsed } = await this.registry.snapshot());
    if (lapsed.length > 0 && live.length === 0 && this.liveBefore > 0) {
      this.hold(Date.now() + this.env.AGENT_TTL_MS, `every agent (${lapsed.length}) lapsed at once`);
    }
    this.liveBefore = live.length;
    if (lapsed.length > 0 && Date.now() < this.holdUntil) {
      if (!this.holdLogged) {
        this.holdLogged = true;
        this.log.warn({ agents: lapsed, reason: this.holdReason, waitMs: Number.isFinite(this.holdUntil) ? this.holdUntil - Date.now() : null }, 'heartbeats lapsed; waiting for fresh ones before failing any agent over');
      }
    } else {
      for (const agentId of lapsed) await this.failover(agentId);
    }
    if (Date.now() - this.lastSweep >= this.env.SWEEP_INTERVAL_MS) {
      this.lastSweep = Date.now();
      await this.sweep(live);
    }
    await this.place(live);
    timer();
  }

  /** An agent's queue changed (its wake named it): placement reads it again. */
  agentChanged(agentId: string): void {
    this.held.changed(agentId);
  }

  /** A job was queued: the next tick reads intake's ids again. */
  intakeChanged(): void {
    this.waiting.changed();
  }

  /** A wake that names nothing (a drain or resume, a cancel): intake, every queue and the registry are read again. */
  everythingChanged(): void {
    this.waiting.changed();
    this.registry.invalidate();
    this.lastFullRead = 0;
  }

  /** This process lost Redis: no failover until it is back (see `redisRestored`). */
  redisLost(): void {
    this.hold(Infinity, 'Redis connection lost');
  }

  /** Redis is back: agents get a full heartbeat TTL to write a fresh heartbeat before any failover. */
  redisRestored(downMs: number): void {
    this.holdUntil = 0;
    this.hold(Date.now() + this.env.AGENT_TTL_MS, `Redis was away for ${downMs} ms`);
  }

  private hold(until: number, reason: string): void {
    if (until <= this.holdUntil) return;
    this.holdUntil = until;
    this.holdReason = reason;
    this.holdLogged = false;
  }

  private agentQueue(agentId: string): Queue<AgentJobData> {
    let q = this.agentQueues.get(agentId);
    if (!q) {
      // finished and failed entries stay for Bull Board, bounded (QUEUE_KEEP_*)
      q = quietErrors(
        new Queue<AgentJobData>(QUEUES.agent(agentId), { connection: this.connection, prefix: this.env.KILN_PREFIX, defaultJobOptions: keepHistory(this.env) }),
        `queue agent.${agentId}`,
      );
      this.agentQueues.set(agentId, q);
    }
    return q;
  }

  /** An agent stopped heartbeating: everything it held goes back to placement. */
  async failover(agentId: string): Promise<void> {
    const queue = this.agentQueue(agentId);
    const held = await queue.getJobs(['active', 'waiting', 'prioritized', 'delayed']);
    const lost = new KilnError('agent_lost', `agent ${agentId} stopped heartbeating`);
    for (const entry of held) {
      if (!entry?.data) continue;
      const job = await this.jobs.store.get(entry.data.job_id);
      if (job && job.status === 'running' && job.agent === agentId && job.attempt === entry.data.attempt) {
        this.log.warn({ job: job.id, agent: agentId, attempt: job.attempt }, 'agent lost: re-placing its job');
        await this.jobs.retryOrFail(job, lost, job.attempt);
      }
    }
    await queue.obliterate({ force: true });
    await queue.close();
    this.agentQueues.delete(agentId);
    await this.registry.remove(agentId);
    failovers.inc();
    this.log.warn({ agent: agentId, jobs: held.length }, 'agent removed after its heartbeat lapsed');
  }

  private async sweep(live: AgentHeartbeat[]): Promise<void> {
    // ends whose announcement a crash (or an outage) interrupted: webhooks, group ends
    const announced = await this.jobs.drainAnnouncements().catch((err) => {
      if (!isConnectionError(err)) this.log.warn({ err: err instanceof Error ? err.message : String(err) }, 'could not announce every ended job; next sweep retries');
      return 0;
    });
    if (announced > 0) this.log.info({ announced }, 'announced ends a crash or outage had left in the outbox');
    const ids = await this.jobs.store.activeIds();
    const records = await this.jobs.store.getMany(ids);
    const liveIds = new Set(live.map((a) => a.agent_id));
    // whether each queued job has its intake entry: one EXISTS each, sent together
    const queued = records.filter((j) => j?.status === 'queued');
    const pipe = (this.connection as Redis).pipeline();
    for (const job of queued) pipe.exists(this.intake.toKey(intakeJobId(job!.id, job!.attempt)));
    const inIntake = new Map(((await pipe.exec()) ?? []).map(([, n], i) => [queued[i]!.id, n === 1]));
    for (const job of records) {
      if (!job) continue;
      if (job.status === 'queued') {
        if (!inIntake.get(job.id)) {
          this.log.warn({ job: job.id }, 'queued job was missing from intake: adding it again');
          await this.jobs.enqueue(job);
        }
      } else if (job.status === 'running' && job.agent && liveIds.has(job.agent)) {
        const entry = await this.agentQueue(job.agent).getJob(agentJobId(job.id, job.attempt));
        // a finished entry kept for Bull Board is not held either: its processor is done with it
        if (!entry || entry.finishedOn) {
          // re-read: the agent may have finished it between our two reads
          const now = await this.jobs.store.get(job.id);
          if (now?.status === 'running' && now.attempt === job.attempt) {
            await this.jobs.retryOrFail(now, new KilnError('agent_lost', `agent ${job.agent} no longer holds the job`), job.attempt);
          }
        }
      }
    }
  }

  private async place(live: AgentHeartbeat[]): Promise<void> {
    const { waiting, stale } = await this.waiting.refresh();
    // stale: canceled, finished or re-queued since it was queued
    await Promise.all(stale.map((id) => this.dropEntry(id)));
    if (waiting.length === 0) return;

    const { agents, running } = await this.agentViews(live);
    const now = Date.now();
    const byId = new Map<string, Waiting>();
    const candidates: Candidate[] = waiting.map((w) => {
      byId.set(w.job.id, w);
      return { jobId: w.job.id, ...w.demand, rank: w.rank, waitedMs: now - w.timestamp, client: w.job.client, work: w.work };
    });
    const opts = { agingMs: this.env.AGING_MS, running, policy: this.env.PLACEMENT_POLICY, warmLoadFactor: this.env.WARM_LOAD_FACTOR };
    const { decisions, longestSliceMs } = await planInSlices(candidates, agents, opts, this.env.PLAN_SLICE_MS);
    this.longestPlanSliceMs = Math.max(this.longestPlanSliceMs, longestSliceMs);

    const perAgent = new Map<string, Waiting[]>();
    const ends: Promise<void>[] = [];
    for (const d of decisions) {
      const w = byId.get(d.jobId)!;
      if (d.kind === 'wait') continue;
      if (d.kind === 'infeasible') {
        if (now - Date.parse(w.job.created_at) >= this.env.UNSCHEDULABLE_GRACE_MS) ends.push(this.unschedulable(w, d.reason));
        continue;
      }
      perAgent.set(d.agentId, [...(perAgent.get(d.agentId) ?? []), w]);
    }
    const views = new Map(agents.map((a) => [a.id, a]));
    // agents in parallel; each agent's jobs in the order placed, which is the order it runs them
    await Promise.all([
      ...ends,
      ...[...perAgent].map(async ([agentId, ws]) => {
        for (const w of ws) await this.claim(w, agentId, views.get(agentId)!, now);
      }),
    ]);
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

  /** Claims the job on its record for `agentId` (the guarded write), hands it to the agent's queue, drops its intake entry. */
  private async claim(w: Waiting, agentId: string, view: AgentView, now: number): Promise<void> {
    const { job, demand } = w;
    const reason = placementReason(view, demand);
    // a span in the job's trace (tracing.ts), under the API request that submitted it
    const span = tracingOn()
      ? tracer().startSpan('dispatcher place', { attributes: { 'kiln.job': job.id, 'kiln.agent': agentId, 'kiln.placement.reason': reason } }, contextOf(await this.jobs.store.traceOf(job.id)))
      : null;
    // the claim takes the entry out of intake in the same step
    const claimed = await this.jobs.claim(job, agentId, `placed on ${agentId} (${reason.replace('_', ' ')})`);
    if (claimed) {
      const data = {
        job_id: job.id,
        attempt: claimed.attempt,
        client: job.client,
        models: [demand.model, ...(demand.adapters ?? [])],
        activation_mb: demand.activationMb,
        ...(w.work ? { work: w.work } : {}),
      };
      const entryId = agentJobId(job.id, claimed.attempt);
      await this.agentQueue(agentId).add(entryName(claimed), data, { jobId: entryId });
      this.held.added(agentId, entryId, data);
      countPlacement(reason);
      lifecycle.placed(claimed, agentId, reason, now - w.timestamp);
      this.waiting.forget(w.entryId);
    }
    span?.end();
    if (!claimed) await this.dropEntry(w.entryId);
  }

  private async dropEntry(entryId: string): Promise<void> {
    this.waiting.forget(entryId);
    await this.intake.remove(entryId).catch(() => {});
  }

  /** What placement needs of each usable agent, and how many jobs each client has on agents. */
  private async agentViews(live: AgentHeartbeat[]): Promise<{ agents: AgentView[]; running: Map<string, number> }> {
    const usable = live.filter((a) => a.capabilities && (a.state === 'ready' || a.state === 'busy'));
    const running = new Map<string, number>();
    // an agent with no finished job yet is assumed as fast as the others; with no history at
    // all, jobs are assumed short next to model loads, so affinity wins until measured
    const known = usable.map((a) => a.avg_job_ms).filter((v): v is number => v !== null);
    const fleetJobMs = known.length ? known.reduce((s, v) => s + v, 0) / known.length : 0;
    const trained = await this.trainedLoras();
    // every queue is read again every SWEEP_INTERVAL_MS (running jobs' start times, anything
    // added without a wake); in between only the queues whose agent named itself
    const full = Date.now() - this.lastFullRead >= this.env.SWEEP_INTERVAL_MS;
    if (full) this.lastFullRead = Date.now();
    const heldBy = await this.held.read(new Map(usable.map((a) => [a.agent_id, this.agentQueue(a.agent_id)])), full);
    const now = Date.now();
    const agents = usable.map((a): AgentView => {
      // held jobs, oldest first: the running one, then the next
      const held = heldBy.get(a.agent_id) ?? [];
      for (const h of held) if (h.data.client) running.set(h.data.client, (running.get(h.data.client) ?? 0) + 1);
      const avgJobMs = a.avg_job_ms ?? fleetJobMs;
      const stepMs = a.step_ms ?? {};
      // the view is built again only when the heartbeat, what the agent holds or the trained
      // LoRAs changed (placement copies what it changes)
      const key = { hb: a, trained, held, n: held.length, avgJobMs };
      let cached = this.views.get(a.agent_id);
      if (!cached || Object.entries(key).some(([k, v]) => cached!.key[k as keyof typeof key] !== v)) {
        const base = this.baseView(a, trained);
        const projected = projectResidency(base, held.map((h) => ({ models: h.data.models ?? [], activationMb: h.data.activation_mb ?? 0 })));
        const view: AgentView = {
          ...base,
          id: a.agent_id,
          free: Math.max(0, this.env.AGENT_SLOTS - held.length),
          inflight: held.length,
          avgJobMs,
          busyMs: 0,
          runMs: (c) => runMsOf(c.work, stepMs, avgJobMs),
          resident: projected,
          warm: new Set(a.resident.filter((r) => r.location === 'ram' && !projected.has(r.name)).map((r) => r.name)),
        };
        cached = { key, view };
        this.views.set(a.agent_id, cached);
      }
      // what it holds runs for: each job's known work at this agent's step time, less what its GPU
      // has run since the first of them was taken. The agent takes two entries at once and runs
      // them one after another (the next prepares meanwhile), so a later entry's processedOn says
      // when it was taken, not when it reached the GPU
      const first = held.reduce((m, h) => (h.processedOn !== null && h.processedOn < m ? h.processedOn : m), now);
      cached.view.busyMs = Math.max(0, held.reduce((s, h) => s + runMsOf(h.data.work, stepMs, avgJobMs), 0) - (now - first));
      return cached.view;
    });
    if (this.views.size > usable.length) for (const id of this.views.keys()) if (!usable.some((a) => a.agent_id === id)) this.views.delete(id);
    return { agents, running };
  }

  /** What placement needs of a heartbeat that does not change between heartbeats: built once per heartbeat. */
  private baseView(a: AgentHeartbeat, trained: ModelInfo[]): AgentBase {
    const cached = this.bases.get(a);
    if (cached?.trained === trained) return cached.base;
    const base: AgentBase = {
      vramTotalMb: a.gpu.vram_total_mb,
      // least recently used first, as the worker evicts
      resident: new Set([...a.resident].filter((r) => r.location === 'vram').sort((x, y) => (x.last_used_at ?? '').localeCompare(y.last_used_at ?? '')).map((r) => r.name)),
      pinned: new Set(a.resident.filter((r) => r.pinned).map((r) => r.name)),
      models: new Map([...(a.capabilities!.features.includes('lora') ? trained : []), ...a.capabilities!.models].map((m) => [m.name, m])),
    };
    this.bases.set(a, { trained, base });
    return base;
  }

  /** Trained LoRAs run on any agent that takes LoRAs (it fetches them before the job); read at most once a second. */
  private async trainedLoras(): Promise<ModelInfo[]> {
    if (Date.now() - this.trained.at >= TRAINED_LORAS_MS) {
      const list = (await this.loras.list()).map((l): ModelInfo => ({ name: l.name, kind: 'lora', vram_mb: Math.ceil(l.bytes / (1024 * 1024)), load_ms: 500 }));
      // the same list object while nothing changed, so agents' views built on it stay valid
      if (JSON.stringify(list) !== JSON.stringify(this.trained.list)) this.trained.list = list;
      this.trained.at = Date.now();
    }
    return this.trained.list;
  }

  async close(): Promise<void> {
    await Promise.all([...this.agentQueues.values()].map((q) => q.close()));
  }
}
