import { KilnError } from '@kiln/runtime';
import { z } from 'zod';
import type { ApiContext } from './context.js';
import type { Principal } from './keys.js';

/**
 * Tenant isolation. A client key sees and acts on its own tenant's records only: another
 * tenant's id is a 404, exactly like an unknown one. Every S3 key a client names is confined to
 * its tenant's area of the bucket (plus the shared prefixes an admin fills, and the outputs of
 * its own jobs), so no request can read another tenant's outputs or uploads.
 */

/** `:id` of any record: anything but a UUID is a 404 before a Redis key is built from it. */
export const IdParams = z.object({ id: z.string() });
const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/;
export const isId = (id: string) => UUID.test(id);

export const canSee = (p: Principal, owner: string) => p.role === 'admin' || p.tenant === owner;

/** Loads a record the caller may see, or throws the same 404 an unknown id gets. */
export async function loadVisible<T extends { client: string }>(p: Principal, id: string, what: string, get: (id: string) => Promise<T | null>, accept: (r: T) => boolean = () => true): Promise<T> {
  const found = isId(id) ? await get(id) : null;
  if (!found || !accept(found) || !canSee(p, found.client)) throw new KilnError('not_found', `no ${what} ${id}`);
  return found;
}

/** Where a tenant's own objects live in the bucket. */
export const tenantArea = (tenant: string) => `tenants/${tenant}/`;

const outsideArea = (field: string, p: Principal, shared: string[]) => {
  const message = `must be under ${tenantArea(p.tenant)}${shared.length ? ` or ${shared.join(', ')}` : ''} (your tenant's area of the bucket)`;
  return new KilnError('validation_failed', `invalid request: ${field}: ${message}`, { details: [{ field, rule: 'outside_tenant_area', message }] });
};

/**
 * Refuses an S3 key (or, with `prefix`, a listing prefix) outside the caller's reach: its
 * tenant area, the shared prefixes, or `outputs/<id>/` of one of its own jobs. Admins reach all.
 */
export async function assertReachable(ctx: ApiContext, p: Principal, key: string, field: string, opts: { prefix?: boolean } = {}): Promise<void> {
  if (p.role === 'admin') return;
  const shared = ctx.env.SHARED_S3_PREFIXES;
  if (key.startsWith(tenantArea(p.tenant)) || shared.some((s) => key.startsWith(s))) return;
  const own = /^outputs\/([0-9a-f-]{36})\/./.exec(key);
  if (own && !opts.prefix && isId(own[1]!)) {
    const job = await ctx.store.get(own[1]!);
    if (job && job.client === p.tenant) return;
  }
  throw outsideArea(field, p, shared);
}

/** Every input image a generation names by S3 key must be within the caller's reach. */
export async function assertImageKeysReachable(
  ctx: ApiContext,
  p: Principal,
  r: { image?: { init: { s3_key?: string }; mask?: { s3_key?: string } }; controlnets?: { image: { s3_key?: string } }[] },
  fieldPrefix = '',
): Promise<void> {
  const refs: [string, string | undefined][] = [
    ['image.init.s3_key', r.image?.init.s3_key],
    ['image.mask.s3_key', r.image?.mask?.s3_key],
    ...(r.controlnets ?? []).map((c, i): [string, string | undefined] => [`controlnets.${i}.image.s3_key`, c.image.s3_key]),
  ];
  for (const [field, key] of refs) if (key !== undefined) await assertReachable(ctx, p, key, `${fieldPrefix}${field}`);
}
