import { createHash, timingSafeEqual } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { z } from 'zod';

/**
 * Who may call the API. Every key belongs to a tenant and has a role:
 * - `client`: sees and acts on its own tenant's jobs, batches, trainings, cache requests,
 *   uploads and LoRAs only;
 * - `admin`: sees and acts on everything, and alone may use Bull Board, load, pin or evict
 *   models, and share a LoRA.
 * Keys come from API_KEYS (`tenant:key` client keys), ADMIN_API_KEYS (`name:key` admin keys) and
 * API_KEYS_FILE (JSON; may hold sha-256 hashes instead of keys, and per-tenant limits). Only
 * digests are kept in memory; a key is compared in constant time.
 */

export type Role = 'client' | 'admin';

export interface Principal {
  tenant: string;
  role: Role;
  /** names the key in logs without revealing it */
  key_id: string;
}

export interface TenantLimits {
  requests_per_minute: number;
  max_queued_jobs: number;
}

/** The one tenant of a farm without keys: it is open, and every caller acts as an admin. */
export const OPEN_PRINCIPAL: Principal = { tenant: 'default', role: 'admin', key_id: 'open' };

/** Tenant names end up in S3 keys, Redis keys and LoRA names: a conservative alphabet. */
export const TenantName = z.string().regex(/^[a-z0-9][a-z0-9_-]{0,62}$/, 'a tenant name is 1-63 of a-z, 0-9, "_" and "-", starting with a letter or digit');
const Secret = z.string().min(16, 'each API key must be at least 16 characters').max(512).regex(/^[\x21-\x7e]+$/, 'an API key is printable ASCII without spaces');
const Sha256Hex = z.string().regex(/^[0-9a-f]{64}$/, 'sha256 is 64 lowercase hex digits');

const sha256 = (s: string) => createHash('sha256').update(s).digest();
/** The tenant a bare key stands for: named from a hash of it, so the name reveals nothing. */
export const tenantOfBareKey = (key: string) => `t-${sha256(key).toString('hex').slice(0, 12)}`;

export interface KeyEntry {
  digest: Buffer;
  principal: Principal;
}

/** `a:b,c` → entries; the part before the first ":" names the tenant (or admin), else a hash of the key does. */
export const KeyList = (role: Role) =>
  z
    .string()
    .transform((s) => s.split(',').map((k) => k.trim()).filter(Boolean))
    .pipe(
      z.array(
        z.string().transform((entry, ctx) => {
          const colon = entry.indexOf(':');
          const name = colon > 0 ? entry.slice(0, colon) : null;
          const key = colon > 0 ? entry.slice(colon + 1) : entry;
          const n = name === null ? { success: true as const, data: tenantOfBareKey(key) } : TenantName.safeParse(name);
          const k = Secret.safeParse(key);
          if (!n.success) ctx.addIssue({ code: 'custom', message: n.error.issues[0]!.message });
          if (!k.success) ctx.addIssue({ code: 'custom', message: k.error.issues[0]!.message });
          if (!n.success || !k.success) return z.NEVER;
          return { digest: sha256(key), principal: { tenant: n.data, role, key_id: `${n.data}/${sha256(key).toString('hex').slice(0, 8)}` } } satisfies KeyEntry;
        }),
      ),
    );

const Limits = z.strictObject({
  requests_per_minute: z.number().int().min(1).optional(),
  max_queued_jobs: z.number().int().min(1).optional(),
});

/** API_KEYS_FILE: keys (or their sha-256) with tenant and role, and per-tenant limits. */
export const KeysFile = z.strictObject({
  keys: z
    .array(
      z
        .strictObject({
          tenant: TenantName.describe('the tenant (for an admin key: its name)'),
          role: z.enum(['client', 'admin']).default('client'),
          key: Secret.optional(),
          sha256: Sha256Hex.optional().describe('hex sha-256 of the key, so the file holds no secret'),
        })
        .refine((k) => (k.key === undefined) !== (k.sha256 === undefined), { message: 'give exactly one of key or sha256' }),
    )
    .default([]),
  tenants: z.record(TenantName, Limits).default({}),
});
export type KeysFile = z.infer<typeof KeysFile>;

/** Reads and checks API_KEYS_FILE at start; a problem is a configuration error naming it. */
export const KeysFilePath = z.string().transform((path, ctx) => {
  let raw: unknown;
  try {
    raw = JSON.parse(readFileSync(path, 'utf8'));
  } catch (err) {
    ctx.addIssue({ code: 'custom', message: `cannot read ${path} as JSON (${err instanceof Error ? err.message : String(err)})` });
    return z.NEVER;
  }
  const parsed = KeysFile.safeParse(raw);
  if (!parsed.success) {
    for (const i of parsed.error.issues) ctx.addIssue({ code: 'custom', message: `${path}: ${i.path.join('.') || '(file)'}: ${i.message}` });
    return z.NEVER;
  }
  return parsed.data;
});

export class KeyRing {
  constructor(
    private readonly entries: KeyEntry[],
    private readonly limits: Record<string, Partial<TenantLimits>>,
    private readonly defaults: TenantLimits,
  ) {}

  static from(env: { API_KEYS: KeyEntry[]; ADMIN_API_KEYS: KeyEntry[]; API_KEYS_FILE?: KeysFile; RATE_LIMIT_PER_MINUTE: number; MAX_QUEUED_JOBS: number }): KeyRing {
    const file = env.API_KEYS_FILE;
    const fromFile: KeyEntry[] = (file?.keys ?? []).map((k) => {
      const digest = k.sha256 ? Buffer.from(k.sha256, 'hex') : sha256(k.key!);
      return { digest, principal: { tenant: k.tenant, role: k.role, key_id: `${k.tenant}/${digest.toString('hex').slice(0, 8)}` } };
    });
    return new KeyRing([...env.API_KEYS, ...env.ADMIN_API_KEYS, ...fromFile], file?.tenants ?? {}, {
      requests_per_minute: env.RATE_LIMIT_PER_MINUTE,
      max_queued_jobs: env.MAX_QUEUED_JOBS,
    });
  }

  /** No keys configured: the farm is open (local development). */
  get open(): boolean {
    return this.entries.length === 0;
  }

  get size(): number {
    return this.entries.length;
  }

  /** The principal a presented key stands for, or null. Every entry is compared, in constant time. */
  authenticate(secret: string): Principal | null {
    const d = sha256(secret);
    let found: Principal | null = null;
    for (const e of this.entries) if (timingSafeEqual(e.digest, d) && !found) found = e.principal;
    return found;
  }

  limitsFor(tenant: string): TenantLimits {
    return { ...this.defaults, ...this.limits[tenant] };
  }
}
