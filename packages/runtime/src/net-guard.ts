import { lookup as dnsLookup, type LookupAddress, type LookupAllOptions } from 'node:dns';
import { lookup } from 'node:dns/promises';
import { request as httpRequest } from 'node:http';
import { request as httpsRequest } from 'node:https';
import ipaddr from 'ipaddr.js';
import { KilnError } from './errors.js';

/**
 * Outbound HTTP to addresses users give us (webhook receivers, input image URLs) must not
 * reach private, loopback or link-local networks (SSRF) unless the operator allows it. The
 * check runs before the request and again inside the socket's DNS lookup, so a name cannot
 * resolve publicly for the check and privately for the connection (DNS rebinding).
 */

/** Why an address is no place to send a webhook, or null when it is a public unicast one. */
function nonPublic(address: string): string | null {
  let addr = ipaddr.parse(address);
  if (addr.kind() === 'ipv6' && (addr as ipaddr.IPv6).isIPv4MappedAddress()) addr = (addr as ipaddr.IPv6).toIPv4Address();
  const range = addr.range();
  return range === 'unicast' ? null : range;
}

/** Refuses loopback, private, link-local and other non-public targets (SSRF). */
export async function assertPublicTarget(rawUrl: string): Promise<void> {
  const url = new URL(rawUrl);
  const host = url.hostname.replace(/^\[|\]$/g, '');
  const addresses = ipaddr.isValid(host) ? [host] : (await lookup(host, { all: true })).map((a) => a.address);
  for (const address of addresses) {
    const range = nonPublic(address);
    if (range) {
      throw new KilnError('validation_failed', `target ${host} resolves to ${address}, a ${range} address; set WEBHOOK_ALLOW_PRIVATE=true to allow it`);
    }
  }
}

/**
 * A DNS lookup for the delivery socket itself that refuses non-public answers, so a name
 * that resolved to a public address at the check cannot rebind to a private one for the POST.
 */
export function publicOnlyLookup(hostname: string, options: LookupAllOptions | object, cb: (err: Error | null, address: string | LookupAddress[], family?: number) => void): void {
  dnsLookup(hostname, { ...options, all: true }, (err, addresses) => {
    if (err) return cb(err, '');
    const bad = addresses.find((a) => nonPublic(a.address));
    if (bad) return cb(new Error(`${hostname} resolves to ${bad.address}, a ${nonPublic(bad.address)} address`), '');
    if ((options as LookupAllOptions).all) return cb(null, addresses);
    cb(null, addresses[0]!.address, addresses[0]!.family);
  });
}

/** GET with a byte limit and a timeout; refuses private targets unless allowed. */
export function guardedGet(rawUrl: string, opts: { maxBytes: number; timeoutMs: number; allowPrivate: boolean }): Promise<{ status: number; body: Buffer; contentType: string | null }> {
  const url = new URL(rawUrl);
  const send = url.protocol === 'https:' ? httpsRequest : httpRequest;
  return new Promise((resolve, reject) => {
    const req = send(url, { method: 'GET', timeout: opts.timeoutMs, ...(opts.allowPrivate ? {} : { lookup: publicOnlyLookup as never }) }, (res) => {
      const chunks: Buffer[] = [];
      let size = 0;
      res.on('data', (c: Buffer) => {
        size += c.length;
        if (size > opts.maxBytes) {
          req.destroy(new KilnError('payload_too_large', `larger than ${opts.maxBytes} bytes`));
          return;
        }
        chunks.push(c);
      });
      res.on('end', () => resolve({ status: res.statusCode ?? 0, body: Buffer.concat(chunks), contentType: res.headers['content-type'] ?? null }));
      res.on('error', reject);
    });
    req.on('timeout', () => req.destroy(new Error(`no answer within ${opts.timeoutMs} ms`)));
    req.on('error', reject);
    req.end();
  });
}
