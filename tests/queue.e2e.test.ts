import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { basicRequest, Farm } from './support/farm.js';
import { OpenApiChecker } from './support/openapi.js';

/**
 * Queue position and ETA on queued and running jobs, GET /v1/queue, POST /v1/validate's
 * estimate, and Cancel-After deadlines, on a farm with one busy agent and jobs waiting behind it.
 */

const KEY_A = 'acme-queue-key-0123456789';
const KEY_B = 'bravo-queue-key-0123456789';
const KEY_ADMIN = 'ops-queue-key-0123456789';
const bearer = (k: string) => ({ authorization: `Bearer ${k}` });
const BASE = 'stabilityai/stable-diffusion-xl-base-1.0';

describe('queue position and ETA', () => {
  const farm = new Farm({ agents: 1, apiKey: KEY_A, env: { API_KEYS: `acme:${KEY_A},bravo:${KEY_B}`, ADMIN_API_KEYS: `ops:${KEY_ADMIN}`, KILN_SYNTHETIC_STEP_MS: '20' } });
  let checker: OpenApiChecker;
  const get = async (path: string, key = KEY_A) => {
    const res = await farm.get(path, bearer(key));
    checker.check('GET', path, res.status, res.body);
    return res.body;
  };
  const submit = async (body: unknown, key = KEY_A) => {
    const res = await farm.request('POST', '/v1/generations', body, bearer(key));
    expect(res.status).toBe(202);
    return res.body;
  };
  const long = (seed: number, priority = 'normal') => basicRequest({ scheduler: { steps: 100 }, hyperparameters: { seed, width: 1024, height: 1024 }, priority }); // about 2 s each
  const ids: string[] = [];

  beforeAll(async () => {
    await farm.start();
    checker = new OpenApiChecker(await (await fetch(`${farm.api}/openapi.json`)).json());
    // the agent measures its times on a first job
    await farm.waitForDone((await submit(basicRequest({ scheduler: { steps: 10 }, hyperparameters: { seed: 1, width: 1024, height: 1024 } }))).id);
  }, 120_000);
  afterAll(async () => {
    for (const id of ids) await farm.request('DELETE', `/v1/jobs/${id}`, undefined, bearer(KEY_ADMIN));
    await farm.close();
  });

  it('queued jobs know their place and when they should end; a running one its time left; an ended one neither', async () => {
    for (let i = 0; i < 5; i++) ids.push((await submit(long(10 + i))).id);
    ids.push((await submit(long(20), KEY_B)).id);
    // one runs, one waits on the agent (its next), the rest in intake
    await farm.waitFor(async () => (await get(`/v1/jobs/${ids[0]}`)).status === 'running', 20_000, 'the first job runs');
    const records = await Promise.all(ids.map((id) => get(`/v1/jobs/${id}`)));
    const waiting = records.filter((r) => r.status === 'queued' && r.queue.position !== null);
    expect(waiting.length).toBeGreaterThanOrEqual(3);
    // positions count up in submission order, and so do the estimates
    expect(waiting.map((r) => r.queue.position)).toEqual(waiting.map((_, i) => i));
    const etas = waiting.map((r) => r.queue.eta_s);
    expect(etas.every((e) => typeof e === 'number' && e > 0)).toBe(true);
    expect([...etas].sort((a, b) => a - b)).toEqual(etas);
    const running = records[0];
    expect(running.queue.position).toBeNull();
    expect(running.queue.eta_s).toBeGreaterThanOrEqual(0);
    expect(running.queue.eta_s).toBeLessThanOrEqual(10);
    // a high-priority job goes to the front of intake
    const urgent = await submit(long(30, 'high'));
    ids.push(urgent.id);
    expect(urgent.queue.position).toBe(0);
    expect((await get(`/v1/jobs/${waiting[0].id}`)).queue.position).toBe(1);
    // lists carry it too
    const listed = (await get('/v1/jobs?status=queued&limit=100')).data;
    expect(listed.find((r: any) => r.id === urgent.id).queue.position).toBe(0);
    // an ended job has none
    const done = (await get('/v1/jobs?status=succeeded&limit=1')).data[0];
    expect(done.queue).toBeNull();
  });

  it('GET /v1/queue: depth by priority, model and tenant (a client sees only its own), agents, drain time', async () => {
    const mine = await get('/v1/queue');
    expect(mine.waiting).toBeGreaterThanOrEqual(4);
    expect(mine.counted).toBe(mine.waiting);
    expect(mine.by_priority.high + mine.by_priority.normal + mine.by_priority.low).toBe(mine.counted);
    expect(mine.by_priority.high).toBe(1);
    expect(mine.by_model[BASE]).toBe(mine.counted);
    expect(Object.keys(mine.by_tenant)).toEqual(['acme']);
    expect(mine.agents).toMatchObject({ total: 1, busy: 1, idle: 0 });
    expect(mine.drain_s).toBeGreaterThan(4);
    const all = await get('/v1/queue', KEY_ADMIN);
    expect(Object.keys(all.by_tenant).sort()).toEqual(['acme', 'bravo']);
    expect(all.by_tenant.acme + all.by_tenant.bravo).toBe(all.counted);
  });

  it('Cancel-After: a job not started by its deadline is canceled without running', async () => {
    const res = await farm.request('POST', '/v1/generations', long(50), { ...bearer(KEY_A), 'cancel-after': '1s' });
    checker.check('POST', '/v1/generations', res.status, res.body);
    expect(res.status).toBe(202);
    expect(Date.parse(res.body.deadline_at) - Date.parse(res.body.created_at)).toBe(1000);
    const done = await farm.waitForJob(res.body.id, (j) => j.status !== 'queued', 10_000);
    expect(done.status).toBe('canceled');
    expect(done.error?.message).toMatch(/^Cancel-After: not started by /);
    expect(done.started_at).toBeNull();
    expect(done.attempt).toBe(0);
    expect(Date.parse(done.finished_at!) - Date.parse(res.body.deadline_at)).toBeLessThan(3_000);
  });

  it('Cancel-After: a running job is stopped at its deadline; one that ends in time is untouched; a bad duration is a 400', async () => {
    // clear the backlog: the next job runs at once
    for (const id of ids.splice(0)) await farm.request('DELETE', `/v1/jobs/${id}`, undefined, bearer(KEY_ADMIN));
    await farm.waitFor(async () => (await get('/v1/queue', KEY_ADMIN)).agents.busy === 0, 30_000, 'the agent idle');
    const slow = await farm.request('POST', '/v1/generations', basicRequest({ scheduler: { steps: 150 }, hyperparameters: { seed: 60, width: 1024, height: 1024 } }), { ...bearer(KEY_A), 'cancel-after': '2s' });
    await farm.waitForJob(slow.body.id, (j) => j.status === 'running', 10_000);
    const stopped = await farm.waitForDone(slow.body.id, 15_000);
    expect(stopped.status).toBe('canceled');
    expect(stopped.started_at).not.toBeNull();
    expect(stopped.events.some((e) => e.message?.startsWith('cancellation requested: Cancel-After: not done by'))).toBe(true);
    const quick = await farm.request('POST', '/v1/generations', basicRequest({ scheduler: { steps: 2 }, hyperparameters: { seed: 61, width: 128, height: 128 } }), { ...bearer(KEY_A), 'cancel-after': '30s', prefer: 'wait=20' });
    expect(quick.body.status).toBe('succeeded');
    for (const bad of ['soon', '0s', '48h', '-5s']) {
      const r = await farm.request('POST', '/v1/generations', long(62), { ...bearer(KEY_A), 'cancel-after': bad });
      expect(r.status, bad).toBe(400);
      expect(r.body.error.details[0]).toMatchObject({ field: 'Cancel-After', rule: 'invalid_duration' });
    }
  });

  it('POST /v1/validate estimates the run and the VRAM', async () => {
    const res = await farm.request('POST', '/v1/validate', long(40), bearer(KEY_A));
    checker.check('POST', '/v1/validate', res.status, res.body);
    expect(res.status).toBe(200);
    expect(res.body.estimate.run_s).toBeGreaterThan(0);
    expect(res.body.estimate.vram_mb).toBeGreaterThan(1000);
    const small = await farm.request('POST', '/v1/validate', basicRequest({ scheduler: { steps: 4 }, hyperparameters: { width: 512, height: 512 } }), bearer(KEY_A));
    expect(small.body.estimate.run_s).toBeLessThan(res.body.estimate.run_s);
  });
});
