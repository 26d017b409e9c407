import { QueueSummary } from '@kiln/contracts';
import type { FastifyPluginAsyncZod } from 'fastify-type-provider-zod';
import type { ApiContext } from '../context.js';
import { queueSummary } from '../queue.js';

/** GET /v1/queue: the farm's queue at a glance (see queue.ts for how the estimates are made). */
export function queueRoutes(ctx: ApiContext): FastifyPluginAsyncZod {
  return async (app) => {
    app.get(
      '/v1/queue',
      {
        schema: {
          summary: 'The queue: what waits, what runs it, how long until done',
          description:
            "Jobs waiting in intake by priority, model and tenant (a client key sees its own tenant only), agents busy and idle, and the estimated time to drain everything queued and running. Estimates come from the agents' measured step and job times; model loads are not counted.",
          response: { 200: QueueSummary },
        },
      },
      async (req) => queueSummary(ctx, req.principal),
    );
  };
}
