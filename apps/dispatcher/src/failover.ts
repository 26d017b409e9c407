import { type AgentRegistry, type Jobs, KilnError, type Logger } from '@kiln/runtime';
import type { AgentQueues } from './agent-queues.js';
import type { DispatcherEnv } from './env.js';
import { failovers } from './metrics.js';

/**
 * Lost agents: an agent whose heartbeat lapsed has its queued and running jobs put back to
 * intake (attempt + 1 at the next placement), its queue removed and its registration dropped —
 * unless failover is held: a Redis outage is not an agent death, so while this process has
 * lost Redis, for AGENT_TTL_MS after it is back, and for AGENT_TTL_MS after every agent lapsed
 * at once (Redis stalled, or its clock jumped), agents get a full TTL of fresh heartbeats first.
 */
export class Failover {
  /** no failover before this time (ms); Infinity while Redis is away */
  private holdUntil = 0;
  private holdReason = '';
  private holdLogged = false;
  /** agents live at the last look, to tell "every agent lapsed at once" from agents dying one by one */
  private liveBefore = 0;

  constructor(
    private readonly env: Pick<DispatcherEnv, 'AGENT_TTL_MS'>,
    private readonly log: Logger,
    private readonly jobs: Jobs,
    private readonly registry: AgentRegistry,
    private readonly queues: AgentQueues,
  ) {}

  /** This process lost Redis: no failover until it is back (see `redisRestored`). */
  redisLost(): void {
    this.hold(Infinity, 'Redis connection lost');
  }

  /** Redis is back: agents get a full heartbeat TTL to write a fresh heartbeat before any failover. */
  redisRestored(downMs: number): void {
    this.holdUntil = 0;
    this.hold(Date.now() + this.env.AGENT_TTL_MS, `Redis was away for ${downMs} ms`);
  }

  /** One look at the registry (a fresh read): fails the lapsed agents over, unless failover is held. */
  async handle(live: number, lapsed: string[]): Promise<void> {
    if (lapsed.length > 0 && live === 0 && this.liveBefore > 0) {
      this.hold(Date.now() + this.env.AGENT_TTL_MS, `every agent (${lapsed.length}) lapsed at once`);
    }
    this.liveBefore = live;
    if (lapsed.length === 0) return;
    if (Date.now() < this.holdUntil) {
      if (!this.holdLogged) {
        this.holdLogged = true;
        this.log.warn({ agents: lapsed, reason: this.holdReason, waitMs: Number.isFinite(this.holdUntil) ? this.holdUntil - Date.now() : null }, 'heartbeats lapsed; waiting for fresh ones before failing any agent over');
      }
      return;
    }
    for (const agentId of lapsed) await this.failover(agentId);
  }

  /** An agent stopped heartbeating: everything it held goes back to placement. */
  async failover(agentId: string): Promise<void> {
    const held = await this.queues.get(agentId).getJobs(['active', 'waiting', 'prioritized', 'delayed']);
    const lost = new KilnError('agent_lost', `agent ${agentId} stopped heartbeating`);
    for (const entry of held) {
      if (!entry?.data) continue;
      const job = await this.jobs.store.get(entry.data.job_id);
      if (job && job.status === 'running' && job.agent === agentId && job.attempt === entry.data.attempt) {
        this.log.warn({ job: job.id, agent: agentId, attempt: job.attempt }, 'agent lost: re-placing its job');
        await this.jobs.retryOrFail(job, lost, job.attempt);
      }
    }
    await this.queues.obliterate(agentId);
    await this.registry.remove(agentId);
    failovers.inc();
    this.log.warn({ agent: agentId, jobs: held.length }, 'agent removed after its heartbeat lapsed');
  }

  private hold(until: number, reason: string): void {
    if (until <= this.holdUntil) return;
    this.holdUntil = until;
    this.holdReason = reason;
    this.holdLogged = false;
  }
}
