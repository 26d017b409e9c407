import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';
import { anyAddress, guardedRequest } from '@kiln/runtime';
import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { ENTRY } from '../scripts/farm-lib.js';
import { basicRequest, Farm, freePort, sleep } from './support/farm.js';
import { gradientPng } from './support/images.js';

/**
 * SSRF: every URL Kiln fetches or posts to goes through one guarded client. A loopback server
 * stands in for the internal network and records every connection; a refusal must leave it
 * with nothing. Only loopback is ever contacted: spellings whose refusal could fail towards a
 * routed address (NAT64, 6to4, IPv4-compatible) are tested in net-guard.test.ts by
 * classification alone, or here through /v1/validate, which queues nothing to deliver.
 */

/** One port on 127.0.0.1 and on ::1, so every spelling of "this host" lands on it if fetched. */
class InternalService {
  readonly requests: string[] = [];
  connections = 0;
  port = 0;
  png!: Buffer;
  private servers: Server[] = [];

  async start(): Promise<this> {
    this.png = await gradientPng(64, 64);
    for (const host of ['127.0.0.1', '::1']) {
      const server = createServer((req, res) => {
        this.requests.push(`${req.method} ${req.url}`);
        req.resume();
        req.on('end', () => this.answer(req, res));
      });
      server.on('connection', () => (this.connections += 1));
      await new Promise<void>((r) => server.listen(this.port, host, r));
      this.port = (server.address() as AddressInfo).port;
      this.servers.push(server);
    }
    return this;
  }

  url(path: string, host = '127.0.0.1'): string {
    return `http://${host}:${this.port}${path}`;
  }

  private answer(req: IncomingMessage, res: ServerResponse): void {
    const [, route, arg] = new URL(req.url!, 'http://x').pathname.split('/');
    if (route === 'img.png') return void res.writeHead(200, { 'content-type': 'image/png' }).end(this.png);
    if (route === 'via') return void res.writeHead(302, { location: '/img.png' }).end();
    if (route === 'loop') return void res.writeHead(302, { location: `/loop/${Number(arg) + 1}` }).end();
    if (route === 'hangup') return void req.socket.destroy();
    if (route === 'drip') {
      res.writeHead(200, { 'content-type': 'image/png' });
      const timer = setInterval(() => res.write(this.png.subarray(0, 1)), 100);
      res.on('close', () => clearInterval(timer));
      return;
    }
    if (route === 'endless') {
      const pump = () => {
        while (res.write(Buffer.alloc(256 * 1024))) {}
      };
      res.writeHead(200, { 'content-type': 'image/png' });
      res.on('drain', pump);
      pump();
      return;
    }
    res.writeHead(204).end();
  }

  reset(): void {
    this.requests.length = 0;
    this.connections = 0;
  }

  async close(): Promise<void> {
    for (const s of this.servers) {
      s.closeAllConnections();
      await new Promise((r) => s.close(r));
    }
  }
}

// Every spelling of this host's loopback a client might try; WHATWG URL rewrites most of them.
const SPELLINGS = ['127.0.0.1', '127.1', '0x7f000001', '2130706433', '017700000001', '0177.0.0.1', '0x7f.1', '127.0.0.1.', '[::ffff:127.0.0.1]', '[::1]', '0.0.0.0', '0', 'localhost'];

describe('SSRF: outbound requests never reach the internal network', () => {
  const farm = new Farm({ agents: 1, env: { WEBHOOK_ALLOW_PRIVATE: 'false', INPUT_ALLOW_PRIVATE: 'false', KILN_SYNTHETIC_NO_BF16: '1' } });
  const internal = new InternalService();
  // A second API on the same farm whose operator allowed private targets: it reaches the
  // loopback service, so the deadline, byte cap and redirects can be shown through the API,
  // and it queues a webhook the dispatcher (private targets not allowed) must refuse at delivery.
  let lenient = '';
  const post = async (base: string, path: string, body: unknown) => {
    const res = await fetch(`${base}${path}`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify(body) });
    return { status: res.status, body: (await res.json()) as any };
  };

  beforeAll(async () => {
    await internal.start();
    await farm.start();
    const port = await freePort();
    lenient = `http://127.0.0.1:${port}`;
    farm.spawn('api-lenient', ENTRY.api, { PORT: String(port), WEBHOOK_ALLOW_PRIVATE: 'true', INPUT_ALLOW_PRIVATE: 'true', INPUT_FETCH_TIMEOUT_MS: '1000' });
    await farm.waitFor(async () => (await fetch(`${lenient}/healthz`)).ok, 30_000, 'the lenient API up');
  });
  afterAll(async () => {
    await farm.close();
    await internal.close();
  });
  beforeEach(() => internal.reset());

  it('each spelling does reach the internal service when private targets are allowed (the control)', async () => {
    for (const host of SPELLINGS) {
      const res = await guardedRequest(internal.url('/img.png', host), { allow: anyAddress, timeoutMs: 2_000, maxBytes: 1 << 20 });
      expect(res.status, host).toBe(200);
    }
    expect(internal.requests).toHaveLength(SPELLINGS.length);
  });

  it.each(SPELLINGS)('an input image URL on %s → 400 private_address, and nothing reaches the service', async (host) => {
    const res = await farm.request('POST', '/v1/generations', basicRequest({ image: { init: { url: internal.url('/img.png', host) } } }));
    expect(res.status).toBe(400);
    expect(res.body.error.code).toBe('validation_failed');
    expect(res.body.error.details).toEqual([expect.objectContaining({ field: 'image.init.url', rule: 'private_address' })]);
    expect(res.body.error.details[0].message).toMatch(/^could not fetch the image \(private_address: .* address, not a public one\)$/);
    expect(internal.connections).toBe(0);
  });

  it.each(['http://[::7f00:1]/', `http://[::7f00:1]:PORT/hook`, 'http://0x7f000001:PORT/hook', 'http://[::ffff:127.0.0.1]:PORT/hook', 'http://[64:ff9b::a9fe:a9fe]/latest'])(
    'a webhook to %s → 400 private_address at submission',
    async (url) => {
      const res = await farm.request('POST', '/v1/validate', basicRequest({ webhook: { url: url.replace('PORT', String(internal.port)) } }));
      expect(res.status).toBe(400);
      expect(res.body.error.details).toEqual([expect.objectContaining({ field: 'webhook.url', rule: 'private_address' })]);
      expect(internal.connections).toBe(0);
    },
  );

  it('a webhook that became private after submission is refused at delivery, once, and nothing is sent', async () => {
    const submitted = await post(lenient, '/v1/generations', basicRequest({ webhook: { url: internal.url('/hook'), events: ['completed'] } }));
    expect(submitted.status).toBe(202);
    const job = await farm.waitForJob(submitted.body.id, (j) => j.webhook_deliveries.length > 0);
    expect(job.status).toBe('succeeded');
    await sleep(1_000); // WEBHOOK_BACKOFF_MS is 100 ms: a retry would have come by now
    const { webhook_deliveries: tries } = await farm.job(job.id);
    expect(tries).toEqual([expect.objectContaining({ ok: false, status_code: null, error: 'private_address: 127.0.0.1 is a loopback address, not a public one' })]);
    expect(internal.connections).toBe(0);
  });

  it('where private targets are allowed, an input image is fetched through a redirect', async () => {
    const res = await post(lenient, '/v1/validate', basicRequest({ image: { init: { url: internal.url('/via') } } }));
    expect(res.status).toBe(200);
    expect(internal.requests).toEqual(['GET /via', 'GET /img.png']);
  });

  it('a redirect chain that never ends → 400 too_many_redirects after a few hops', async () => {
    const res = await post(lenient, '/v1/validate', basicRequest({ image: { init: { url: internal.url('/loop/0') } } }));
    expect(res.status).toBe(400);
    expect(res.body.error.details[0]).toMatchObject({ field: 'image.init.url', rule: 'image_fetch_failed', message: 'could not fetch the image (too_many_redirects: more than 3 redirects)' });
    expect(internal.requests).toHaveLength(4);
  });

  it('a server dripping a byte every 100 ms is cut at the total deadline (INPUT_FETCH_TIMEOUT_MS)', async () => {
    const started = Date.now();
    const res = await post(lenient, '/v1/validate', basicRequest({ image: { init: { url: internal.url('/drip') } } }));
    expect(Date.now() - started).toBeLessThan(3_000);
    expect(res.status).toBe(400);
    expect(res.body.error.details[0]).toMatchObject({ rule: 'image_fetch_failed', message: 'could not fetch the image (timeout: no complete answer within 1000 ms)' });
  });

  it('a body that never ends → 413 at the byte cap', async () => {
    const res = await post(lenient, '/v1/validate', basicRequest({ image: { init: { url: internal.url('/endless') } } }));
    expect(res.status).toBe(413);
    expect(res.body.error.details[0]).toMatchObject({ field: 'image.init.url', rule: 'image_too_large' });
  });

  it('a closed port and a server that hangs up get the same answer (no port scanner)', async () => {
    const closed = createServer();
    await new Promise<void>((r) => closed.listen(0, '127.0.0.1', r));
    const closedPort = (closed.address() as AddressInfo).port;
    await new Promise((r) => closed.close(r));
    const refused = await post(lenient, '/v1/validate', basicRequest({ image: { init: { url: `http://127.0.0.1:${closedPort}/x.png` } } }));
    const hungUp = await post(lenient, '/v1/validate', basicRequest({ image: { init: { url: internal.url('/hangup') } } }));
    expect(refused.status).toBe(400);
    expect(refused.body.error.details[0].message).toBe('could not fetch the image (connect_failed: the connection failed or closed before a complete answer)');
    expect(hungUp.body.error.details[0].message).toBe(refused.body.error.details[0].message);
  });
});
