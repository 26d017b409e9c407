import type { AgentHeartbeat, ModelInfo } from '@kiln/contracts';
import { type AgentJobData, type Keys, type LoraRegistry, runMsOf } from '@kiln/runtime';
import type { Queue } from 'bullmq';
import type { Redis } from 'ioredis';
import type { AgentQueues } from './agent-queues.js';
import type { DispatcherEnv } from './env.js';
import { type AgentView, projectResidency } from './placement.js';

/** How often the list of trained LoRAs is read (ms); a new one is usable on agents within this. */
const TRAINED_LORAS_MS = 1_000;

type AgentBase = Pick<AgentView, 'vramTotalMb' | 'resident' | 'pinned' | 'models'>;

/**
 * What placement knows of the fleet: each usable agent's view (VRAM, resident models, what it
 * holds and how long that runs, free slots), kept between ticks. A view is built again only when
 * its heartbeat, what the agent holds or the trained LoRAs changed; what an agent holds comes
 * from HeldView, read again only for agents that said they changed.
 */
export class AgentViews {
  private readonly held: HeldView;
  /** when every agent's queue was last read (HeldView) */
  private lastFullRead = 0;
  /** each heartbeat's part of its agent's view (a registry snapshot keeps a heartbeat's object until it changes) */
  private readonly bases = new WeakMap<AgentHeartbeat, { trained: ModelInfo[]; base: AgentBase }>();
  private readonly trained: { at: number; list: ModelInfo[] } = { at: -Infinity, list: [] };
  /** each usable agent's view, and what it was built from */
  private readonly views = new Map<string, { key: { hb: AgentHeartbeat; trained: ModelInfo[]; held: Held[]; n: number; avgJobMs: number }; view: AgentView }>();
  /**
   * Jobs an agent finished since the heartbeat this dispatcher last saw from it: what they
   * loaded is resident there even though that heartbeat predates it (the agent beats before it
   * writes the result, but a snapshot may be older than that beat). Dropped with the next beat.
   */
  private readonly departed = new Map<string, { hb: AgentHeartbeat; jobs: Held[] }>();

  constructor(
    private readonly env: Pick<DispatcherEnv, 'AGENT_SLOTS' | 'SWEEP_INTERVAL_MS'>,
    private readonly loras: LoraRegistry,
    private readonly queues: AgentQueues,
    redis: Redis,
    keys: Keys,
  ) {
    this.held = new HeldView(redis, keys);
  }

  /** An agent's queue changed (its wake named it): it is read again. */
  changed(agentId: string): void {
    this.held.changed(agentId);
  }

  /** An entry left the agent's queue (its wake named it). */
  entryLeft(agentId: string, entryId: string): void {
    this.held.entryLeft(agentId, entryId);
  }

  /** Every agent's queue is read again at the next build. */
  changedAll(): void {
    this.lastFullRead = 0;
  }

  /** The dispatcher added an entry to the agent's queue. */
  added(agentId: string, id: string, data: AgentJobData): void {
    this.held.added(agentId, id, data);
  }

  /** What placement needs of each usable agent, and how many jobs each client has on agents. */
  async build(live: AgentHeartbeat[]): Promise<{ agents: AgentView[]; running: Map<string, number> }> {
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
    // each agent's queue handle is made when its queue is first read (a fleet's first read makes
    // hundreds: HeldView reads them a chunk at a time)
    const ids = new Set(usable.map((a) => a.agent_id));
    const heldBy = await this.held.read({ keys: () => ids.values(), get: (id) => this.queues.get(id), has: (id) => ids.has(id) }, full);
    const now = Date.now();
    const agents = usable.map((a): AgentView => {
      // held jobs, oldest first: the running one, then the next
      const held = heldBy.get(a.agent_id) ?? [];
      for (const h of held) if (h.data.client) running.set(h.data.client, (running.get(h.data.client) ?? 0) + 1);
      const avgJobMs = a.avg_job_ms ?? fleetJobMs;
      const stepMs = a.step_ms ?? {};
      // the view is built again only when the heartbeat, what the agent holds or the trained
      // LoRAs changed (placement copies what it changes)
      let cached = this.views.get(a.agent_id);
      const k = cached?.key;
      if (!cached || k!.hb !== a || k!.trained !== trained || k!.held !== held || k!.n !== held.length || k!.avgJobMs !== avgJobMs) {
        const key = { hb: a, trained, held, n: held.length, avgJobMs };
        const base = this.baseView(a, trained);
        const gone = this.departures(a, k, held);
        const projected = projectResidency(base, [...gone, ...held].map((h) => ({ models: h.data.models ?? [], activationMb: h.data.activation_mb ?? 0 })));
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
    if (this.departed.size > usable.length) for (const id of this.departed.keys()) if (!usable.some((a) => a.agent_id === id)) this.departed.delete(id);
    return { agents, running };
  }

  /**
   * The jobs that left this agent's hands while its heartbeat stayed the same (oldest first),
   * so placement still counts the models they loaded: without them a job submitted right after
   * another ended could be sent to an agent that looks empty on a snapshot a few ms old, and
   * evict the model the first one just loaded.
   */
  private departures(a: AgentHeartbeat, before: { hb: AgentHeartbeat; held: Held[] } | undefined, held: Held[]): Held[] {
    const kept = this.departed.get(a.agent_id);
    const since = kept?.hb === a ? kept.jobs : [];
    const still = new Set(held.map((h) => h.id));
    const left = before ? before.held.filter((h) => !still.has(h.id)) : [];
    const jobs = [...since, ...left].slice(-8);
    if (jobs.length) this.departed.set(a.agent_id, { hb: a, jobs });
    else this.departed.delete(a.agent_id);
    return jobs;
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
}

/** Agents' queues read in one turn of the event loop. */
const READ_AGENTS = 20;

/** The agents to read and each one's queue (a Map will do; AgentViews makes each handle when first asked). */
export interface AgentQueueMap {
  keys(): Iterable<string>;
  get(agentId: string): Queue<AgentJobData> | undefined;
  has(agentId: string): boolean;
}

/** An entry on an agent's queue, as placement needs it (read once per entry). */
export interface Held {
  id: string;
  data: AgentJobData;
  timestamp: number;
  /** when the agent took it (ms), once it has */
  processedOn: number | null;
}

/**
 * What each agent's queue holds (the running job and the next), kept like IntakeView: an
 * agent's queue is read again (its ids in one script call, a new entry's data once) only when
 * the agent said it changed (its wake names it), when the dispatcher has not seen it yet, or at
 * a full refresh (every DISPATCH_INTERVAL_MS, which also catches a running job's start time);
 * what the dispatcher itself adds is recorded as it adds it.
 */
export class HeldView {
  private readonly byAgent = new Map<string, Held[]>();
  private readonly dirty = new Set<string>();

  constructor(
    private readonly redis: Redis,
    private readonly keys: Keys,
  ) {}

  /** The agent's queue changed (it finished or handed back a job). */
  changed(agentId: string): void {
    this.dirty.add(agentId);
  }

  /** The dispatcher added an entry to the agent's queue. */
  added(agentId: string, id: string, data: AgentJobData): void {
    this.byAgent.get(agentId)?.push({ id, data, timestamp: Date.now(), processedOn: null });
  }

  /**
   * An entry left the agent's queue (the agent's wake named it, sent once BullMQ moved it out of
   * `active`): it is dropped without a read, and the agent's next entry counts as started now
   * (the agent runs its entries in order; the next full read corrects the time). One this view
   * does not hold means the view is behind: the queue is read again.
   */
  entryLeft(agentId: string, entryId: string): void {
    const held = this.byAgent.get(agentId);
    const at = held?.findIndex((h) => h.id === entryId) ?? -1;
    if (!held || at < 0 || this.dirty.has(agentId)) return void this.dirty.add(agentId);
    const rest = held.filter((_, i) => i !== at);
    if (rest[0] && rest[0].processedOn === null) rest[0] = { ...rest[0], processedOn: Date.now() };
    this.byAgent.set(agentId, rest);
  }

  async read(queues: AgentQueueMap, full: boolean): Promise<Map<string, Held[]>> {
    const all = [...queues.keys()].filter((a) => full || this.dirty.has(a) || !this.byAgent.has(a));
    for (const a of all) this.dirty.delete(a);
    // a chunk of agents at a time: a fleet's first (or full) read gives the event loop back as it goes
    for (let at = 0; at < all.length; at += READ_AGENTS) await this.readAgents(queues, all.slice(at, at + READ_AGENTS));
    for (const a of this.byAgent.keys()) if (!queues.has(a)) this.byAgent.delete(a);
    return new Map([...queues.keys()].map((a) => [a, this.byAgent.get(a) ?? []]));
  }

  private async readAgents(queues: AgentQueueMap, stale: string[]): Promise<void> {
    const ids = await Promise.all(stale.map((a) => queues.get(a)!.getRanges(['active', 'waiting', 'prioritized', 'delayed'], 0, -1, true)));
    await Promise.all(
      stale.map(async (agent, i) => {
        const queue = queues.get(agent)!;
        const before = new Map((this.byAgent.get(agent) ?? []).map((h) => [h.id, h]));
        const held = await Promise.all(
          [...new Set(ids[i])].map(async (id): Promise<Held | null> => {
            const key = queue.toKey(id);
            const known = before.get(id);
            if (known) {
              if (known.processedOn === null) {
                const on = await this.redis.hget(key, 'processedOn');
                known.processedOn = on ? Number(on) : null;
              }
              return known;
            }
            const [data, ts, on] = await this.redis.hmget(key, 'data', 'timestamp', 'processedOn');
            if (!data) return null;
            return { id, data: JSON.parse(data) as AgentJobData, timestamp: Number(ts ?? 0), processedOn: on ? Number(on) : null };
          }),
        );
        this.byAgent.set(agent, held.filter((h): h is Held => h !== null).sort((x, y) => x.timestamp - y.timestamp));
      }),
    );
    // an agent wakes the dispatcher as its job ends, before BullMQ has moved the entry out of
    // `active`: an entry whose job is no longer running on its attempt holds no slot
    const reread = stale.flatMap((a) => this.byAgent.get(a) ?? []);
    if (reread.length) {
      const pipe = this.redis.pipeline();
      for (const h of reread) pipe.hmget(this.keys.job(h.data.job_id), 'status', 'attempt');
      const ended = new Set<Held>();
      ((await pipe.exec()) ?? []).forEach(([, v], i) => {
        const [status, attempt] = (v ?? []) as (string | null)[];
        if (status && (status !== '"running"' || Number(attempt) !== reread[i]!.data.attempt)) ended.add(reread[i]!);
      });
      if (ended.size) for (const a of stale) this.byAgent.set(a, this.byAgent.get(a)!.filter((h) => !ended.has(h)));
    }
  }
}
