import { AgentHeartbeat, WorkerCapabilities } from '@kiln/contracts';
import type { Redis } from 'ioredis';
import type { Keys } from './keys.js';

/**
 * The agent registry: each agent's last heartbeat as a key that expires after AGENT_TTL_MS,
 * plus a set of every agent ever registered so the dispatcher notices the ones that lapsed,
 * and the set of agents in maintenance (drained by an operator: they finish what they hold and
 * get nothing new). An agent in maintenance reads as `draining` from the moment it is drained,
 * before its own next heartbeat says so, so placement never races the drain.
 */
export class AgentRegistry {
  constructor(
    private readonly redis: Redis,
    private readonly keys: Keys,
  ) {}

  async publish(hb: AgentHeartbeat, ttlMs: number): Promise<void> {
    // a pipeline, not a MULTI: the two need no atomicity (a beat lost between them is repeated
    // by the next), and every agent sends one a second
    await this.redis
      .pipeline()
      .set(this.keys.agent(hb.agent_id), JSON.stringify(hb), 'PX', ttlMs)
      .sadd(this.keys.agents(), hb.agent_id)
      .exec();
  }

  /** An agent's last heartbeat as written (null once it lapsed): its text changes with every beat. */
  async heartbeatText(agentId: string): Promise<string | null> {
    return this.redis.get(this.keys.agent(agentId));
  }

  /** Removes an agent for good (clean shutdown, or after its jobs were handed back). */
  async remove(agentId: string): Promise<void> {
    await this.redis.multi().del(this.keys.agent(agentId)).srem(this.keys.agents(), agentId).exec();
    this.changed();
  }

  async registered(): Promise<string[]> {
    return this.redis.smembers(this.keys.agents());
  }

  /** Takes an agent out of rotation (`on`) or puts it back; kept across the agent's restarts. */
  async setMaintenance(agentId: string, on: boolean): Promise<void> {
    if (on) await this.redis.sadd(this.keys.agentsMaintenance(), agentId);
    else await this.redis.srem(this.keys.agentsMaintenance(), agentId);
    this.changed();
  }

  async inMaintenance(agentId: string): Promise<boolean> {
    return (await this.redis.sismember(this.keys.agentsMaintenance(), agentId)) === 1;
  }

  /**
   * Live agents, and the registered ones whose heartbeat has lapsed. `maxAgeMs` > 0 accepts a
   * snapshot read up to that long ago (the API's submit path: feasibility at the door must not
   * cost a read and a parse of every heartbeat per request); 0 reads Redis now. Either way a
   * heartbeat is parsed only when its text changed, and concurrent readers share one read.
   */
  async snapshot(opts: { maxAgeMs?: number } = {}): Promise<RegistrySnapshot> {
    const maxAgeMs = opts.maxAgeMs ?? 0;
    if (maxAgeMs > 0 && this.last && Date.now() - this.last.at <= maxAgeMs) return this.last.value;
    // a fresh read never shares one under way: it must see what was written before it was asked
    if (maxAgeMs > 0 && this.reading && this.reading.since > (this.changedAt ?? -1)) return this.reading.value;
    const since = Date.now();
    const value = this.read().then(
      (snap) => {
        if (this.reading?.value === value) this.reading = null;
        // a change made here (a drain) while this read was under way may not be in it
        if ((this.changedAt === null || since > this.changedAt) && (!this.last || since >= this.last.at)) this.last = { at: since, value: Promise.resolve(snap) };
        return snap;
      },
      (err: unknown) => {
        if (this.reading?.value === value) this.reading = null;
        throw err;
      },
    );
    this.reading = { since, value };
    return value;
  }

  async live(opts: { maxAgeMs?: number } = {}): Promise<AgentHeartbeat[]> {
    return (await this.snapshot(opts)).live;
  }

  private last: { at: number; value: Promise<RegistrySnapshot> } | null = null;
  private reading: { since: number; value: Promise<RegistrySnapshot> } | null = null;
  /** when this process last changed the registry itself (a drain): older snapshots are not served */
  private changedAt: number | null = null;
  /** each agent's last heartbeat text and its parse, so an unchanged heartbeat is not parsed again */
  private readonly parsed = new Map<string, ParsedHeartbeat>();

  private changed(): void {
    this.last = null;
    this.changedAt = Date.now();
  }

  /** Another process changed the registry (a drain or resume): the next snapshot reads Redis. */
  invalidate(): void {
    this.changed();
  }

  private async read(): Promise<RegistrySnapshot> {
    const ids = (await this.registered()).sort();
    if (ids.length === 0) {
      this.parsed.clear();
      return { live: [], lapsed: [] };
    }
    const [raws, maintenance] = await Promise.all([this.redis.mget(ids.map((id) => this.keys.agent(id))), this.redis.smembers(this.keys.agentsMaintenance())]);
    const drained = new Set(maintenance);
    const live: AgentHeartbeat[] = [];
    const lapsed: string[] = [];
    const seen = new Set<string>();
    let parses = 0;
    for (const [i, raw] of raws.entries()) {
      const id = ids[i]!;
      if (!raw) {
        lapsed.push(id);
        continue;
      }
      seen.add(id);
      let entry = this.parsed.get(id);
      if (entry?.raw !== raw) {
        // a fleet's first read (or one after every agent changed) gives the event loop back as it goes
        if (++parses % PARSE_CHUNK === 0) await new Promise((r) => setImmediate(r));
        entry = parseHeartbeat(raw, entry);
        this.parsed.set(id, entry);
      }
      const hb = entry.hb;
      live.push(drained.has(hb.agent_id) && hb.state !== 'defunct' ? { ...hb, state: 'draining', maintenance: true } : hb);
    }
    for (const id of this.parsed.keys()) if (!seen.has(id)) this.parsed.delete(id);
    return { live, lapsed };
  }
}

interface ParsedHeartbeat {
  raw: string;
  /** its capabilities as JSON: they change only when the worker restarts */
  capabilities: string;
  hb: AgentHeartbeat;
}

/** Heartbeats validated in one turn of the event loop. */
const PARSE_CHUNK = 100;

const HeartbeatWithoutCapabilities = AgentHeartbeat.omit({ capabilities: true });
const Capabilities = WorkerCapabilities.nullable();
const HEARTBEAT_FIELDS = Object.keys(AgentHeartbeat.shape) as (keyof AgentHeartbeat)[];

/**
 * A heartbeat, validated. Every beat differs (its time, at least) but its capabilities — most
 * of it: every model, scheduler and feature the worker has — change only when the worker
 * restarts, so an agent's previous parse of them is kept when they are the same: a registry
 * read of five hundred agents validates five hundred small objects, not five hundred model lists.
 */
function parseHeartbeat(raw: string, previous: ParsedHeartbeat | undefined): ParsedHeartbeat {
  const obj = JSON.parse(raw) as Record<string, unknown>;
  const capabilitiesJson = JSON.stringify(obj.capabilities ?? null);
  const capabilities = previous?.capabilities === capabilitiesJson ? previous.hb.capabilities : Capabilities.parse(obj.capabilities ?? null);
  const rest = HeartbeatWithoutCapabilities.parse(obj);
  const hb = Object.fromEntries(HEARTBEAT_FIELDS.map((k) => [k, k === 'capabilities' ? capabilities : rest[k as keyof typeof rest]])) as AgentHeartbeat;
  return { raw, capabilities: capabilitiesJson, hb };
}

export interface RegistrySnapshot {
  live: AgentHeartbeat[];
  lapsed: string[];
}

/** How old a registry snapshot the API's submit path accepts (it re-reads before refusing). */
export const REGISTRY_MAX_AGE_MS = 250;
