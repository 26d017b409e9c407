import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { createBullBoard } from '@bull-board/api';
import { BullMQAdapter } from '@bull-board/api/bullMQAdapter';
import { FastifyAdapter } from '@bull-board/fastify';
import { AGENT_QUEUE_PREFIX, QUEUES, quietErrors } from '@kiln/runtime';
import { Queue } from 'bullmq';
import type { FastifyInstance } from 'fastify';
import type { ApiContext } from '../context.js';

export const BOARD_PATH = '/admin/queues';

/**
 * Bull Board's page as shipped, less anything it would load from another host (a web-font
 * stylesheet today): written to a folder of this process's own, so the board renders on a host
 * with no way out and tells no third party who opened it. Its scripts, styles and icons are
 * served by the API from @bull-board/ui's files.
 */
function offlineViews(): string {
  const ui = dirname(createRequire(import.meta.url).resolve('@bull-board/ui/package.json'));
  const page = readFileSync(join(ui, 'dist', 'index.ejs'), 'utf8')
    .replace(/<link\b[^>]*\bhref="(?:https?:)?\/\/[^"]*"[^>]*>\s*/gi, '')
    .replace(/<script\b[^>]*\bsrc="(?:https?:)?\/\/[^"]*"[^>]*>\s*<\/script>\s*/gi, '');
  const dir = mkdtempSync(join(tmpdir(), 'kiln-bull-board-'));
  writeFileSync(join(dir, 'index.ejs'), page);
  return dir;
}

/**
 * Bull Board at /admin/queues with every Kiln queue: intake, groups (batches and cache
 * requests, with their progress), webhooks, and one queue per agent — agents come and go, so
 * the list is refreshed from the registry.
 *
 * What the board keeps and lets an operator do:
 *  - history: finished and failed entries stay, bounded (QUEUE_KEEP_*); an agent queue's entry
 *    is one attempt, named `kind · model · tenant`, with its progress mirrored while it runs and,
 *    if it did not succeed, the job's error code and message as its failure;
 *  - actions only where they do what they say: webhooks can be retried, deleted and paused (the
 *    dispatchers deliver from that queue). Intake, groups and agent queues are read-only: the
 *    dispatcher places from intake without consuming it (pausing it would pause nothing; a
 *    deleted entry is put back by the sweep, since the job is still queued — cancel a job with
 *    DELETE /v1/jobs/:id), and the other two mirror records that BullMQ does not own.
 */
export async function registerBullBoard(app: FastifyInstance, ctx: ApiContext): Promise<() => Promise<void>> {
  const adapter = new FastifyAdapter();
  adapter.setBasePath(BOARD_PATH);
  const board = createBullBoard({
    queues: [
      new BullMQAdapter(ctx.intake, { readOnlyMode: true, description: 'jobs waiting for a GPU; cancel with DELETE /v1/jobs/:id' }),
      new BullMQAdapter(ctx.groupsQueue, { readOnlyMode: true, description: 'batches and cache requests until their children end' }),
      new BullMQAdapter(ctx.webhookQueue, { description: 'webhook deliveries: retry, delete and pause act on them' }),
    ],
    serverAdapter: adapter,
    options: { uiConfig: { boardTitle: 'Kiln', hideDocsLink: true } },
  });
  const views = offlineViews();
  adapter.setViewsPath(views);
  await app.register(adapter.registerPlugin(), { prefix: BOARD_PATH });

  const agentQueues = new Map<string, Queue>();
  const refresh = async () => {
    const ids = new Set(await ctx.registry.registered());
    for (const id of ids) {
      if (agentQueues.has(id)) continue;
      const q = quietErrors(new Queue(QUEUES.agent(id), { connection: ctx.redis, prefix: ctx.env.KILN_PREFIX }), `queue agent.${id}`);
      agentQueues.set(id, q);
      board.addQueue(new BullMQAdapter(q, { readOnlyMode: true, description: `agent ${id}: one entry per attempt placed there` }));
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
    rmSync(views, { recursive: true, force: true });
    await Promise.all([...agentQueues.values()].map((q) => q.close()));
  };
}
