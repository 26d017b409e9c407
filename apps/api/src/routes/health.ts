import type { FastifyPluginAsyncZod } from 'fastify-type-provider-zod';
import type { ApiContext } from '../context.js';

/** /healthz: the process is up. /readyz: Redis and storage answer (503 otherwise). */
export function healthRoutes(ctx: ApiContext): FastifyPluginAsyncZod {
  return async (app) => {
    app.get('/healthz', async () => ({ status: 'ok' as const }));
    app.get('/readyz', async (_req, reply) => {
      const check = async (fn: () => Promise<unknown>) => {
        try {
          await Promise.race([fn(), new Promise((_, rej) => setTimeout(() => rej(new Error('timed out after 2 s')), 2_000))]);
          return { ok: true };
        } catch (err) {
          return { ok: false, error: err instanceof Error ? err.message : String(err) };
        }
      };
      const [redis, storage] = await Promise.all([check(() => ctx.redis.ping()), check(() => ctx.storage.ping())]);
      const ok = redis.ok && storage.ok;
      return reply.code(ok ? 200 : 503).send({ status: ok ? 'ok' : 'unavailable', checks: { redis, storage } });
    });
  };
}
