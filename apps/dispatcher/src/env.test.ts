import { EnvError, parseEnvOrThrow } from '@kiln/runtime';
import { describe, expect, it } from 'vitest';
import { DispatcherEnv } from './env.js';

function problemsOf(env: Record<string, string>): string[] {
  try {
    parseEnvOrThrow(DispatcherEnv, env);
  } catch (err) {
    expect(err).toBeInstanceOf(EnvError);
    return (err as EnvError).problems;
  }
  throw new Error(`expected ${JSON.stringify(env)} to be refused`);
}

describe('dispatcher env', () => {
  it('starts with defaults from an empty environment', () => {
    expect(parseEnvOrThrow(DispatcherEnv, {})).toMatchObject({
      REDIS_URL: 'redis://127.0.0.1:6379',
      KILN_PREFIX: 'kiln',
      DISPATCH_INTERVAL_MS: 500,
      LEASE_TTL_MS: 5_000,
      SWEEP_INTERVAL_MS: 5_000,
      UNSCHEDULABLE_GRACE_MS: 60_000,
      AGING_MS: 60_000,
      INTAKE_WINDOW: 500,
      PLAN_SLICE_MS: 10,
      TICK_COALESCE_MAX_MS: 25,
      AGENT_SLOTS: 2,
      WEBHOOK_CONCURRENCY: 16,
      WEBHOOK_ALLOW_PRIVATE: false,
      WEBHOOK_MAX_ATTEMPTS: 8,
      MAX_ATTEMPTS: 3,
      AGENT_TTL_MS: 5_000,
    });
  });

  it('reads numbers from strings', () => {
    expect(parseEnvOrThrow(DispatcherEnv, { AGENT_SLOTS: '4', AGING_MS: '1000', LEASE_TTL_MS: '500' })).toMatchObject({
      AGENT_SLOTS: 4,
      AGING_MS: 1_000,
      LEASE_TTL_MS: 500,
    });
  });

  it('lists every bad variable at once', () => {
    const problems = problemsOf({
      REDIS_URL: 'not a url',
      KILN_PREFIX: 'kiln farm',
      LEASE_TTL_MS: '100',
      AGENT_SLOTS: '9',
      AGING_MS: 'soon',
      LOG_LEVEL: 'loud',
    });
    expect(problems.map((p) => p.split(':')[0]).sort()).toEqual(['AGENT_SLOTS', 'AGING_MS', 'KILN_PREFIX', 'LEASE_TTL_MS', 'LOG_LEVEL', 'REDIS_URL']);
    expect(problems.find((p) => p.startsWith('REDIS_URL:'))).toContain('redis://');
  });

  it('accepts rediss:// and refuses other schemes for REDIS_URL', () => {
    expect(parseEnvOrThrow(DispatcherEnv, { REDIS_URL: 'rediss://user:pw@redis.internal:6380/2' }).REDIS_URL).toBe('rediss://user:pw@redis.internal:6380/2');
    expect(problemsOf({ REDIS_URL: 'https://redis.internal' })).toEqual([expect.stringMatching(/^REDIS_URL: must be a redis:\/\/ or rediss:\/\/ URL/)]);
  });

  it('accepts a Redis Cluster hash-tag prefix', () => {
    expect(parseEnvOrThrow(DispatcherEnv, { KILN_PREFIX: '{kiln}' }).KILN_PREFIX).toBe('{kiln}');
  });

  it.each([
    ['true', true],
    ['1', true],
    ['false', false],
    ['0', false],
  ])('reads WEBHOOK_ALLOW_PRIVATE=%s as %s', (raw, expected) => {
    expect(parseEnvOrThrow(DispatcherEnv, { WEBHOOK_ALLOW_PRIVATE: raw }).WEBHOOK_ALLOW_PRIVATE).toBe(expected);
  });

  it('refuses a WEBHOOK_SECRET that is not whsec_ + base64', () => {
    expect(problemsOf({ WEBHOOK_SECRET: 'whsec_' })).toEqual([expect.stringMatching(/^WEBHOOK_SECRET:/)]);
    expect(parseEnvOrThrow(DispatcherEnv, { WEBHOOK_SECRET: 'whsec_C2FtcGxlLXNlY3JldC1rZXk=' }).WEBHOOK_SECRET).toBe('whsec_C2FtcGxlLXNlY3JldC1rZXk=');
  });
});
