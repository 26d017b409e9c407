import type { FastifyInstance, FastifyReply, FastifyRequest } from 'fastify';
import { type KeyRing, OPEN_PRINCIPAL, type Principal } from '../keys.js';
import { body } from './errors.js';

declare module 'fastify' {
  interface FastifyRequest {
    /** who is calling: tenant and role (the open farm's single tenant when no keys are set) */
    principal: Principal;
  }
  interface FastifyContextConfig {
    /** who may call the route: `public` (no key), `client` (any key; the default) or `admin` */
    auth?: 'public' | 'client' | 'admin';
  }
}

/**
 * API keys, decided on the route the router matched — never on the raw URL, so no spelling of
 * a path (percent-encoding, case, slashes, dot segments) reaches a route without its check.
 * Every route needs a key unless it says `config: { auth: 'public' }`; routes under /admin need
 * an admin key, as do those that say `auth: 'admin'`. /admin also takes the key as the HTTP
 * basic-auth password, so a browser can open Bull Board. With no keys the farm is open.
 */
export function registerAuth(app: FastifyInstance, ring: KeyRing): void {
  app.decorateRequest('principal', null as unknown as Principal);
  if (ring.open) {
    app.log.warn('no API keys are set (API_KEYS, ADMIN_API_KEYS, API_KEYS_FILE): the API and Bull Board are open to anyone who can reach them, as one tenant');
  } else {
    app.log.info({ keys: ring.size }, 'API keys loaded');
  }
  app.addHook('onRequest', async (req: FastifyRequest, reply: FastifyReply) => {
    const pattern = req.routeOptions.url;
    if (pattern === undefined) return; // no route matched: the 404 handler answers, with nothing behind it
    const needs = req.routeOptions.config.auth ?? (pattern === '/admin' || pattern.startsWith('/admin/') ? 'admin' : 'client');
    if (needs === 'public') return;
    if (ring.open) {
      req.principal = OPEN_PRINCIPAL;
      return;
    }
    const browser = pattern.startsWith('/admin');
    const principal = ring.authenticate(presentedKey(req.headers.authorization, browser) ?? '');
    if (!principal) {
      reply.header('www-authenticate', browser ? 'Basic realm="kiln"' : 'Bearer realm="kiln"');
      return reply
        .code(401)
        .send(body('unauthorized', req.headers.authorization ? 'the API key is not valid' : 'this route needs an API key: Authorization: Bearer <key>'));
    }
    if (needs === 'admin' && principal.role !== 'admin') {
      return reply.code(403).send(body('forbidden', 'this route needs an admin key'));
    }
    req.principal = principal;
  });
}

/** The key from `Bearer <key>`, or (for browser routes) the password of `Basic <user:key>`. */
function presentedKey(header: string | undefined, allowBasic: boolean): string | null {
  if (!header) return null;
  const space = header.indexOf(' ');
  if (space < 0) return null;
  const scheme = header.slice(0, space).toLowerCase();
  const value = header.slice(space + 1).trim();
  if (scheme === 'bearer') return value;
  if (scheme === 'basic' && allowBasic) {
    const decoded = Buffer.from(value, 'base64').toString('utf8');
    return decoded.slice(decoded.indexOf(':') + 1);
  }
  return null;
}
