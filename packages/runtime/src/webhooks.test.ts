import { createServer, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { postWebhook } from './webhooks.js';

// The address classification itself is tested in net-guard.test.ts.

describe('postWebhook: the delivery socket re-checks the address it connects to', () => {
  let server: Server;
  let port = 0;
  let hits = 0;
  beforeAll(async () => {
    server = createServer((_req, res) => {
      hits += 1;
      res.statusCode = 204;
      res.end();
    });
    await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
    port = (server.address() as AddressInfo).port;
  });
  afterAll(() => new Promise<void>((r) => server.close(() => r())));

  it('refuses a name that resolves to loopback at connect time, and never sends the body', async () => {
    const before = hits;
    await expect(postWebhook(`http://localhost:${port}/hook`, {}, '{}', 2_000, false)).rejects.toThrow(/loopback/);
    expect(hits).toBe(before);
  });

  it('delivers to the same receiver when private targets are allowed', async () => {
    await expect(postWebhook(`http://localhost:${port}/hook`, { 'content-type': 'application/json' }, '{}', 2_000, true)).resolves.toBe(204);
  });
});
