import { mkdtempSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { EnvError, parseEnvOrThrow } from '@kiln/runtime';
import { describe, expect, it } from 'vitest';
import { ApiEnv } from './env.js';

function problemsOf(env: Record<string, string>): string[] {
  try {
    parseEnvOrThrow(ApiEnv, env);
  } catch (err) {
    expect(err).toBeInstanceOf(EnvError);
    return (err as EnvError).problems;
  }
  throw new Error(`expected ${JSON.stringify(env)} to be refused`);
}

const GOOD_KEY = 'k_0123456789abcdef';

describe('API env', () => {
  it('starts with defaults from an empty environment', () => {
    const env = parseEnvOrThrow(ApiEnv, {});
    expect(env).toMatchObject({
      REDIS_URL: 'redis://127.0.0.1:6379',
      KILN_PREFIX: 'kiln',
      HOST: '127.0.0.1',
      PORT: 8080,
      API_KEYS: [],
      BODY_LIMIT_BYTES: 50_331_648, // 48 MiB: room for a few base64 input images
      INPUT_ALLOW_PRIVATE: false,
      INPUT_FETCH_TIMEOUT_MS: 15_000,
      WEBHOOK_ALLOW_PRIVATE: false,
      MAX_ATTEMPTS: 3,
      S3_BUCKET: 'kiln',
    });
    expect(env.WEBHOOK_SECRET).toBeUndefined();
  });

  it('treats an empty variable as unset', () => {
    expect(parseEnvOrThrow(ApiEnv, { PORT: '', API_KEYS: '' })).toMatchObject({ PORT: 8080, API_KEYS: [] });
  });

  it('lists every bad variable at once', () => {
    const problems = problemsOf({
      REDIS_URL: 'http://127.0.0.1:6379',
      PORT: '70000',
      API_KEYS: `${GOOD_KEY},short`,
      WEBHOOK_SECRET: 'hunter2',
    });
    expect(problems).toHaveLength(4);
    expect(problems.find((p) => p.startsWith('REDIS_URL:'))).toContain('redis://');
    expect(problems.find((p) => p.startsWith('PORT:'))).toBeDefined();
    expect(problems.find((p) => p.startsWith('API_KEYS'))).toContain('at least 16 characters');
    expect(problems.find((p) => p.startsWith('WEBHOOK_SECRET:'))).toContain('whsec_');
  });

  it('the EnvError message names each variable for the operator', () => {
    expect(() => parseEnvOrThrow(ApiEnv, { PORT: 'eighty', BODY_LIMIT_BYTES: '10' })).toThrow(/PORT[\s\S]*BODY_LIMIT_BYTES|BODY_LIMIT_BYTES[\s\S]*PORT/);
  });

  it('splits API_KEYS on commas into tenant:key entries; a bare key is a tenant named from its hash', () => {
    const env = parseEnvOrThrow(ApiEnv, { API_KEYS: ` acme:${GOOD_KEY} ,, k_fedcba9876543210 ,`, ADMIN_API_KEYS: `ops:${'a'.repeat(20)}` });
    expect(env.API_KEYS.map((k) => k.principal)).toEqual([
      { tenant: 'acme', role: 'client', key_id: expect.stringMatching(/^acme\//) },
      { tenant: expect.stringMatching(/^t-[0-9a-f]{12}$/), role: 'client', key_id: expect.any(String) },
    ]);
    expect(env.ADMIN_API_KEYS.map((k) => k.principal)).toEqual([{ tenant: 'ops', role: 'admin', key_id: expect.stringMatching(/^ops\//) }]);
    // only digests are kept: the key itself appears nowhere in the parsed config
    expect(JSON.stringify(env)).not.toContain(GOOD_KEY);
  });

  it('refuses an API key shorter than 16 characters, even beside a good one, and a bad tenant name', () => {
    expect(parseEnvOrThrow(ApiEnv, { API_KEYS: 'x'.repeat(16) }).API_KEYS).toHaveLength(1);
    expect(problemsOf({ API_KEYS: `${GOOD_KEY},${'x'.repeat(15)}` })).toEqual([expect.stringMatching(/^API_KEYS\.1: each API key must be at least 16 characters/)]);
    expect(problemsOf({ API_KEYS: `Bad Tenant:${GOOD_KEY}` })).toEqual([expect.stringMatching(/^API_KEYS\.0: a tenant name is/)]);
    expect(problemsOf({ ADMIN_API_KEYS: `ops:short` })).toEqual([expect.stringMatching(/^ADMIN_API_KEYS\.0: each API key must be at least 16/)]);
  });

  it('reads API_KEYS_FILE at start and names the file and the entry when it is wrong', () => {
    const dir = mkdtempSync(join(tmpdir(), 'kiln-keys-'));
    const good = join(dir, 'keys.json');
    writeFileSync(good, JSON.stringify({ keys: [{ tenant: 'acme', sha256: 'a'.repeat(64) }, { tenant: 'ops', role: 'admin', key: GOOD_KEY }], tenants: { acme: { requests_per_minute: 10 } } }));
    expect(parseEnvOrThrow(ApiEnv, { API_KEYS_FILE: good }).API_KEYS_FILE).toMatchObject({ keys: [{ tenant: 'acme', role: 'client' }, { tenant: 'ops', role: 'admin' }], tenants: { acme: { requests_per_minute: 10 } } });
    const bad = join(dir, 'bad.json');
    writeFileSync(bad, JSON.stringify({ keys: [{ tenant: 'acme', sha256: 'xyz' }, { tenant: 'b', key: GOOD_KEY, sha256: 'a'.repeat(64) }] }));
    const problems = problemsOf({ API_KEYS_FILE: bad });
    expect(problems).toEqual([expect.stringContaining('keys.0.sha256: sha256 is 64 lowercase hex digits'), expect.stringContaining('keys.1: give exactly one of key or sha256')]);
    expect(problems[0]).toMatch(/^API_KEYS_FILE: /);
    expect(problemsOf({ API_KEYS_FILE: join(dir, 'missing.json') })).toEqual([expect.stringMatching(/^API_KEYS_FILE: cannot read/)]);
  });

  it('accepts a WEBHOOK_SECRET that looks like whsec_ + base64 and refuses others', () => {
    const secret = 'whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw';
    expect(parseEnvOrThrow(ApiEnv, { WEBHOOK_SECRET: secret }).WEBHOOK_SECRET).toBe(secret);
    for (const bad of ['MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw', 'whsec_short', 'whsec_not base64 at all!!!!']) {
      expect(problemsOf({ WEBHOOK_SECRET: bad })).toEqual([expect.stringMatching(/^WEBHOOK_SECRET: must be "whsec_"/)]);
    }
  });

  it.each([
    ['true', true],
    ['1', true],
    ['false', false],
    ['0', false],
  ])('reads WEBHOOK_ALLOW_PRIVATE=%s as %s', (raw, expected) => {
    expect(parseEnvOrThrow(ApiEnv, { WEBHOOK_ALLOW_PRIVATE: raw }).WEBHOOK_ALLOW_PRIVATE).toBe(expected);
  });

  it('refuses a WEBHOOK_ALLOW_PRIVATE that is not a boolean word', () => {
    expect(problemsOf({ WEBHOOK_ALLOW_PRIVATE: 'maybe' })).toEqual([expect.stringMatching(/^WEBHOOK_ALLOW_PRIVATE:/)]);
  });

  it('reads INPUT_ALLOW_PRIVATE as a boolean word and refuses others', () => {
    expect(parseEnvOrThrow(ApiEnv, { INPUT_ALLOW_PRIVATE: 'true' }).INPUT_ALLOW_PRIVATE).toBe(true);
    expect(parseEnvOrThrow(ApiEnv, { INPUT_ALLOW_PRIVATE: '0' }).INPUT_ALLOW_PRIVATE).toBe(false);
    expect(problemsOf({ INPUT_ALLOW_PRIVATE: 'maybe' })).toEqual([expect.stringMatching(/^INPUT_ALLOW_PRIVATE:/)]);
  });

  it('coerces numbers and enforces their ranges', () => {
    expect(parseEnvOrThrow(ApiEnv, { PORT: '0', MAX_ATTEMPTS: '5', INPUT_FETCH_TIMEOUT_MS: '100' })).toMatchObject({ PORT: 0, MAX_ATTEMPTS: 5, INPUT_FETCH_TIMEOUT_MS: 100 });
    const problems = problemsOf({ PORT: '-1', MAX_ATTEMPTS: '21', JOB_RETENTION_S: '59', IDEMPOTENCY_TTL_S: '1.5', INPUT_FETCH_TIMEOUT_MS: '99' });
    expect(problems.map((p) => p.split(':')[0]).sort()).toEqual(['IDEMPOTENCY_TTL_S', 'INPUT_FETCH_TIMEOUT_MS', 'JOB_RETENTION_S', 'MAX_ATTEMPTS', 'PORT']);
  });

  it('sets HTTP timeouts by default, so a slow client cannot hold a connection, and refuses nonsense', () => {
    expect(parseEnvOrThrow(ApiEnv, {})).toMatchObject({
      HTTP_REQUEST_TIMEOUT_MS: 60_000,
      HTTP_HEADERS_TIMEOUT_MS: 10_000,
      HTTP_CONNECTION_TIMEOUT_MS: 120_000,
      HTTP_KEEP_ALIVE_TIMEOUT_MS: 72_000,
    });
    expect(parseEnvOrThrow(ApiEnv, { HTTP_REQUEST_TIMEOUT_MS: '1500', HTTP_HEADERS_TIMEOUT_MS: '1000' })).toMatchObject({ HTTP_REQUEST_TIMEOUT_MS: 1500, HTTP_HEADERS_TIMEOUT_MS: 1000 });
    const problems = problemsOf({ HTTP_REQUEST_TIMEOUT_MS: '0', HTTP_HEADERS_TIMEOUT_MS: 'soon', HTTP_CONNECTION_TIMEOUT_MS: '-1', HTTP_KEEP_ALIVE_TIMEOUT_MS: '1.5' });
    expect(problems.map((p) => p.split(':')[0]).sort()).toEqual(['HTTP_CONNECTION_TIMEOUT_MS', 'HTTP_HEADERS_TIMEOUT_MS', 'HTTP_KEEP_ALIVE_TIMEOUT_MS', 'HTTP_REQUEST_TIMEOUT_MS']);
  });
});
