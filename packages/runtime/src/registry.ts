import { AgentHeartbeat } from '@kiln/contracts';
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

  /** Takes an agent out of rotation (`on`) or puts it back; kept across the agent's restarts. */
  async setMaintenance(agentId: string, on: boolean): Promise<void> {
    if (on) await this.redis.sadd(this.keys.agentsMaintenance(), agentId);
    else await this.redis.srem(this.keys.agentsMaintenance(), agentId);
  }

  async inMaintenance(agentId: string): Promise<boolean> {
    return (await this.redis.sismember(this.keys.agentsMaintenance(), agentId)) === 1;
  }

  /** Live agents, and the registered ones whose heartbeat has lapsed. */
  async snapshot(): Promise<{ live: AgentHeartbeat[]; lapsed: string[] }> {
    const ids = (await this.registered()).sort();
    if (ids.length === 0) return { live: [], lapsed: [] };
    const [raws, maintenance] = await Promise.all([this.redis.mget(ids.map((id) => this.keys.agent(id))), this.redis.smembers(this.keys.agentsMaintenance())]);
    const drained = new Set(maintenance);
    const live: AgentHeartbeat[] = [];
    const lapsed: string[] = [];
    raws.forEach((raw, i) => {
      if (!raw) return void lapsed.push(ids[i]!);
      const hb = AgentHeartbeat.parse(JSON.parse(raw));
      live.push(drained.has(hb.agent_id) && hb.state !== 'defunct' ? { ...hb, state: 'draining', maintenance: true } : hb);
    });
    return { live, lapsed };
  }

  async live(): Promise<AgentHeartbeat[]> {
    return (await this.snapshot()).live;
  }
}
