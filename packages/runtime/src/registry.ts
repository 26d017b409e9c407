import { AgentHeartbeat } from '@kiln/contracts';
import type { Redis } from 'ioredis';
import type { Keys } from './keys.js';

/**
 * The agent registry: each agent's last heartbeat as a key that expires after AGENT_TTL_MS,
 * plus a set of every agent ever registered so the dispatcher notices the ones that lapsed.
 */
export class AgentRegistry {
  constructor(
    private readonly redis: Redis,
    private readonly keys: Keys,
  ) {}

  async publish(hb: AgentHeartbeat, ttlMs: number): Promise<void> {
    await this.redis
      .multi()
      .set(this.keys.agent(hb.agent_id), JSON.stringify(hb), 'PX', ttlMs)
      .sadd(this.keys.agents(), hb.agent_id)
      .exec();
  }

  /** Removes an agent for good (clean shutdown, or after its jobs were handed back). */
  async remove(agentId: string): Promise<void> {
    await this.redis.multi().del(this.keys.agent(agentId)).srem(this.keys.agents(), agentId).exec();
  }

  async registered(): Promise<string[]> {
    return this.redis.smembers(this.keys.agents());
  }

  /** Live agents, and the registered ones whose heartbeat has lapsed. */
  async snapshot(): Promise<{ live: AgentHeartbeat[]; lapsed: string[] }> {
    const ids = (await this.registered()).sort();
    if (ids.length === 0) return { live: [], lapsed: [] };
    const raws = await this.redis.mget(ids.map((id) => this.keys.agent(id)));
    const live: AgentHeartbeat[] = [];
    const lapsed: string[] = [];
    raws.forEach((raw, i) => {
      if (raw) live.push(AgentHeartbeat.parse(JSON.parse(raw)));
      else lapsed.push(ids[i]!);
    });
    return { live, lapsed };
  }

  async live(): Promise<AgentHeartbeat[]> {
    return (await this.snapshot()).live;
  }
}
