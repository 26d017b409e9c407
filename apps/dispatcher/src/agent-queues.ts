import { type AgentJobData, keepHistory, QUEUES, quietErrors } from '@kiln/runtime';
import { type ConnectionOptions, Queue } from 'bullmq';
import type { DispatcherEnv } from './env.js';

/** The dispatcher's handle on each agent's queue (`agent.<id>`), made on first use. */
export class AgentQueues {
  private readonly queues = new Map<string, Queue<AgentJobData>>();

  constructor(
    private readonly connection: ConnectionOptions,
    private readonly env: Pick<DispatcherEnv, 'KILN_PREFIX' | 'QUEUE_KEEP_COMPLETED' | 'QUEUE_KEEP_FAILED' | 'QUEUE_KEEP_S'>,
  ) {}

  get(agentId: string): Queue<AgentJobData> {
    let q = this.queues.get(agentId);
    if (!q) {
      // finished and failed entries stay for Bull Board, bounded (QUEUE_KEEP_*)
      q = quietErrors(
        new Queue<AgentJobData>(QUEUES.agent(agentId), { connection: this.connection, prefix: this.env.KILN_PREFIX, defaultJobOptions: keepHistory(this.env) }),
        `queue agent.${agentId}`,
      );
      this.queues.set(agentId, q);
    }
    return q;
  }

  /** The agent is gone: its queue is removed from Redis and forgotten. */
  async obliterate(agentId: string): Promise<void> {
    const q = this.get(agentId);
    await q.obliterate({ force: true });
    await q.close();
    this.queues.delete(agentId);
  }

  async close(): Promise<void> {
    await Promise.all([...this.queues.values()].map((q) => q.close()));
  }
}
