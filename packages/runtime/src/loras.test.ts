import { randomUUID } from 'node:crypto';
import { afterAll, afterEach, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { Keys } from './keys.js';
import { LoraRegistry, loraFileName, qualifiedLoraName } from './loras.js';
import { createRedis, type Redis } from './redis.js';

const REDIS_URL = process.env.REDIS_URL ?? 'redis://127.0.0.1:6379';
let redis: Redis;
let keys: Keys;
let loras: LoraRegistry;

beforeAll(() => {
  redis = createRedis(REDIS_URL, 'loras-test');
});
afterAll(() => redis.quit());
beforeEach(() => {
  keys = new Keys(`kiln-test-${randomUUID()}`);
  loras = new LoraRegistry(redis, keys);
});
afterEach(async () => {
  const left = await redis.keys(`${keys.prefix}:*`);
  if (left.length) await redis.del(...left);
});

const lora = (name: string, job: string) => ({ name, tenant: 'acme', key: `loras/${job}.safetensors`, sha256: 'a'.repeat(64), bytes: 10, base_model: 'b', rank: 4, job_id: job, created_at: new Date().toISOString() });
const setStatus = (job: string, status: string, attempt = 1) => redis.hset(keys.job(job), 'status', JSON.stringify(status), 'attempt', JSON.stringify(attempt));

describe('LoraRegistry', () => {
  it('reserves a name once: a second training of the same name is refused while the first lives', async () => {
    const [j1, j2] = [randomUUID(), randomUUID()];
    expect(await loras.reserve('acme/style', 'acme', j1)).toBe(true);
    expect(await loras.reserve('acme/style', 'acme', j2)).toBe(false); // j1 is still being submitted
    await setStatus(j1, 'running');
    expect(await loras.reserve('acme/style', 'acme', j2)).toBe(false);
    expect(await loras.get('acme/style')).toBeNull(); // a reservation is not a usable LoRA
    expect(await loras.list()).toEqual([]);
  });

  it('a reservation whose training failed or was canceled can be taken by a new training', async () => {
    const [j1, j2] = [randomUUID(), randomUUID()];
    await loras.reserve('acme/style', 'acme', j1);
    await setStatus(j1, 'failed');
    expect(await loras.reserve('acme/style', 'acme', j2)).toBe(true);
    // the first training cannot register over the second's reservation
    expect(await loras.register(lora('acme/style', j1), 1)).toBe(false);
    await setStatus(j2, 'running', 2);
    // an attempt that lost the job (attempt 1 of a job now on attempt 2) registers nothing
    expect(await loras.register(lora('acme/style', j2), 1)).toBe(false);
    expect(await loras.register(lora('acme/style', j2), 2)).toBe(true);
    expect((await loras.get('acme/style'))?.job_id).toBe(j2);
    expect(await loras.reserve('acme/style', 'acme', randomUUID())).toBe(false); // registered: taken for good
  });

  it('shares a registered LoRA; refuses to share a reservation or an unknown name', async () => {
    const j = randomUUID();
    await loras.reserve('acme/style', 'acme', j);
    expect(await loras.share('acme/style', true)).toBeNull();
    await setStatus(j, 'running');
    expect(await loras.register(lora('acme/style', j), 1)).toBe(true);
    expect((await loras.share('acme/style', true))?.shared).toBe(true);
    expect((await loras.share('acme/style', false))?.shared).toBe(false);
    expect(await loras.share('acme/none', true)).toBeNull();
  });

  it('qualified names and file names never collide for distinct names', () => {
    const names = ['a/b', 'a--b', 'a-b', 't/a/b', 't/a--b', 't--a/b'].map((n) => qualifiedLoraName('acme', n));
    const files = names.map(loraFileName);
    expect(new Set(files).size).toBe(names.length);
    expect(files.every((f) => !f.includes('/'))).toBe(true);
  });
});
