import { createHash } from 'node:crypto';
import { parseEnvOrThrow } from '@kiln/runtime';
import { describe, expect, it } from 'vitest';
import { ApiEnv } from './env.js';
import { KeyRing, OPEN_PRINCIPAL } from './keys.js';

const A = 'acme-key-0123456789abcdef';
const ADMIN = 'admin-key-0123456789abcdef';
const HASHED = 'hashed-key-0123456789abcdef';

function ring(extra: Record<string, unknown> = {}) {
  const env = parseEnvOrThrow(ApiEnv, { API_KEYS: `acme:${A}`, ADMIN_API_KEYS: `ops:${ADMIN}` });
  return KeyRing.from({ ...env, ...extra } as never);
}

describe('KeyRing', () => {
  it('knows each key by its tenant and role, and nothing else', () => {
    const r = ring();
    expect(r.open).toBe(false);
    expect(r.authenticate(A)).toMatchObject({ tenant: 'acme', role: 'client' });
    expect(r.authenticate(ADMIN)).toMatchObject({ tenant: 'ops', role: 'admin' });
    expect(r.authenticate(`${A} `)).toBeNull();
    expect(r.authenticate('')).toBeNull();
    expect(r.authenticate(A.toUpperCase())).toBeNull();
  });

  it('takes keys from the keys file by their sha-256 alone, with per-tenant limits over the defaults', () => {
    const file = { keys: [{ tenant: 'charlie', role: 'client' as const, sha256: createHash('sha256').update(HASHED).digest('hex') }], tenants: { charlie: { requests_per_minute: 7 } } };
    const r = ring({ API_KEYS_FILE: file, RATE_LIMIT_PER_MINUTE: 100, MAX_QUEUED_JOBS: 50 });
    expect(r.authenticate(HASHED)).toMatchObject({ tenant: 'charlie', role: 'client' });
    expect(r.limitsFor('charlie')).toEqual({ requests_per_minute: 7, max_queued_jobs: 50 });
    expect(r.limitsFor('acme')).toEqual({ requests_per_minute: 100, max_queued_jobs: 50 });
  });

  it('with no keys the farm is open, as one tenant', () => {
    const r = KeyRing.from(parseEnvOrThrow(ApiEnv, {}));
    expect(r.open).toBe(true);
    expect(OPEN_PRINCIPAL).toMatchObject({ tenant: 'default', role: 'admin' });
  });
});
