import { randomUUID } from 'node:crypto';
import { createRedis, Keys, type Redis } from '@kiln/runtime';
import { afterAll, afterEach, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { Lease } from './lease.js';

const REDIS_URL = process.env.REDIS_URL ?? 'redis://127.0.0.1:6379';
const TTL_MS = 300;

let redis: Redis;
let keys: Keys;

beforeAll(() => {
  redis = createRedis(REDIS_URL, 'lease-test');
});
afterAll(async () => {
  await redis.quit();
});
beforeEach(() => {
  keys = new Keys(`kiln-test-${randomUUID()}`);
});
afterEach(async () => {
  const left = await redis.keys(`${keys.prefix}:*`);
  if (left.length) await redis.del(...left);
});

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
const pair = () => [new Lease(redis, keys.dispatcherLease(), 'dispatcher-a', TTL_MS), new Lease(redis, keys.dispatcherLease(), 'dispatcher-b', TTL_MS)] as const;

describe('dispatcher lease', () => {
  it('is held by exactly one of two contenders', async () => {
    const [a, b] = pair();
    const results = await Promise.all([a.acquireOrRenew(), b.acquireOrRenew()]);
    expect(results.filter(Boolean)).toHaveLength(1);
    expect([a.held, b.held].filter(Boolean)).toHaveLength(1);
    const holder = a.held ? a : b;
    expect(await redis.get(keys.dispatcherLease())).toBe(holder.owner);
  });

  it('stays with its holder as long as it renews, even past the original TTL', async () => {
    const [a, b] = pair();
    expect(await a.acquireOrRenew()).toBe(true);
    for (let i = 0; i < 5; i++) {
      await sleep(TTL_MS / 3);
      expect(await a.acquireOrRenew()).toBe(true);
      expect(await b.acquireOrRenew()).toBe(false);
    }
    // 5 × TTL/3 > TTL: only renewal can have kept it
    expect(await redis.get(keys.dispatcherLease())).toBe('dispatcher-a');
    expect(await redis.pttl(keys.dispatcherLease())).toBeGreaterThan(0);
  });

  it('passes to the other contender once released', async () => {
    const [a, b] = pair();
    expect(await a.acquireOrRenew()).toBe(true);
    expect(await b.acquireOrRenew()).toBe(false);
    await a.release();
    expect(a.held).toBe(false);
    expect(await b.acquireOrRenew()).toBe(true);
    expect(await redis.get(keys.dispatcherLease())).toBe('dispatcher-b');
  });

  it('passes to the other contender when the holder stops renewing and the TTL lapses', async () => {
    const [a, b] = pair();
    expect(await a.acquireOrRenew()).toBe(true);
    expect(await b.acquireOrRenew()).toBe(false);
    await sleep(TTL_MS + 100);
    expect(await b.acquireOrRenew()).toBe(true);
    // the old holder learns on its next renewal that it lost the lease
    expect(await a.acquireOrRenew()).toBe(false);
    expect(a.held).toBe(false);
    expect(await redis.get(keys.dispatcherLease())).toBe('dispatcher-b');
  });

  it('a stale holder releasing does not drop the new holder’s lease', async () => {
    const [a, b] = pair();
    expect(await a.acquireOrRenew()).toBe(true);
    await sleep(TTL_MS + 100);
    expect(await b.acquireOrRenew()).toBe(true);
    await a.release(); // a still believes it holds the lease
    expect(await redis.get(keys.dispatcherLease())).toBe('dispatcher-b');
    expect(await b.acquireOrRenew()).toBe(true);
  });
});
