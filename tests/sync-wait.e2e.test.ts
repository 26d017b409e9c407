import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { basicRequest, Farm } from './support/farm.js';
import { OpenApiChecker } from './support/openapi.js';

/**
 * Prefer: wait on POST /v1/generations (Replicate's convention): the finished record when the job
 * ends in time (200), otherwise 202 with the current one once the wait is over; at most 60 s.
 */
describe('Prefer: wait', () => {
  const farm = new Farm({ agents: 1, env: { KILN_SYNTHETIC_STEP_MS: '20' } });
  let checker: OpenApiChecker;
  const submit = async (body: unknown, headers: Record<string, string> = {}) => {
    const started = Date.now();
    const res = await farm.request('POST', '/v1/generations', body, headers);
    checker.check('POST', '/v1/generations', res.status, res.body);
    return { ...res, ms: Date.now() - started };
  };
  const quick = (seed: number) => basicRequest({ scheduler: { type: 'EulerDiscreteScheduler', steps: 4 }, hyperparameters: { seed, width: 256, height: 256 } });
  const slow = (seed: number) => basicRequest({ scheduler: { type: 'EulerDiscreteScheduler', steps: 150 }, hyperparameters: { seed, width: 1024, height: 1024 } }); // about 3 s

  beforeAll(async () => {
    await farm.start();
    checker = new OpenApiChecker(await (await fetch(`${farm.api}/openapi.json`)).json());
  }, 120_000);
  afterAll(() => farm.close());

  it('a job that ends in time: 200 with the finished record, outputs and all', async () => {
    const res = await submit(quick(1), { prefer: 'wait' });
    expect(res.status).toBe(200);
    expect(res.headers.get('preference-applied')).toBe('wait=60');
    expect(res.body.status).toBe('succeeded');
    expect(res.body.outputs[0].url).toMatch(/^http/);
    expect(res.headers.get('location')).toBe(res.body.links.self);
    expect(res.ms).toBeLessThan(20_000);
  });

  it('a job that does not: 202 with the current record once the wait is over', async () => {
    const res = await submit(slow(2), { prefer: 'respond-async, wait=1' });
    expect(res.status).toBe(202);
    expect(res.headers.get('preference-applied')).toBe('wait=1');
    expect(['queued', 'running']).toContain(res.body.status);
    expect(res.ms).toBeGreaterThanOrEqual(900);
    expect(res.ms).toBeLessThan(2_500);
    expect((await farm.request('DELETE', `/v1/jobs/${res.body.id}`)).status).toBeLessThan(300);
    await farm.waitForDone(res.body.id);
  });

  it('waits at most 60 s, answers at once without Prefer, and refuses a wait that is not a number before queuing anything', async () => {
    const capped = await submit(quick(3), { prefer: 'wait=600' });
    expect(capped.headers.get('preference-applied')).toBe('wait=60');
    expect(capped.status).toBe(200);
    const plain = await submit(slow(4));
    expect(plain.status).toBe(202);
    expect(plain.headers.get('preference-applied')).toBeNull();
    expect(plain.ms).toBeLessThan(1_000);
    await farm.request('DELETE', `/v1/jobs/${plain.body.id}`);
    const before = (await farm.get('/v1/jobs?limit=100')).body.data.length;
    const bad = await submit(quick(5), { prefer: 'wait=soon' });
    expect(bad.status).toBe(400);
    expect(bad.body.error.details[0]).toMatchObject({ field: 'Prefer', rule: 'invalid_wait' });
    expect((await farm.get('/v1/jobs?limit=100')).body.data.length).toBe(before);
    await farm.waitForDone(plain.body.id);
  });

  it('an idempotent replay waits too', async () => {
    const first = await submit(slow(6), { 'idempotency-key': 'wait-replay' });
    expect(first.status).toBe(202);
    const replay = await submit(slow(6), { 'idempotency-key': 'wait-replay', prefer: 'wait=30' });
    expect(replay.status).toBe(200);
    expect(replay.headers.get('idempotent-replayed')).toBe('true');
    expect(replay.body).toMatchObject({ id: first.body.id, status: 'succeeded' });
  });
});
