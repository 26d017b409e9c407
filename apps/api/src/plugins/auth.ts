import { createHash, timingSafeEqual } from 'node:crypto';
import type { FastifyInstance, FastifyReply, FastifyRequest } from 'fastify';
import { body } from './errors.js';

const digest = (s: string) => createHash('sha256').update(s).digest();

/**
 * API keys. With API_KEYS set, every /v1 route needs `Authorization: Bearer <key>`, and /admin
 * accepts the key as a bearer token or as the HTTP basic-auth password (so a browser can open
 * Bull Board). Without keys the API is open, and says so at start.
 */
export function registerAuth(app: FastifyInstance, apiKeys: string[]): void {
  const known = apiKeys.map((k) => ({ digest: digest(k), client: `key_${digest(k).toString('hex').slice(0, 12)}` }));
  app.decorateRequest('client', 'anonymous');
  if (known.length === 0) {
    app.log.warn('API_KEYS is not set: the API and the Bull Board dashboard are open to anyone who can reach them');
    return;
  }
  const match = (candidate: string | undefined) => {
    if (!candidate) return null;
    const d = digest(candidate);
    return known.find((k) => timingSafeEqual(k.digest, d))?.client ?? null;
  };
  app.addHook('onRequest', async (req: FastifyRequest, reply: FastifyReply) => {
    const path = req.url.split('?')[0]!;
    const admin = path === '/admin' || path.startsWith('/admin/');
    if (!admin && !path.startsWith('/v1/') && path !== '/v1') return;
    const header = req.headers.authorization ?? '';
    const [scheme, value] = [header.slice(0, header.indexOf(' ')).toLowerCase(), header.slice(header.indexOf(' ') + 1).trim()];
    let client: string | null = null;
    if (scheme === 'bearer') client = match(value);
    else if (scheme === 'basic' && admin) {
      const decoded = Buffer.from(value, 'base64').toString('utf8');
      client = match(decoded.slice(decoded.indexOf(':') + 1));
    }
    if (!client) {
      reply.header('www-authenticate', admin ? 'Basic realm="kiln"' : 'Bearer realm="kiln"');
      return reply
        .code(401)
        .send(body('unauthorized', header ? 'the API key is not valid' : 'this route needs an API key: Authorization: Bearer <key>'));
    }
    req.client = client;
  });
}
