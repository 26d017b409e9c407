import rateLimit from '@fastify/rate-limit';
import { KilnError } from '@kiln/runtime';
import type { FastifyInstance } from 'fastify';
import type { ApiContext } from '../context.js';

/**
 * Requests per minute per tenant (429 with Retry-After), counted in Redis so the limit holds
 * across any number of API instances. Runs after auth, so it counts the tenant, not an address;
 * public routes (health) are not counted. An open farm (no keys) has no limit.
 */
export async function registerRateLimit(app: FastifyInstance, ctx: ApiContext): Promise<void> {
  if (ctx.ring.open) return;
  await app.register(rateLimit, {
    global: true,
    redis: ctx.redis,
    nameSpace: ctx.keys.rateLimit(),
    timeWindow: 60_000,
    skipOnError: true, // a Redis blip must not turn every request into a 500
    keyGenerator: (req) => req.principal?.tenant ?? `ip:${req.ip}`,
    max: async (req) => (req.principal ? ctx.ring.limitsFor(req.principal.tenant).requests_per_minute : 60),
    allowList: (req) => req.routeOptions.config.auth === 'public',
    errorResponseBuilder: (req, c) => {
      const message = `tenant ${req.principal?.tenant ?? 'unknown'} sent more than ${c.max} requests in a minute; retry in ${c.after}`;
      return new KilnError('rate_limited', message, { details: [{ field: '', rule: 'requests_per_minute', message }] });
    },
  });
}
