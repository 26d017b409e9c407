import { hostname } from 'node:os';
import { resolve } from 'node:path';
import { EnvError, parseEnvOrThrow } from '@kiln/runtime';
import { describe, expect, it } from 'vitest';
import { AgentEnv } from './env.js';

const repoRoot = resolve(import.meta.dirname, '../../..');

function problemsOf(env: Record<string, string>): string[] {
  try {
    parseEnvOrThrow(AgentEnv, env);
  } catch (err) {
    expect(err).toBeInstanceOf(EnvError);
    return (err as EnvError).problems;
  }
  throw new Error(`expected ${JSON.stringify(env)} to be refused`);
}

describe('gpu-agent env', () => {
  it('starts with defaults from an empty environment, pointing at the repo worker', () => {
    const env = parseEnvOrThrow(AgentEnv, {});
    expect(env).toMatchObject({
      GPU_ID: '0',
      AGENT_ID: `${hostname()}-gpu0`,
      HEARTBEAT_MS: 1_000,
      WORKER_BACKEND: 'synthetic',
      WORKER_PYTHON: resolve(repoRoot, 'workers-py/.venv/bin/python'),
      WORKER_DIR: resolve(repoRoot, 'workers-py'),
      WORKER_START_TIMEOUT_MS: 120_000,
      WORK_DIR: resolve(repoRoot, '.kiln/work'),
      CANCEL_GRACE_MS: 2_000,
      PIPELINE_DEPTH: 2,
      TRANSFER_RETRY_MS: 60_000,
      INFRA_RETRY_DEADLINE_S: 900,
      MAX_ATTEMPTS: 3,
      REDIS_URL: 'redis://127.0.0.1:6379',
      WEBHOOK_ALLOW_PRIVATE: false,
    });
    expect(env.WORKER_COMMAND).toBeUndefined();
  });

  it('names the agent after the host and GPU unless AGENT_ID is given', () => {
    expect(parseEnvOrThrow(AgentEnv, { GPU_ID: '3' }).AGENT_ID).toBe(`${hostname()}-gpu3`);
    expect(parseEnvOrThrow(AgentEnv, { GPU_ID: '3', AGENT_ID: 'rack2.node-7_a' }).AGENT_ID).toBe('rack2.node-7_a');
  });

  it('accepts only digits for GPU_ID', () => {
    expect(parseEnvOrThrow(AgentEnv, { GPU_ID: '12' }).GPU_ID).toBe('12');
    for (const bad of ['gpu0', '-1', '0,1', 'cuda:0']) {
      expect(problemsOf({ GPU_ID: bad })).toEqual([expect.stringMatching(/^GPU_ID: must be a GPU index/)]);
    }
  });

  it('refuses an AGENT_ID with characters that would break queue names', () => {
    expect(problemsOf({ AGENT_ID: 'my agent/1' })).toEqual([expect.stringMatching(/^AGENT_ID:/)]);
  });

  it('reads how long storage is retried in place and how long infrastructure failures are retried at all', () => {
    expect(parseEnvOrThrow(AgentEnv, { TRANSFER_RETRY_MS: '0', INFRA_RETRY_DEADLINE_S: '60' })).toMatchObject({ TRANSFER_RETRY_MS: 0, INFRA_RETRY_DEADLINE_S: 60 });
    expect(problemsOf({ TRANSFER_RETRY_MS: '-1', INFRA_RETRY_DEADLINE_S: '0' }).map((p) => p.split(':')[0]).sort()).toEqual(['INFRA_RETRY_DEADLINE_S', 'TRANSFER_RETRY_MS']);
    expect(problemsOf({ INFRA_RETRY_DEADLINE_S: '15m' })).toEqual([expect.stringMatching(/^INFRA_RETRY_DEADLINE_S:/)]);
  });

  it('reads PIPELINE_DEPTH: 1 (no pipeline) to 8', () => {
    expect(parseEnvOrThrow(AgentEnv, { PIPELINE_DEPTH: '1' }).PIPELINE_DEPTH).toBe(1);
    for (const bad of ['0', '9', '1.5', 'two']) expect(problemsOf({ PIPELINE_DEPTH: bad })).toEqual([expect.stringMatching(/^PIPELINE_DEPTH:/)]);
  });

  it('reads WORKER_COMMAND as a JSON array of strings', () => {
    const env = parseEnvOrThrow(AgentEnv, { WORKER_COMMAND: '["/usr/bin/python3", "fixture.py", "--flag"]' });
    expect(env.WORKER_COMMAND).toEqual(['/usr/bin/python3', 'fixture.py', '--flag']);
  });

  it.each(['python3 fixture.py', '[]', '[1, 2]', '{"file": "python3"}', '"python3"'])('refuses WORKER_COMMAND=%s', (raw) => {
    expect(problemsOf({ WORKER_COMMAND: raw })).toEqual([expect.stringMatching(/^WORKER_COMMAND: must be a JSON array of strings/)]);
  });

  it('lists every bad variable at once', () => {
    const problems = problemsOf({
      REDIS_URL: 'localhost:6379',
      GPU_ID: 'first',
      WORKER_COMMAND: 'python -m kiln_worker',
      WORKER_BACKEND: 'tensorrt',
      HEARTBEAT_MS: '10',
      S3_BUCKET: 'Bad_Bucket',
    });
    expect(problems.map((p) => p.split(':')[0]).sort()).toEqual(['GPU_ID', 'HEARTBEAT_MS', 'REDIS_URL', 'S3_BUCKET', 'WORKER_BACKEND', 'WORKER_COMMAND']);
  });

  it.each([
    ['true', true],
    ['1', true],
    ['false', false],
    ['0', false],
  ])('reads WEBHOOK_ALLOW_PRIVATE=%s as %s', (raw, expected) => {
    expect(parseEnvOrThrow(AgentEnv, { WEBHOOK_ALLOW_PRIVATE: raw }).WEBHOOK_ALLOW_PRIVATE).toBe(expected);
  });

  it('refuses a WEBHOOK_ALLOW_PRIVATE that is not a boolean word', () => {
    expect(problemsOf({ WEBHOOK_ALLOW_PRIVATE: 'TRUE!' })).toEqual([expect.stringMatching(/^WEBHOOK_ALLOW_PRIVATE:/)]);
  });
});
