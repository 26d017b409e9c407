import { randomUUID } from 'node:crypto';
import type { AgentHeartbeat } from '@kiln/contracts';
import { AgentRegistry, createRedis, KilnError, Keys, type Redis } from '@kiln/runtime';
import { afterAll, afterEach, beforeAll, beforeEach, expect, it } from 'vitest';
import { againstLiveAgents } from './feasibility.js';

const REDIS_URL = process.env.REDIS_URL ?? 'redis://127.0.0.1:6379';
let redis: Redis;
let keys: Keys;
let registry: AgentRegistry;

beforeAll(() => {
  redis = createRedis(REDIS_URL, 'feasibility-test');
});
afterAll(async () => {
  await redis.quit();
});
beforeEach(() => {
  keys = new Keys(`kiln-test-${randomUUID()}`);
  registry = new AgentRegistry(redis, keys);
});
afterEach(async () => {
  const left = await redis.keys(`${keys.prefix}:*`);
  if (left.length) await redis.del(...left);
});

const beat = (id: string): AgentHeartbeat => {
  const now = new Date().toISOString();
  return {
    agent_id: id, host: 'h', gpu_id: '0', gpu: { name: 'g', vram_total_mb: 1, vram_free_mb: 1 }, state: 'ready', maintenance: false, resident: [],
    current_job: null, capabilities: null, worker: { pid: null, restarts: 0 }, jobs_done: 0, avg_job_ms: null, step_ms: {}, started_at: now, heartbeat_at: now,
  };
};

const needs = (id: string) => (live: AgentHeartbeat[]) => {
  if (!live.some((a) => a.agent_id === id)) throw new KilnError('unschedulable', `no ${id}`);
  return id;
};

it('a refusal on the cached view is confirmed against a fresh read: an agent that just came up is not missed', async () => {
  await registry.publish(beat('a1'), 10_000);
  expect(await againstLiveAgents(registry, needs('a1'))).toBe('a1');
  await registry.publish(beat('a2'), 10_000);
  // the cached view (read a moment ago) lacks a2; the check still passes
  expect((await registry.live({ maxAgeMs: 10_000 })).map((a) => a.agent_id)).toEqual(['a1']);
  expect(await againstLiveAgents(registry, needs('a2'))).toBe('a2');
  await expect(againstLiveAgents(registry, needs('a3'))).rejects.toThrow('no a3');
  // other errors are not retried
  let calls = 0;
  await expect(againstLiveAgents(registry, () => { calls += 1; throw new KilnError('validation_failed', 'bad'); })).rejects.toThrow('bad');
  expect(calls).toBe(1);
});
