import { createServer, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { KilnError } from './errors.js';
import { assertPublicTarget, postWebhook } from './webhooks.js';

// Only literal addresses and `localhost` (resolved from /etc/hosts): no network is needed.

describe('assertPublicTarget (webhook SSRF guard)', () => {
  it.each([
    ['loopback IPv4', 'http://127.0.0.1:8080/hook'],
    ['loopback IPv4, other address', 'https://127.1.2.3/hook'],
    ['loopback IPv6', 'http://[::1]:9000/hook'],
    ['private 10/8', 'https://10.0.0.5/hook'],
    ['private 172.16/12', 'https://172.20.1.1/hook'],
    ['private 192.168/16', 'http://192.168.1.20/hook'],
    ['cloud metadata (link-local)', 'http://169.254.169.254/latest/meta-data/'],
    ['IPv4-mapped loopback', 'http://[::ffff:127.0.0.1]/hook'],
    ['IPv4-mapped private', 'http://[::ffff:10.1.2.3]/hook'],
    ['unspecified', 'http://0.0.0.0/hook'],
    ['IPv6 unique local', 'http://[fd00::1]/hook'],
    ['loopback written as one number', 'http://2130706433/hook'],
    ['localhost', 'http://localhost:3000/hook'],
  ])('refuses %s (%s)', async (_what, url) => {
    const err = await assertPublicTarget(url).then(
      () => null,
      (e: unknown) => e,
    );
    expect(err).toBeInstanceOf(KilnError);
    expect((err as KilnError).code).toBe('validation_failed');
    expect((err as KilnError).message).toContain('WEBHOOK_ALLOW_PRIVATE');
  });

  it('names the host and the kind of address it refused', async () => {
    await expect(assertPublicTarget('http://169.254.169.254/latest/meta-data/')).rejects.toThrow(
      'target 169.254.169.254 resolves to 169.254.169.254, a linkLocal address',
    );
  });

  it.each(['https://93.184.216.34/hook', 'http://8.8.8.8:8080/kiln', 'https://[2606:4700:4700::1111]/hook'])('accepts the public address %s', async (url) => {
    await expect(assertPublicTarget(url)).resolves.toBeUndefined();
  });
});

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
