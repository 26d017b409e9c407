import { randomUUID } from 'node:crypto';
import type { AgentHeartbeat } from '@kiln/contracts';
import { afterAll, afterEach, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { Keys } from './keys.js';
import { createRedis, type Redis } from './redis.js';
import { AgentRegistry } from './registry.js';
import { heartbeat as beat } from '../../../tests/support/heartbeat.js';
import { commandsDuring as commandsOn } from '../../../tests/support/redis-fixture.js';

const REDIS_URL = process.env.REDIS_URL ?? 'redis://127.0.0.1:6379';

let redis: Redis;
let keys: Keys;
let registry: AgentRegistry;

beforeAll(() => {
  redis = createRedis(REDIS_URL, 'registry-test');
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

/** A heartbeat of an agent whose worker has not said what it can do yet (`over` replaces any field). */
const heartbeat = (id: string, over: Partial<AgentHeartbeat> = {}): AgentHeartbeat => beat(id, { capabilities: null, worker: { pid: null, restarts: 0 }, ...over });

/** Counts the commands this test's connection sends while `fn` runs. */
const commandsDuring = async (fn: () => Promise<unknown>) => (await commandsOn(redis, fn)).length;

describe('AgentRegistry snapshot', () => {
  it('serves submits from a snapshot at most maxAgeMs old, then reads again', async () => {
    await registry.publish(heartbeat('a1'), 10_000);
    expect((await registry.live({ maxAgeMs: 250 })).map((a) => a.agent_id)).toEqual(['a1']);
    // a new agent within the window is not seen, and no command is sent for the read
    await registry.publish(heartbeat('a2'), 10_000);
    const sent = await commandsDuring(async () => {
      for (let i = 0; i < 50; i++) expect((await registry.live({ maxAgeMs: 250 })).map((a) => a.agent_id)).toEqual(['a1']);
    });
    expect(sent).toBe(0);
    // a fresh read sees it at once, and refreshes what the cached path serves
    expect((await registry.live()).map((a) => a.agent_id)).toEqual(['a1', 'a2']);
    expect((await registry.live({ maxAgeMs: 250 })).map((a) => a.agent_id)).toEqual(['a1', 'a2']);
    // and past the window the cached path reads again by itself
    await registry.publish(heartbeat('a3'), 10_000);
    await new Promise((r) => setTimeout(r, 300));
    expect((await registry.live({ maxAgeMs: 250 })).map((a) => a.agent_id)).toEqual(['a1', 'a2', 'a3']);
  });

  it('concurrent cached readers share one read', async () => {
    await registry.publish(heartbeat('a1'), 10_000);
    const sent = await commandsDuring(() => Promise.all(Array.from({ length: 20 }, () => registry.live({ maxAgeMs: 250 }))));
    expect(sent).toBe(3); // SMEMBERS agents, MGET heartbeats, SMEMBERS maintenance
  });

  it('a drain made by this process shows at once, even on the cached path', async () => {
    await registry.publish(heartbeat('a1'), 10_000);
    expect((await registry.live({ maxAgeMs: 10_000 }))[0]!.state).toBe('ready');
    await registry.setMaintenance('a1', true);
    expect((await registry.live({ maxAgeMs: 10_000 }))[0]).toMatchObject({ state: 'draining', maintenance: true });
    await registry.setMaintenance('a1', false);
    expect((await registry.live({ maxAgeMs: 10_000 }))[0]!.state).toBe('ready');
  });

  it('reports lapsed agents and picks up a changed heartbeat', async () => {
    await registry.publish(heartbeat('a1'), 10_000);
    await registry.publish(heartbeat('a2'), 10_000);
    await redis.del(keys.agent('a2'));
    expect(await registry.snapshot()).toMatchObject({ live: [{ agent_id: 'a1', state: 'ready' }], lapsed: ['a2'] });
    await registry.publish(heartbeat('a1', { state: 'busy', current_job: 'j1' }), 10_000);
    expect((await registry.live())[0]).toMatchObject({ state: 'busy', current_job: 'j1' });
  });

  it("validates a heartbeat's capabilities again only when they change (they are most of it), and every other field on every beat", async () => {
    await registry.publish(beat('a1'), 10_000);
    const first = (await registry.live())[0]!;
    await registry.publish(beat('a1', { jobs_done: 7, state: 'busy', current_job: 'j1' }), 10_000);
    const second = (await registry.live())[0]!;
    expect(second).toMatchObject({ jobs_done: 7, state: 'busy', current_job: 'j1' });
    expect(second.capabilities).toBe(first.capabilities); // the same parse, kept
    expect(Object.keys(second)).toEqual(Object.keys(first)); // the record reads as before, field for field
    // a restarted worker with other models: read and validated afresh
    const caps = { ...first.capabilities!, models: [{ name: 'other/model', kind: 'base' as const, vram_mb: 5_000, load_ms: 100 }] };
    await registry.publish(beat('a1', { capabilities: caps }), 10_000);
    const third = (await registry.live())[0]!;
    expect(third.capabilities).not.toBe(first.capabilities);
    expect(third.capabilities!.models.map((m) => m.name)).toEqual(['other/model']);
    // and capabilities that break the contract are refused, as before
    await redis.set(keys.agent('a1'), JSON.stringify({ ...beat('a1'), capabilities: { ...caps, max_side: 'big' } }));
    await expect(registry.live()).rejects.toThrow();
  });
});
