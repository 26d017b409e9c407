import type { LookupAddress } from 'node:dns';
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';
import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { type AddressPolicy, addressRange, anyAddress, checkTarget, FetchError, guardedRequest, publicOnly } from './net-guard.js';

// Nothing here sends a packet beyond loopback: the classifier tests only classify, literal
// hosts need no DNS, `localhost` comes from /etc/hosts, and every server listens on 127.0.0.x.

describe('addressRange: only public unicast addresses are public', () => {
  it.each([
    ['127.0.0.1', 'loopback'],
    ['127.255.255.254', 'loopback'],
    ['10.0.0.1', 'private'],
    ['172.16.0.1', 'private'],
    ['172.31.255.255', 'private'],
    ['192.168.1.1', 'private'],
    ['169.254.169.254', 'linkLocal'],
    ['100.64.0.1', 'carrierGradeNat'],
    ['100.127.255.255', 'carrierGradeNat'],
    ['224.0.0.1', 'multicast'],
    ['239.255.255.250', 'multicast'],
    ['255.255.255.255', 'broadcast'],
    ['0.0.0.0', 'unspecified'],
    ['0.1.2.3', 'unspecified'],
    ['192.0.2.1', 'reserved'],
    ['198.18.0.1', 'reserved'],
    ['240.0.0.1', 'reserved'],
    ['::1', 'loopback'],
    ['::', 'unspecified'],
    ['fc00::1', 'uniqueLocal'],
    ['fd12:3456::1', 'uniqueLocal'],
    ['fe80::1', 'linkLocal'],
    ['fec0::1', 'deprecatedSiteLocal'],
    ['ff02::1', 'multicast'],
    ['2001:db8::1', 'reserved'],
    ['100::1', 'discard'],
    // IPv6 forms that carry an IPv4 address are judged by that address
    ['::ffff:127.0.0.1', 'loopback'],
    ['::ffff:7f00:1', 'loopback'],
    ['::ffff:10.1.2.3', 'private'],
    ['::ffff:169.254.169.254', 'linkLocal'],
    ['::7f00:1', 'loopback'], // IPv4-compatible, the webhook check used to accept it
    ['::127.0.0.1', 'loopback'],
    ['::a00:1', 'private'],
    ['::2', 'unspecified'],
    ['64:ff9b::7f00:1', 'loopback'], // NAT64
    ['64:ff9b::a9fe:a9fe', 'linkLocal'],
    ['64:ff9b::c0a8:101', 'private'],
    ['2002:7f00:1::', 'loopback'], // 6to4
    ['2002:c0a8:101::1', 'private'],
    ['2002:a9fe:a9fe::', 'linkLocal'],
    // forms that are never a public host
    ['2001::1', 'teredo'],
    ['2001:0:4136:e378:8000:63bf:3fff:fdd2', 'teredo'],
    ['64:ff9b:1::7f00:1', 'rfc6052'], // local-use NAT64
    ['::ffff:0:7f00:1', 'rfc6145'],
    ['::1:0:0:1', 'reserved'], // outside 2000::/3, not IPv4-compatible
    ['not an address', 'invalid'],
  ])('%s is %s', (address, range) => {
    expect(addressRange(address)).toBe(range);
    expect(publicOnly(address, addressRange(address))).toBe(false);
  });

  it.each(['8.8.8.8', '1.1.1.1', '93.184.216.34', '2606:4700:4700::1111', '2001:4860:4860::8888', '::ffff:8.8.8.8', '64:ff9b::808:808', '2002:808:808::1'])(
    '%s is public unicast (classified only, never contacted)',
    (address) => {
      expect(addressRange(address)).toBe('unicast');
      expect(publicOnly(address, 'unicast')).toBe(true);
    },
  );
});

const failure = (p: Promise<unknown>) =>
  p.then(
    () => null,
    (e: unknown) => e as FetchError,
  );

describe('checkTarget: a URL host in any spelling is classified before anything is sent', () => {
  it.each([
    'http://127.0.0.1/',
    'http://127.1/',
    'http://0x7f000001/',
    'http://2130706433/',
    'http://017700000001/',
    'http://0177.0.0.1/',
    'http://0x7f.0.0.1/',
    'http://127.0.0.1./',
    'http://127。0。0。1/',
    'http://[::ffff:127.0.0.1]/',
    'http://[0:0:0:0:0:ffff:7f00:1]/',
    'http://[::7f00:1]/',
    'http://[::127.0.0.1]/',
    'http://[::1]/',
    'http://0.0.0.0/',
    'http://0/',
    'https://localhost:8443/',
    'http://10.0.0.1/',
    'http://169.254.169.254/latest/meta-data/',
    'http://[64:ff9b::169.254.169.254]/',
    'http://[2002:a9fe:a9fe::]/',
    'http://[fd00::1]/',
  ])('refuses %s', async (url) => {
    const err = await failure(checkTarget(url, { allow: publicOnly }));
    expect(err).toBeInstanceOf(FetchError);
    expect(err!.category).toBe('private_address');
  });

  it('names the host and the kind of address, not the address a name resolved to', async () => {
    expect((await failure(checkTarget('http://0x7f000001/', { allow: publicOnly })))!.message).toBe('private_address: 127.0.0.1 is a loopback address, not a public one');
    const named = await failure(checkTarget('http://internal.example/', { allow: publicOnly, resolve: async () => [{ address: '10.1.2.3', family: 4 }] }));
    expect(named!.message).toBe('private_address: internal.example resolves to a private address, not a public one');
  });

  it('refuses a name when any one of its addresses is refused', async () => {
    const both = async (): Promise<LookupAddress[]> => [
      { address: '8.8.8.8', family: 4 },
      { address: '10.0.0.1', family: 4 },
    ];
    expect((await failure(checkTarget('https://mixed.example/', { allow: publicOnly, resolve: both })))!.category).toBe('private_address');
  });

  it.each(['ftp://example.com/x', 'file:///etc/passwd', 'gopher://127.0.0.1/', 'not a url'])('refuses %s as invalid_url', async (url) => {
    expect((await failure(checkTarget(url, { allow: anyAddress })))!.category).toBe('invalid_url');
  });

  it('accepts public literal addresses without contacting them', async () => {
    await expect(checkTarget('https://8.8.8.8/hook', { allow: publicOnly })).resolves.toBeUndefined();
    await expect(checkTarget('https://[2606:4700:4700::1111]/hook', { allow: publicOnly })).resolves.toBeUndefined();
  });

  it('says dns_failed without the resolver error text', async () => {
    const err = await failure(checkTarget('https://nowhere.example/', { allow: publicOnly, resolve: () => Promise.reject(Object.assign(new Error('getaddrinfo ENOTFOUND nowhere.example'), { code: 'ENOTFOUND' })) }));
    expect(err!.category).toBe('dns_failed');
    expect(err!.message).not.toContain('ENOTFOUND');
  });
});

/** A loopback server that records every connection and request; behaviour chosen by path. */
class Recorder {
  readonly requests: { method: string; path: string; host: string; body: string }[] = [];
  connections = 0;
  dripped = 0;
  port = 0;
  private server!: Server;
  constructor(readonly host: string) {}

  url(path: string): string {
    return `http://${this.host}:${this.port}${path}`;
  }

  async start(): Promise<this> {
    this.server = createServer((req, res) => {
      const chunks: Buffer[] = [];
      req.on('data', (c: Buffer) => chunks.push(c));
      req.on('end', () => {
        this.requests.push({ method: req.method!, path: req.url!, host: req.headers.host!, body: Buffer.concat(chunks).toString() });
        this.answer(req, res);
      });
    });
    this.server.on('connection', () => (this.connections += 1));
    await new Promise<void>((r) => this.server.listen(0, this.host, r));
    this.port = (this.server.address() as AddressInfo).port;
    return this;
  }

  reset(): void {
    this.requests.length = 0;
    this.connections = 0;
    this.dripped = 0;
  }

  private answer(req: IncomingMessage, res: ServerResponse): void {
    const url = new URL(req.url!, 'http://x');
    const [, route, arg] = url.pathname.split('/');
    if (route === 'ok') return void res.end('hello');
    if (route === 'loop') return void res.writeHead(302, { location: `/loop/${Number(arg) + 1}` }).end();
    if (route === 'chain') return void res.writeHead(302, { location: Number(arg) > 1 ? `/chain/${Number(arg) - 1}` : '/ok' }).end();
    if (route === 'to') return void res.writeHead(Number(url.searchParams.get('status') ?? 302), { location: url.searchParams.get('url')! }).end();
    if (route === 'drip') {
      res.writeHead(200, { 'content-type': 'image/png' });
      const timer = setInterval(() => {
        this.dripped += 1;
        res.write('x');
      }, 50);
      res.on('close', () => clearInterval(timer));
      return;
    }
    if (route === 'silent') return; // never answers
    if (route === 'endless') {
      const pump = () => {
        while (res.write(Buffer.alloc(64 * 1024))) {}
      };
      res.on('drain', pump);
      pump();
      return;
    }
    if (route === 'declared') return void res.writeHead(200, { 'content-length': String(1 << 30) }).write('x');
    if (route === 'hangup') return void req.socket.destroy();
    res.writeHead(404).end();
  }

  close(): Promise<void> {
    this.server.closeAllConnections();
    return new Promise((r) => this.server.close(() => r()));
  }
}

describe('guardedRequest against loopback servers', () => {
  // 127.0.0.1 plays the allowed host; 127.0.0.2 a private host the policy refuses
  const a = new Recorder('127.0.0.1');
  const b = new Recorder('127.0.0.2');
  const onlyA: AddressPolicy = (address) => address === '127.0.0.1';
  const get = (url: string, extra: Partial<Parameters<typeof guardedRequest>[1]> = {}) => guardedRequest(url, { allow: onlyA, timeoutMs: 2_000, maxBytes: 1024, maxRedirects: 3, ...extra });

  beforeAll(async () => {
    await a.start();
    await b.start();
  });
  afterAll(async () => {
    await a.close();
    await b.close();
  });
  beforeEach(() => {
    a.reset();
    b.reset();
  });

  it('fetches from an allowed address (the control for every refusal below)', async () => {
    const res = await get(a.url('/ok'));
    expect(res.status).toBe(200);
    expect(res.body.toString()).toBe('hello');
    expect(a.requests).toHaveLength(1);
  });

  it('refuses loopback under the default policy without opening a connection', async () => {
    const err = await failure(get(a.url('/ok'), { allow: publicOnly }));
    expect(err!.category).toBe('private_address');
    expect(a.connections).toBe(0);
  });

  it('follows a few redirects, checking each hop, and reports the final URL', async () => {
    const res = await get(a.url('/chain/3'));
    expect(res.status).toBe(200);
    expect(res.url).toBe(a.url('/ok'));
    expect(a.requests.map((r) => r.path)).toEqual(['/chain/3', '/chain/2', '/chain/1', '/ok']);
  });

  it('stops a redirect chain that is too long', async () => {
    const err = await failure(get(a.url('/loop/0')));
    expect(err!.category).toBe('too_many_redirects');
    expect(a.requests).toHaveLength(4); // the request and three redirects followed
  });

  it('refuses a redirect to an address the policy refuses, and never connects there', async () => {
    const err = await failure(get(a.url(`/to?url=${encodeURIComponent(b.url('/ok'))}`)));
    expect(err!.category).toBe('private_address');
    expect(a.requests).toHaveLength(1);
    expect(b.connections).toBe(0);
  });

  it.each(['file:///etc/passwd', 'ftp://127.0.0.1/x', 'gopher://127.0.0.1:70/'])('refuses a redirect to %s', async (target) => {
    const err = await failure(get(a.url(`/to?url=${encodeURIComponent(target)}`), { allow: anyAddress }));
    expect(err!.category).toBe('invalid_url');
  });

  it('returns a redirect as it is when redirects are not to be followed', async () => {
    const res = await get(a.url(`/to?url=${encodeURIComponent(b.url('/ok'))}`), { maxRedirects: 0, allow: anyAddress });
    expect(res.status).toBe(302);
    expect(b.connections).toBe(0);
  });

  it.each([
    [307, 'POST', 'payload'],
    [303, 'GET', ''],
  ])('after a POST, a %s redirect is followed with %s', async (status, method, body) => {
    await get(a.url(`/to?status=${status}&url=${encodeURIComponent('/ok')}`), { method: 'POST', body: 'payload' });
    expect(a.requests[1]).toMatchObject({ method, path: '/ok', body });
  });

  it('cuts a server dripping bytes at the total deadline, though it never goes idle', async () => {
    const started = Date.now();
    const err = await failure(get(a.url('/drip'), { timeoutMs: 600 }));
    const took = Date.now() - started;
    expect(err!.category).toBe('timeout');
    expect(err!.message).toBe('timeout: no complete answer within 600 ms');
    expect(took).toBeGreaterThanOrEqual(590);
    expect(took).toBeLessThan(1_500);
    expect(a.dripped).toBeGreaterThan(5);
  });

  it('cuts a server that never answers at the deadline', async () => {
    expect((await failure(get(a.url('/silent'), { timeoutMs: 300 })))!.category).toBe('timeout');
  });

  it('counts DNS in the deadline', async () => {
    const never = () => new Promise<LookupAddress[]>(() => {});
    expect((await failure(get('http://slow-dns.example/', { timeoutMs: 300, resolve: never })))!.category).toBe('timeout');
  });

  it('caps the body: exactly the cap passes, one byte more does not', async () => {
    expect((await get(a.url('/ok'), { maxBytes: 5 })).body.toString()).toBe('hello');
    expect((await failure(get(a.url('/ok'), { maxBytes: 4 })))!.category).toBe('too_large');
  });

  it('stops reading an endless body at the cap', async () => {
    expect((await failure(get(a.url('/endless'), { maxBytes: 256 * 1024 })))!.category).toBe('too_large');
  });

  it('refuses a declared length over the cap before reading the body', async () => {
    expect((await failure(get(a.url('/declared'))))!.category).toBe('too_large');
  });

  it('says the same thing for a closed port and a server that hangs up (no port scanner)', async () => {
    const closed = new Recorder('127.0.0.1');
    await closed.start();
    const closedUrl = closed.url('/ok');
    await closed.close();
    const refused = await failure(get(closedUrl));
    const hungUp = await failure(get(a.url('/hangup')));
    expect(refused!.category).toBe('connect_failed');
    expect(hungUp!.message).toBe(refused!.message);
    expect(refused!.message).not.toMatch(/ECONNREFUSED|hang up|ECONNRESET/);
  });

  it('resolves a name once and connects to exactly the address it checked', async () => {
    // the system says localhost is 127.0.0.1 (server a); the checked answer says 127.0.0.2 (server b)
    let lookups = 0;
    const resolve = async (): Promise<LookupAddress[]> => {
      lookups += 1;
      return [{ address: '127.0.0.2', family: 4 }];
    };
    const res = await get(`http://localhost:${b.port}/ok`, { allow: anyAddress, resolve });
    expect(res.status).toBe(200);
    expect(lookups).toBe(1);
    expect(b.requests).toEqual([expect.objectContaining({ path: '/ok', host: `localhost:${b.port}` })]);
    expect(a.connections).toBe(0);
  });

  it('refuses a name if any address it resolves to is refused, before connecting to any', async () => {
    const resolve = async (): Promise<LookupAddress[]> => [
      { address: '127.0.0.1', family: 4 },
      { address: '127.0.0.2', family: 4 },
    ];
    expect((await failure(get(`http://two.example:${a.port}/ok`, { resolve })))!.category).toBe('private_address');
    expect(a.connections + b.connections).toBe(0);
  });

  it('settles on the status alone when the body is not wanted', async () => {
    const res = await get(a.url('/endless'), { method: 'POST', body: '{}', readBody: false, maxBytes: 0 });
    expect(res.status).toBe(200);
    expect(res.body.length).toBe(0);
  });
});

