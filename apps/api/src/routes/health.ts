import type { FastifyPluginAsyncZod } from 'fastify-type-provider-zod';
import { HealthResponse, type ReadinessFailure } from '@kiln/contracts';
import type { ApiContext } from '../context.js';

/** /healthz: the process is up. /readyz: Redis and storage answer (503 otherwise, naming the check and why in one word). */
export function healthRoutes(ctx: ApiContext): FastifyPluginAsyncZod {
  return async (app) => {
    app.get('/healthz', { config: { auth: 'public' }, schema: { summary: 'The process is up', response: { 200: HealthResponse } } }, async () => ({ status: 'ok' as const }));
    app.get(
      '/readyz',
      {
        config: { auth: 'public' },
        schema: { summary: 'Redis and storage answer', description: '503 names the failing check and why in one word (`unreachable`, `timeout`, `failed`).', response: { 200: HealthResponse, 503: HealthResponse } },
      },
      async (req, reply) => {
        const check = async (name: string, fn: () => Promise<unknown>): Promise<{ ok: boolean; error?: ReadinessFailure }> => {
          let timer: NodeJS.Timeout | undefined;
          const timedOut = new Error('timed out after 2 s');
          try {
            await Promise.race([fn(), new Promise((_, rej) => (timer = setTimeout(() => rej(timedOut), 2_000)))]);
            return { ok: true };
          } catch (err) {
            // the raw error (addresses, ports, a driver's words) is for the operator's log only
            req.log.warn({ check: name, err: err instanceof Error ? err.message : String(err) }, 'readiness check failed');
            return { ok: false, error: err === timedOut ? 'timeout' : isNetworkError(err) ? 'unreachable' : 'failed' };
          } finally {
            clearTimeout(timer);
          }
        };
        const [redis, storage] = await Promise.all([check('redis', () => ctx.redis.ping()), check('storage', () => ctx.storage.ping())]);
        const ok = redis.ok && storage.ok;
        return reply.code(ok ? 200 : 503).send({ status: ok ? 'ok' : 'unavailable', checks: { redis, storage } });
      },
    );
  };
}

/** A socket-level failure (refused, reset, no route, no such host): the service is not reachable. */
const isNetworkError = (err: unknown) => /^E[A-Z]+$/.test(String((err as { code?: unknown } | null)?.code ?? ''));
