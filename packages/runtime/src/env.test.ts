import { describe, expect, it } from 'vitest';
import { EnvError, JobEnv, parseEnvOrThrow, retentionByKind } from './env.js';

describe('JobEnv retention', () => {
  it('keeps JOB_RETENTION_S for every kind unless a kind has its own', () => {
    const env = parseEnvOrThrow(JobEnv, {});
    expect(env.JOB_RETENTION_S).toBe(7 * 24 * 3600);
    expect(retentionByKind(env)).toEqual({});
    const set = parseEnvOrThrow(JobEnv, { JOB_RETENTION_S: '86400', JOB_RETENTION_S_GENERATION: '3600', JOB_RETENTION_S_TRAINING: '2592000' });
    expect(retentionByKind(set)).toEqual({ generation: 3600, training: 2_592_000 });
  });

  it('names each bad per-kind retention', () => {
    expect(() => parseEnvOrThrow(JobEnv, { JOB_RETENTION_S_CACHE: '59' })).toThrow(EnvError);
    expect(() => parseEnvOrThrow(JobEnv, { JOB_RETENTION_S_CACHE: '59', JOB_RETENTION_S_SELF_TEST: 'a week' })).toThrow(/JOB_RETENTION_S_CACHE[\s\S]*JOB_RETENTION_S_SELF_TEST|JOB_RETENTION_S_SELF_TEST[\s\S]*JOB_RETENTION_S_CACHE/);
  });
});
