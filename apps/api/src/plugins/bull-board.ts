import { createBullBoard } from '@bull-board/api';
import { BullMQAdapter } from '@bull-board/api/bullMQAdapter';
import { FastifyAdapter } from '@bull-board/fastify';
import { AGENT_QUEUE_PREFIX, QUEUES, quietErrors } from '@kiln/runtime';
import { Queue } from 'bullmq';
import type { FastifyInstance } from 'fastify';
import type { ApiContext } from '../context.js';

export const BOARD_PATH = '/admin/queues';

/**
 * Bull Board at /admin/queues with every Kiln queue: intake, groups (batches and cache
 * requests, with their progress), webhooks, and one queue per
 * agent — agents come and go, so the list is refreshed from the registry.
 */
export async function registerBullBoard(app: FastifyInstance, ctx: ApiContext): Promise<() => Promise<void>> {
  const adapter = new FastifyAdapter();
  adapter.setBasePath(BOARD_PATH);
  const board = createBullBoard({
    queues: [new BullMQAdapter(ctx.intake), new BullMQAdapter(ctx.groupsQueue, { readOnlyMode: true }), new BullMQAdapter(ctx.webhookQueue)],
    serverAdapter: adapter,
    options: { uiConfig: { boardTitle: 'Kiln' } },
  });
  await app.register(adapter.registerPlugin(), { prefix: BOARD_PATH });

  const agentQueues = new Map<string, Queue>();
  const refresh = async () => {
    const ids = new Set(await ctx.registry.registered());
    for (const id of ids) {
      if (agentQueues.has(id)) continue;
      const q = quietErrors(new Queue(QUEUES.agent(id), { connection: ctx.redis, prefix: ctx.env.KILN_PREFIX }), `queue agent.${id}`);
      agentQueues.set(id, q);
      board.addQueue(new BullMQAdapter(q, { readOnlyMode: true }));
    }
    for (const [id, q] of agentQueues) {
      if (ids.has(id)) continue;
      board.removeQueue(`${AGENT_QUEUE_PREFIX}${id}`);
      agentQueues.delete(id);
      await q.close();
    }
  };
  await refresh().catch(() => {});
  const timer = setInterval(() => void refresh().catch((err) => ctx.log.warn({ err }, 'bull board refresh failed')), 5_000);
  return async () => {
    clearInterval(timer);
    await Promise.all([...agentQueues.values()].map((q) => q.close()));
  };
}
