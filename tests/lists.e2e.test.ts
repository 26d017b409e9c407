import { Client } from 'minio';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { basicRequest, Farm } from './support/farm.js';
import { gradientPng } from './support/images.js';
import { OpenApiChecker } from './support/openapi.js';

/**
 * Lists and history: GET /v1/jobs, /v1/trainings and /v1/batches, newest first with cursor
 * pagination and filters, scoped to the caller's tenant (admins see all); `expires_at` on every
 * record, and a record that expires takes its objects in the bucket with it.
 */

const KEY_A = 'acme-lists-key-0123456789';
const KEY_B = 'bravo-lists-key-0123456789';
const KEY_ADMIN = 'ops-lists-key-0123456789';
const RETENTION_S = 3600;
const bearer = (k: string) => ({ authorization: `Bearer ${k}` });

describe('lists', () => {
  const farm = new Farm({
    agents: 1,
    apiKey: KEY_A,
    env: { API_KEYS: `acme:${KEY_A},bravo:${KEY_B}`, ADMIN_API_KEYS: `ops:${KEY_ADMIN}`, JOB_RETENTION_S: String(RETENTION_S), RETENTION_SWEEP_MS: '200', KILN_SYNTHETIC_TRAIN_STEP_MS: '20' },
  });
  let checker: OpenApiChecker;
  let s3: Client;
  const get = async (path: string, key = KEY_A) => {
    const res = await farm.get(path, bearer(key));
    checker.check('GET', path, res.status, res.body, res.headers.get('content-type') ?? '');
    return res;
  };
  /** Every page of a list, following next_cursor. */
  const all = async (path: string, key = KEY_A, from: string | null = null) => {
    const items: any[] = [];
    let cursor: string | null = from;
    let pages = 0;
    do {
      const res = await get(`${path}${path.includes('?') ? '&' : '?'}limit=2${cursor ? `&cursor=${cursor}` : ''}`, key);
      expect(res.status, JSON.stringify(res.body)).toBe(200);
      items.push(...res.body.data);
      cursor = res.body.next_cursor;
      expect(++pages).toBeLessThan(50);
    } while (cursor);
    return items;
  };
  const tiny = (seed: number, steps = 2) => basicRequest({ scheduler: { type: 'EulerDiscreteScheduler', steps }, hyperparameters: { seed, width: 64, height: 64 } });
  const newestFirst = (xs: { created_at: string; id: string }[]) =>
    [...xs].sort((a, b) => b.created_at.localeCompare(a.created_at) || b.id.localeCompare(a.id)).map((x) => x.id);
  const ended = (s: string) => ['succeeded', 'failed', 'canceled', 'partially_succeeded'].includes(s);

  const mine: Record<string, string> = {}; // id → what it is
  let batchId = '';
  let trainingId = '';
  let canceledId = '';
  const theirs: string[] = [];

  beforeAll(async () => {
    await farm.start();
    checker = new OpenApiChecker(await (await fetch(`${farm.api}/openapi.json`)).json());
    s3 = new Client({ endPoint: '127.0.0.1', port: Number(new URL(farm.s3.endpoint).port), useSSL: false, accessKey: farm.s3.accessKey, secretKey: farm.s3.secretKey, pathStyle: true, region: 'us-east-1' });
    const png = await gradientPng(64, 64);
    await s3.putObject('kiln-test', 'tenants/acme/d/0.png', png, png.length);
    await s3.putObject('kiln-test', 'tenants/acme/d/0.txt', Buffer.from('a kiln'), 6);

    // a batch of five: its children share one creation time, so pages must break ties
    const batch = await farm.request('POST', '/v1/batches', { defaults: tiny(1), items: [1, 2, 3, 4, 5].map((seed) => ({ hyperparameters: { seed } })) });
    expect(batch.status).toBe(202);
    batchId = batch.body.id;
    for (const c of batch.body.children) mine[c.id] = 'child';
    for (const seed of [10, 11]) mine[(await farm.submit(tiny(seed))).id] = 'single';
    const t = await farm.request('POST', '/v1/trainings', { base_model: 'stabilityai/stable-diffusion-xl-base-1.0', dataset: { s3_prefix: 'tenants/acme/d/' }, output: { name: 'lists' }, hyperparameters: { rank: 4, steps: 2, checkpoint_every: 1, resolution: 256, seed: 1 } });
    expect(t.status, JSON.stringify(t.body)).toBe(202);
    trainingId = t.body.id;
    mine[trainingId] = 'training';
    canceledId = (await farm.submit(tiny(12, 150))).id;
    mine[canceledId] = 'canceled';
    expect((await farm.request('DELETE', `/v1/jobs/${canceledId}`)).status).toBeLessThan(300);
    for (const seed of [20, 21]) {
      const res = await farm.request('POST', '/v1/generations', tiny(seed), bearer(KEY_B));
      theirs.push(res.body.id);
    }
    for (const id of [...Object.keys(mine), ...theirs]) await farm.waitFor(async () => ended((await farm.get(`/v1/jobs/${id}`, bearer(theirs.includes(id) ? KEY_B : KEY_A))).body.status), 60_000, `${id} ends`);
    await farm.waitFor(async () => ended((await farm.get(`/v1/batches/${batchId}`)).body.status), 30_000, 'batch ends');
  }, 180_000);
  afterAll(() => farm.close());

  it("GET /v1/jobs pages through the tenant's jobs, newest first, each once, none of another tenant's", async () => {
    const items = await all('/v1/jobs');
    const ids = items.map((j) => j.id);
    expect(new Set(ids).size).toBe(ids.length);
    expect(ids.sort()).toEqual(Object.keys(mine).sort());
    expect(items.map((j) => j.id)).toEqual(newestFirst(items));
    expect(items.every((j) => j.client === 'acme')).toBe(true);
    // bravo sees only its own
    expect((await all('/v1/jobs', KEY_B)).map((j) => j.id).sort()).toEqual([...theirs].sort());
  });

  it('a page read after new submissions continues where it stopped', async () => {
    const first = await get('/v1/jobs?limit=3');
    const extra = await farm.submit(tiny(30));
    const rest = await all('/v1/jobs', KEY_A, first.body.next_cursor);
    const seen = [...first.body.data, ...rest].map((j) => j.id);
    expect(seen).not.toContain(extra.id);
    expect(seen.sort()).toEqual(Object.keys(mine).sort());
    await farm.waitForDone(extra.id);
    mine[extra.id] = 'single';
    expect((await get('/v1/jobs?limit=1')).body.data[0].id).toBe(extra.id);
  });

  it('filters: status, kind, batch, created_after and created_before', async () => {
    expect((await all('/v1/jobs?status=canceled')).map((j) => j.id)).toEqual([canceledId]);
    const okOrCanceled = await all('/v1/jobs?status=succeeded,canceled');
    expect(okOrCanceled.length).toBe(Object.keys(mine).length);
    expect((await all('/v1/jobs?status=queued,running')).length).toBe(0);
    expect((await all('/v1/jobs?kind=training')).map((j) => j.id)).toEqual([trainingId]);
    expect((await all('/v1/trainings')).map((j) => j.id)).toEqual([trainingId]);
    expect((await all('/v1/trainings?status=failed')).length).toBe(0);
    const children = await all(`/v1/jobs?batch=${batchId}`);
    expect(children.map((j) => j.request.hyperparameters.seed)).toEqual([1, 2, 3, 4, 5]);
    expect(children.every((j) => j.group_id === batchId)).toBe(true);
    // created_*: the batch's children share a creation time
    const at = Date.parse(children[0].created_at);
    const iso = (t: number) => new Date(t).toISOString();
    expect((await all(`/v1/jobs?created_after=${iso(at - 1)}&created_before=${iso(at + 1)}`)).map((j) => j.id).sort()).toEqual(children.map((j) => j.id).sort());
    const before = await all(`/v1/jobs?created_before=${iso(at)}`);
    expect(before.every((j) => Date.parse(j.created_at) < at)).toBe(true);
    expect(before.length).toBe(0); // the batch came first
  });

  it('tenant scope: a client cannot list another tenant, nor its batch; an admin lists all or one', async () => {
    expect((await get('/v1/jobs?tenant=bravo')).status).toBe(403);
    expect((await get(`/v1/jobs?batch=${batchId}`, KEY_B)).status).toBe(404);
    expect((await get('/v1/jobs?tenant=acme')).status).toBe(200);
    const everyone = await all('/v1/jobs', KEY_ADMIN);
    expect(everyone.map((j) => j.id).sort()).toEqual([...Object.keys(mine), ...theirs].sort());
    expect((await all('/v1/jobs?tenant=bravo', KEY_ADMIN)).map((j) => j.id).sort()).toEqual([...theirs].sort());
    expect((await all('/v1/batches', KEY_B)).length).toBe(0);
  });

  it('refuses a cursor it did not issue, unknown parameters, bad values', async () => {
    expect((await get('/v1/jobs?cursor=bm9wZQ')).status).toBe(400);
    expect((await get('/v1/jobs?colour=red')).status).toBe(400);
    expect((await get('/v1/jobs?status=done')).status).toBe(400);
    expect((await get('/v1/jobs?limit=0')).status).toBe(400);
    expect((await get('/v1/jobs?created_after=yesterday')).status).toBe(400);
  });

  it('GET /v1/batches lists batches with their counts', async () => {
    const batches = await all('/v1/batches');
    expect(batches.map((b) => b.id)).toEqual([batchId]);
    expect(batches[0]).toMatchObject({ status: 'succeeded', counts: { total: 5, succeeded: 5 } });
    expect(batches[0].children).toBeUndefined();
    expect((await all('/v1/batches?status=failed')).length).toBe(0);
  });

  it('expires_at: JOB_RETENTION_S after a record ended, as Redis keeps it', async () => {
    const job = (await get(`/v1/jobs/${canceledId}`)).body;
    expect(Date.parse(job.expires_at) - Date.parse(job.finished_at)).toBe(RETENTION_S * 1000);
    const ttl = await farm.redis.pttl(`${farm.prefix}:job:${canceledId}`);
    expect(Math.abs(Date.now() + ttl - Date.parse(job.expires_at))).toBeLessThan(5_000);
    const batch = (await get(`/v1/batches/${batchId}`)).body;
    expect(Date.parse(batch.expires_at) - Date.parse(batch.finished_at)).toBe(RETENTION_S * 1000);
    const running = await farm.submit(tiny(40, 150));
    expect(running.expires_at).toBeNull();
    await farm.request('DELETE', `/v1/jobs/${running.id}`);
    await farm.waitForDone(running.id);
    mine[running.id] = 'canceled';
  });

  it('a record that expires takes its objects with it (outputs, checkpoints; not its LoRA) and leaves every list', async () => {
    const [id] = Object.entries(mine).find(([, what]) => what === 'single')!;
    const job = (await get(`/v1/jobs/${id}`)).body;
    expect(job.outputs.length).toBe(1);
    const key = job.outputs[0].key as string;
    await s3.statObject('kiln-test', key); // there now
    // what JOB_RETENTION_S does, now: Redis drops the record
    for (const k of ['', ':events', ':deliveries']) await farm.redis.pexpire(`${farm.prefix}:job:${id}${k}`, 1);
    await farm.waitFor(async () => (await s3.statObject('kiln-test', key).then(() => true, () => false)) === false, 20_000, 'outputs deleted');
    await farm.waitFor(async () => (await farm.redis.hget(`${farm.prefix}:index:jobs:owners`, id)) === null, 20_000, 'index entry dropped');
    for (const scope of ['tenant:acme:all', 'tenant:acme:generation', 'farm:all', 'farm:generation']) expect(await farm.redis.zscore(`${farm.prefix}:index:jobs:${scope}`, id), scope).toBeNull();
    expect((await all('/v1/jobs')).map((j) => j.id)).not.toContain(id);
    expect((await get(`/v1/jobs/${id}`)).status).toBe(404);
    // the rest is untouched
    const other = Object.keys(mine).find((x) => x !== id && mine[x] === 'child')!;
    const still = (await get(`/v1/jobs/${other}`)).body;
    await s3.statObject('kiln-test', still.outputs[0].key);
    // a training's LoRA outlives its record; its checkpoints do not
    const training = (await get(`/v1/trainings/${trainingId}`)).body;
    const lora = training.training.lora.key as string;
    const checkpoints: string[] = [];
    for await (const o of s3.listObjectsV2('kiln-test', `trainings/${trainingId}/`, true)) checkpoints.push((o as { name: string }).name);
    expect(checkpoints.length).toBeGreaterThan(0);
    for (const k of ['', ':events', ':deliveries']) await farm.redis.pexpire(`${farm.prefix}:job:${trainingId}${k}`, 1);
    await farm.waitFor(async () => (await farm.redis.hget(`${farm.prefix}:index:jobs:owners`, trainingId)) === null, 20_000, 'training dropped');
    const left: string[] = [];
    for await (const o of s3.listObjectsV2('kiln-test', `trainings/${trainingId}/`, true)) left.push((o as { name: string }).name);
    expect(left).toEqual([]);
    await s3.statObject('kiln-test', lora);
  });
});
