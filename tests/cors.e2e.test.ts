import { randomUUID } from 'node:crypto';
import { request as httpRequest } from 'node:http';
import type { AddressInfo } from 'node:net';
import { createJobServices, createLogger, parseEnvOrThrow } from '@kiln/runtime';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { buildApp, type RegisteredRoute } from '../apps/api/src/app.js';
import { ApiEnv } from '../apps/api/src/env.js';
import { KeyRing } from '../apps/api/src/keys.js';
import { REDIS_URL } from './support/farm.js';

/**
 * CORS: none unless CORS_ORIGINS names origins; then a preflight is answered before auth — and
 * that is all it does: no spelling of any route lets an OPTIONS request reach a handler, and
 * every real request still needs its key (its 401 readable by the page).
 */

const KEY = 'acme-cors-key-0123456789abcdef';
const APP = 'https://app.example.com';

function raw(port: number, method: string, path: string, headers: Record<string, string> = {}, body?: string): Promise<{ status: number; headers: Record<string, string | string[] | undefined>; body: string }> {
  return new Promise((resolve, reject) => {
    const req = httpRequest({ host: '127.0.0.1', port, method, path, headers, agent: false }, (res) => {
      let data = '';
      res.on('data', (c) => (data += c));
      res.on('end', () => resolve({ status: res.statusCode ?? 0, headers: res.headers, body: data }));
    });
    req.on('error', reject);
    req.end(body);
  });
}

async function start(extra: Record<string, string>) {
  const env = parseEnvOrThrow(ApiEnv, { REDIS_URL, KILN_PREFIX: `kiln-test-${randomUUID().slice(0, 8)}`, API_KEYS: `acme:${KEY}`, S3_ENDPOINT: 'http://127.0.0.1:9', ...extra });
  const services = createJobServices(env, 'kiln-cors-test');
  const built = await buildApp({ env, log: createLogger('api', 'silent'), ring: KeyRing.from(env), ...services });
  await built.app.listen({ host: '127.0.0.1', port: 0 });
  return {
    port: (built.app.server.address() as AddressInfo).port,
    routes: built.routes,
    services,
    env,
    close: async () => {
      await built.close();
      const keys = await services.redis.keys(`${env.KILN_PREFIX}:*`);
      if (keys.length) await services.redis.del(...keys);
      await services.close();
    },
  };
}

const preflight = (method: string) => ({ origin: APP, 'access-control-request-method': method, 'access-control-request-headers': 'authorization, content-type' });

describe('CORS with CORS_ORIGINS set', () => {
  let api: Awaited<ReturnType<typeof start>>;
  beforeAll(async () => {
    api = await start({ CORS_ORIGINS: `${APP}, https://other.example.com` });
  });
  afterAll(() => api.close());

  it('answers a preflight before auth: 204, the origin, the headers a client sends, no body', async () => {
    const res = await raw(api.port, 'OPTIONS', '/v1/generations', preflight('POST'));
    expect(res.status).toBe(204);
    expect(res.body).toBe('');
    expect(res.headers['access-control-allow-origin']).toBe(APP);
    expect(String(res.headers['access-control-allow-headers'])).toContain('authorization');
    expect(String(res.headers['access-control-allow-methods'])).toContain('POST');
    expect(res.headers['access-control-max-age']).toBe('600');
  });

  it('a real request still needs its key; the 401 carries the CORS headers so the page can read it', async () => {
    const res = await raw(api.port, 'GET', '/v1/agents', { origin: APP });
    expect(res.status).toBe(401);
    expect(res.headers['access-control-allow-origin']).toBe(APP);
    expect(JSON.parse(res.body).error.code).toBe('unauthorized');
    const ok = await raw(api.port, 'GET', '/v1/agents', { origin: APP, authorization: `Bearer ${KEY}` });
    expect(ok.status).toBe(200);
    expect(ok.headers['access-control-allow-origin']).toBe(APP);
    expect(String(ok.headers['access-control-expose-headers'])).toContain('location');
  });

  it('another origin gets no CORS headers', async () => {
    const res = await raw(api.port, 'OPTIONS', '/v1/generations', { ...preflight('POST'), origin: 'https://evil.example.net' });
    expect(res.headers['access-control-allow-origin']).toBeUndefined();
    const get = await raw(api.port, 'GET', '/v1/agents', { origin: 'https://evil.example.net', authorization: `Bearer ${KEY}` });
    expect(get.headers['access-control-allow-origin']).toBeUndefined();
  });

  it('an OPTIONS request never reaches a handler, on any route, however spelled, with or without a body; every other request still needs its key', async () => {
    const routes = api.routes.filter((r: RegisteredRoute) => r.method !== 'HEAD' && r.method !== 'OPTIONS');
    expect(routes.length).toBeGreaterThan(20);
    const body = JSON.stringify({ model: { base: 'x' }, conditioning: { prompt: 'must not be queued' } });
    for (const r of routes) {
      const path = r.url.replace(/:[a-z_]+/g, randomUUID()).replace(/\*$/, 'x');
      for (const p of [path, path.toUpperCase(), `/${path}`, `${path}/`, path.replace(/\//g, '//')]) {
        for (const headers of [preflight(r.method), { 'access-control-request-method': r.method }, {}] as Record<string, string>[]) {
          const res = await raw(api.port, 'OPTIONS', p, { ...headers, 'content-type': 'application/json' }, body).catch((err) => {
            throw new Error(`OPTIONS ${p} ${JSON.stringify(headers)}: ${err.message}`);
          });
          expect([204, 404], `OPTIONS ${p} ${JSON.stringify(headers)} → ${res.status} ${res.body.slice(0, 80)}`).toContain(res.status);
          if (res.status === 204) expect(res.body).toBe('');
        }
      }
    }
    // and with CORS on, every route still answers 401 to a request from an allowed origin without a key
    for (const r of routes.filter((x) => x.auth !== 'public')) {
      const path = r.url.replace(/:[a-z_]+/g, randomUUID()).replace(/\*$/, 'api/queues');
      expect((await raw(api.port, r.method, path, { origin: APP })).status, `${r.method} ${path}`).toBe(401);
    }
    // nothing was recorded or queued
    expect(await api.services.redis.keys(`${api.env.KILN_PREFIX}:job:*`)).toEqual([]);
    expect(await api.services.intake.count()).toBe(0);
  });
});

describe('CORS without CORS_ORIGINS (the default)', () => {
  let api: Awaited<ReturnType<typeof start>>;
  beforeAll(async () => {
    api = await start({});
  });
  afterAll(() => api.close());

  it('sends no CORS headers and treats a preflight as an unknown route', async () => {
    const pre = await raw(api.port, 'OPTIONS', '/v1/generations', preflight('POST'));
    expect(pre.status).toBe(404);
    expect(pre.headers['access-control-allow-origin']).toBeUndefined();
    const get = await raw(api.port, 'GET', '/v1/agents', { origin: APP, authorization: `Bearer ${KEY}` });
    expect(get.status).toBe(200);
    expect(get.headers['access-control-allow-origin']).toBeUndefined();
  });

  it('refuses an origin that is not scheme://host[:port]', () => {
    expect(() => parseEnvOrThrow(ApiEnv, { REDIS_URL, S3_ENDPOINT: 'http://127.0.0.1:9', CORS_ORIGINS: 'https://app.example.com/path' })).toThrow(/CORS_ORIGINS/);
  });
});
