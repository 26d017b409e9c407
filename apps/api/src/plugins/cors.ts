import cors from '@fastify/cors';
import type { FastifyInstance } from 'fastify';
import type { ApiEnv } from '../env.js';

/**
 * CORS for browser apps on the origins in CORS_ORIGINS (none by default: no CORS headers, and a
 * preflight is a 404 like any unknown route). Registered before auth, so a preflight — which a
 * browser sends without the Authorization header — is answered in the request hook, before the
 * key is checked; the answer is a bare 204 with the CORS headers and no route handler ever
 * runs for it. Every other request still needs its key; its answers (a 401 included) carry the
 * CORS headers so the page can read them.
 */
export async function registerCors(app: FastifyInstance, env: Pick<ApiEnv, 'CORS_ORIGINS'>): Promise<void> {
  if (env.CORS_ORIGINS.length === 0) return;
  // @fastify/cors's OPTIONS * route only lets a preflight reach its hook; it sends nothing else
  app.addHook('onRoute', (r) => {
    if (r.method === 'OPTIONS' && r.url === '*') r.config = { ...r.config, auth: 'public' };
  });
  await app.register(cors, {
    origin: env.CORS_ORIGINS.includes('*') ? '*' : env.CORS_ORIGINS,
    methods: ['GET', 'POST', 'DELETE'],
    allowedHeaders: ['authorization', 'content-type', 'idempotency-key', 'prefer', 'last-event-id'],
    exposedHeaders: ['location', 'idempotent-replayed', 'preference-applied', 'retry-after', 'x-ratelimit-limit', 'x-ratelimit-remaining', 'x-ratelimit-reset'],
    maxAge: 600,
    // any OPTIONS is a preflight: a bare 204 (the CORS headers only for an allowed origin), never
    // the plugin's text/plain 400 for one without Origin, which is not Kiln's error shape
    strictPreflight: false,
  });
}
