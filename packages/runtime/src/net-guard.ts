import type { LookupAddress } from 'node:dns';
import { lookup as dnsLookup } from 'node:dns/promises';
import { type IncomingHttpHeaders, type IncomingMessage, request as httpRequest } from 'node:http';
import { request as httpsRequest } from 'node:https';
import { isIP, type LookupFunction } from 'node:net';
import ipaddr from 'ipaddr.js';

/**
 * The one client for every URL Kiln fetches or posts to on a user's behalf (input images,
 * webhook deliveries), so a user cannot make Kiln reach its own internal network (SSRF).
 *
 * Per hop: the host is resolved once (a literal address is taken as is), every address is
 * classified, and the socket connects only to those checked addresses, so a name cannot
 * answer publicly for the check and privately for the connection. Redirects are followed by
 * hand, each hop checked again. One deadline covers the whole exchange and the body has a
 * byte cap. Every failure is a FetchError with a category and a message Kiln wrote: the
 * socket's own error text never reaches a caller, so the error is no port scanner.
 */

export type FetchFailure = 'invalid_url' | 'private_address' | 'dns_failed' | 'connect_failed' | 'timeout' | 'too_large' | 'too_many_redirects';

/** A fetch that could not be done; `message` is safe to show to the client who gave the URL. */
export class FetchError extends Error {
  constructor(
    readonly category: FetchFailure,
    detail: string,
    options: { cause?: unknown } = {},
  ) {
    super(`${category}: ${detail}`, options);
    this.name = 'FetchError';
  }
}

/** Decides whether an address may be connected to, given its ipaddr.js range name. */
export type AddressPolicy = (address: string, range: string) => boolean;
/** The default: public unicast addresses only. */
export const publicOnly: AddressPolicy = (_address, range) => range === 'unicast';
/** What INPUT_ALLOW_PRIVATE / WEBHOOK_ALLOW_PRIVATE turn on. */
export const anyAddress: AddressPolicy = () => true;
export const targetPolicy = (allowPrivate: boolean): AddressPolicy => (allowPrivate ? anyAddress : publicOnly);

const NAT64 = ipaddr.parseCIDR('64:ff9b::/96');
const IPV4_COMPATIBLE = ipaddr.parseCIDR('::/96');
// IANA allocates global unicast from 2000::/3 only; ipaddr.js calls the unallocated rest 'unicast'
const GLOBAL_UNICAST_V6 = ipaddr.parseCIDR('2000::/3');

const v4 = (bytes: number[]) => new ipaddr.IPv4(bytes);

/** The IPv4 address an IPv6 one carries and leads to (mapped, compatible, NAT64, 6to4), if any. */
function embeddedIPv4(addr: ipaddr.IPv6, range: string): ipaddr.IPv4 | null {
  const b = addr.toByteArray();
  if (range === 'ipv4Mapped') return v4(b.slice(12));
  if (range === '6to4') return v4(b.slice(2, 6));
  if (addr.match(NAT64)) return v4(b.slice(12));
  if (range !== 'loopback' && range !== 'unspecified' && addr.match(IPV4_COMPATIBLE)) return v4(b.slice(12));
  return null;
}

/**
 * The ipaddr.js range name of an address ('unicast', 'loopback', 'private', 'linkLocal', …),
 * read through the IPv6 forms that carry an IPv4 address. Only 'unicast' is public.
 */
export function addressRange(address: string): string {
  let addr: ipaddr.IPv4 | ipaddr.IPv6;
  try {
    addr = ipaddr.parse(address);
  } catch {
    return 'invalid';
  }
  if (addr.kind() === 'ipv4') return addr.range();
  const v6 = addr as ipaddr.IPv6;
  const range = v6.range();
  const inner = embeddedIPv4(v6, range);
  if (inner) return inner.range();
  if (range === 'unicast' && !v6.match(GLOBAL_UNICAST_V6)) return 'reserved';
  return range;
}

export type Resolver = (hostname: string) => Promise<LookupAddress[]>;
const systemResolver: Resolver = (hostname) => dnsLookup(hostname, { all: true });

export interface TargetOptions {
  allow: AddressPolicy;
  /** DNS, replaceable in tests so they never depend on a real name server */
  resolve?: Resolver;
}

/** An http(s) URL, or FetchError('invalid_url'). */
function parseTarget(raw: string, base?: URL): URL {
  let url: URL;
  try {
    url = new URL(raw, base);
  } catch {
    throw new FetchError('invalid_url', 'not a valid URL');
  }
  if (url.protocol !== 'http:' && url.protocol !== 'https:') throw new FetchError('invalid_url', 'only http and https URLs can be fetched');
  return url;
}

/** Resolves the URL's host once and checks every address against the policy. */
async function resolveChecked(url: URL, opts: TargetOptions): Promise<LookupAddress[]> {
  // WHATWG URL has already turned every IPv4 spelling (127.1, 0x7f000001, 2130706433, 0177.0.0.1, 0)
  // into dotted form and compressed IPv6, so a host is either a literal address or a DNS name
  const host = url.hostname.replace(/^\[|\]$/g, '');
  let addresses: LookupAddress[];
  if (isIP(host)) addresses = [{ address: host, family: isIP(host) }];
  else {
    try {
      addresses = await (opts.resolve ?? systemResolver)(host);
    } catch (err) {
      throw new FetchError('dns_failed', `${host} could not be resolved`, { cause: err });
    }
    if (addresses.length === 0) throw new FetchError('dns_failed', `${host} could not be resolved`);
  }
  for (const { address } of addresses) {
    const range = addressRange(address);
    if (!opts.allow(address, range)) {
      // a name's address is not named: it would map the internal network for the client
      const what = isIP(host) ? `${host} is` : `${host} resolves to`;
      throw new FetchError('private_address', `${what} a ${range} address, not a public one`);
    }
  }
  return addresses;
}

/**
 * Checks a URL without connecting: http(s), and every address its host resolves to allowed.
 * For submission-time checks (a webhook target); the guarded client checks again when it sends.
 */
export async function checkTarget(rawUrl: string, opts: TargetOptions & { timeoutMs?: number }): Promise<void> {
  const url = parseTarget(rawUrl);
  const deadline = new AbortController();
  const timer = setTimeout(() => deadline.abort(), opts.timeoutMs ?? 5_000);
  try {
    await untilAborted(resolveChecked(url, opts), deadline.signal, () => new FetchError('dns_failed', `${url.hostname} did not resolve in time`));
  } finally {
    clearTimeout(timer);
  }
}

export interface GuardedRequestOptions extends TargetOptions {
  method?: 'GET' | 'POST';
  headers?: Record<string, string>;
  body?: string | Buffer;
  /** one deadline for everything: DNS, connect, send, every redirect, the whole body */
  timeoutMs: number;
  /** largest body accepted; larger is FetchError('too_large') */
  maxBytes: number;
  /** redirects followed (each hop checked); 0 returns the 3xx itself */
  maxRedirects?: number;
  /** false: settle on the status and headers, and drop the body unread */
  readBody?: boolean;
}

export interface GuardedResponse {
  status: number;
  headers: IncomingHttpHeaders;
  body: Buffer;
  /** the URL that answered, after redirects */
  url: string;
}

const REDIRECTS = new Set([301, 302, 303, 307, 308]);

/** GET or POST through the guard; see the module comment for what it promises. */
export async function guardedRequest(rawUrl: string, opts: GuardedRequestOptions): Promise<GuardedResponse> {
  const deadline = new AbortController();
  const timer = setTimeout(() => deadline.abort(), opts.timeoutMs);
  const timedOut = () => new FetchError('timeout', `no complete answer within ${opts.timeoutMs} ms`);
  let url = parseTarget(rawUrl);
  let method = opts.method ?? 'GET';
  let body = opts.body;
  try {
    for (let hop = 0; ; hop++) {
      const addresses = await untilAborted(resolveChecked(url, opts), deadline.signal, timedOut);
      const res = await send(url, addresses, method, opts.headers ?? {}, body, deadline.signal);
      const location = res.headers.location;
      if (REDIRECTS.has(res.statusCode ?? 0) && location && (opts.maxRedirects ?? 0) > 0) {
        res.destroy();
        if (hop >= opts.maxRedirects!) throw new FetchError('too_many_redirects', `more than ${opts.maxRedirects} redirects`);
        url = parseTarget(location, url);
        // as browsers do: 307/308 repeat the request, the others turn it into a GET
        if (res.statusCode !== 307 && res.statusCode !== 308) [method, body] = ['GET', undefined];
        continue;
      }
      const answer = { status: res.statusCode ?? 0, headers: res.headers, url: url.href };
      if (opts.readBody === false) {
        res.destroy();
        return { ...answer, body: Buffer.alloc(0) };
      }
      return { ...answer, body: await readCapped(res, opts.maxBytes) };
    }
  } catch (err) {
    if (deadline.signal.aborted) throw timedOut();
    if (err instanceof FetchError) throw err;
    // refused, reset, hung up, TLS: one category, so the answer says nothing about the port
    throw new FetchError('connect_failed', 'the connection failed or closed before a complete answer', { cause: err });
  } finally {
    clearTimeout(timer);
  }
}

/** One HTTP exchange to exactly the checked addresses; settles on the response head. */
function send(url: URL, addresses: LookupAddress[], method: string, headers: Record<string, string>, body: string | Buffer | undefined, signal: AbortSignal): Promise<IncomingMessage> {
  // Node skips `lookup` for a literal host, which was checked as written; for a name, it
  // gets back the addresses already checked instead of asking DNS again (no rebinding)
  const pinned: LookupFunction = (_hostname, options, cb) => {
    const fit = options.family === 4 || options.family === 6 ? addresses.filter((a) => a.family === options.family) : addresses;
    if (fit.length === 0) return cb(Object.assign(new Error('no checked address of that family'), { code: 'ENOTFOUND' }), '', 0);
    if (options.all) return cb(null, fit);
    cb(null, fit[0]!.address, fit[0]!.family);
  };
  const request = url.protocol === 'https:' ? httpsRequest : httpRequest;
  const sendHeaders = body === undefined ? headers : { ...headers, 'content-length': String(Buffer.byteLength(body)) };
  return new Promise((resolve, reject) => {
    // agent: false: a fresh socket per exchange, never one pooled under another policy
    const req = request(url, { method, headers: sendHeaders, lookup: pinned, agent: false, signal }, resolve);
    req.on('error', reject);
    req.end(body);
  });
}

async function readCapped(res: IncomingMessage, maxBytes: number): Promise<Buffer> {
  const tooLarge = () => new FetchError('too_large', `the answer is larger than ${maxBytes} bytes`);
  if (Number(res.headers['content-length'] ?? 0) > maxBytes) {
    res.destroy();
    throw tooLarge();
  }
  const chunks: Buffer[] = [];
  let size = 0;
  // the request's abort signal destroys the socket at the deadline, which ends this loop
  for await (const chunk of res as AsyncIterable<Buffer>) {
    size += chunk.length;
    if (size > maxBytes) {
      res.destroy();
      throw tooLarge();
    }
    chunks.push(chunk);
  }
  if (!res.complete) throw new Error('the body ended early');
  return Buffer.concat(chunks);
}

/** `work`, or the error from `onAbort` as soon as the signal fires (DNS cannot be aborted). */
function untilAborted<T>(work: Promise<T>, signal: AbortSignal, onAbort: () => Error): Promise<T> {
  if (signal.aborted) return Promise.reject(onAbort());
  return new Promise<T>((resolve, reject) => {
    const abort = () => reject(onAbort());
    signal.addEventListener('abort', abort, { once: true });
    work.then(resolve, reject).finally(() => signal.removeEventListener('abort', abort));
  });
}
