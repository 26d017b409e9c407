import { randomUUID } from 'node:crypto';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { basicRequest, Farm } from './support/farm.js';
import { gradientPng } from './support/images.js';
import { OpenApiChecker } from './support/openapi.js';
import { events, openSse } from './support/sse.js';

/**
 * Every link on every kind of record answers as documented, and retry: a new job from an ended
 * one's request, each record linking to the other.
 */

const KEY_A = 'acme-links-key-0123456789';
const KEY_B = 'bravo-links-key-0123456789';
const KEY_ADMIN = 'ops-links-key-0123456789';
const bearer = (k: string) => ({ authorization: `Bearer ${k}` });
const BASE = 'stabilityai/stable-diffusion-xl-base-1.0';

/** The method each link is for (documented on JobLinks and GroupRecord's links). */
const METHOD: Record<string, string> = { self: 'GET', cancel: 'DELETE', events: 'GET', retry: 'POST', retry_of: 'GET', retried_as: 'GET', group: 'GET', jobs: 'GET' };

describe('links and retry', () => {
  const farm = new Farm({ agents: 1, apiKey: KEY_A, env: { API_KEYS: `acme:${KEY_A},bravo:${KEY_B}`, ADMIN_API_KEYS: `ops:${KEY_ADMIN}`, KILN_SYNTHETIC_STEP_MS: '20', KILN_SYNTHETIC_TRAIN_STEP_MS: '5' } });
  let checker: OpenApiChecker;
  const as = (key: string) => ({
    get: (path: string) => farm.request('GET', path, undefined, bearer(key)),
    post: (path: string, body?: unknown) => farm.request('POST', path, body ?? {}, bearer(key)),
  });
  const A = as(KEY_A);
  const ADMIN = as(KEY_ADMIN);
  const tiny = (seed: number, over: Record<string, unknown> = {}) => basicRequest({ scheduler: { type: 'EulerDiscreteScheduler', steps: 2 }, hyperparameters: { seed, width: 64, height: 64 }, ...over });
  const ended = (s: string) => ['succeeded', 'failed', 'canceled', 'partially_succeeded'].includes(s);
  const settle = async (path: string, key = KEY_A) => {
    let rec: any;
    await farm.waitFor(async () => ended((rec = (await as(key).get(path)).body).status), 60_000, `${path} ends`);
    return rec;
  };
  const records: Record<string, { record: any; key: string }> = {};

  beforeAll(async () => {
    await farm.start();
    checker = new OpenApiChecker(await (await fetch(`${farm.api}/openapi.json`)).json());
    // one of each: a generation that succeeded, one that failed (its timeout), one canceled, a training, a batch (and a child), a cache request (and its task)
    const ok = await A.post('/v1/generations', tiny(1));
    const failed = await A.post('/v1/generations', basicRequest({ scheduler: { steps: 150 }, hyperparameters: { seed: 2 }, timeout_s: 1 }));
    const canceled = await A.post('/v1/generations', tiny(3, { scheduler: { steps: 150 }, hyperparameters: { seed: 3, width: 1024, height: 1024 } }));
    await farm.request('DELETE', `/v1/jobs/${canceled.body.id}`, undefined, bearer(KEY_A));
    const batch = await A.post('/v1/batches', { defaults: tiny(4), items: [{}, { hyperparameters: { seed: 5 } }] });
    for (const name of ['1', '2']) {
      const png = await gradientPng(64, 64);
      for (const [ext, type, bytes] of [['png', 'image/png', png], ['txt', 'text/plain', Buffer.from(`kiln ${name}`)]] as const) {
        const up = await A.post('/v1/uploads', { content_type: type, bytes: bytes.length, path: `links/${name}.${ext}` });
        expect((await fetch(up.body.url, { method: 'PUT', headers: { 'content-type': type }, body: new Uint8Array(bytes) })).status).toBe(200);
      }
    }
    const training = await A.post('/v1/trainings', { base_model: BASE, dataset: { s3_prefix: 'tenants/acme/uploads/links/' }, output: { name: 'links' }, hyperparameters: { rank: 4, steps: 4, checkpoint_every: 2, resolution: 256, seed: 1 } });
    expect(training.status, JSON.stringify(training.body)).toBe(202);
    const cache = await ADMIN.post('/v1/cache', { models: { base: BASE } });
    const selfTest = await ADMIN.post('/v1/admin/self-tests', { agents: 'all', checks: ['environment'] });
    expect(selfTest.status, JSON.stringify(selfTest.body)).toBe(202);
    records.generation = { record: await settle(`/v1/jobs/${ok.body.id}`), key: KEY_A };
    records.failed = { record: await settle(`/v1/jobs/${failed.body.id}`), key: KEY_A };
    records.canceled = { record: await settle(`/v1/jobs/${canceled.body.id}`), key: KEY_A };
    records.batch = { record: await settle(`/v1/batches/${batch.body.id}`), key: KEY_A };
    records.child = { record: await settle(`/v1/jobs/${batch.body.children[0].id}`), key: KEY_A };
    records.training = { record: await settle(`/v1/trainings/${training.body.id}`), key: KEY_A };
    records.cache = { record: await settle(`/v1/cache/${cache.body.id}`, KEY_ADMIN), key: KEY_ADMIN };
    records.cacheTask = { record: await settle(`/v1/jobs/${cache.body.children[0].id}`, KEY_ADMIN), key: KEY_ADMIN };
    records.selfTest = { record: await settle(`/v1/admin/self-tests/${selfTest.body.id}`, KEY_ADMIN), key: KEY_ADMIN };
    records.selfTestTask = { record: await settle(`/v1/jobs/${selfTest.body.children[0].id}`, KEY_ADMIN), key: KEY_ADMIN };
    expect(records.failed!.record.error.code).toBe('timeout');
    expect(records.canceled.record.status).toBe('canceled');
  }, 180_000);
  afterAll(() => farm.close());

  it('a retry is a new job with the same request; each record links to the other', async () => {
    const old = records.failed!.record;
    const res = await A.post(`/v1/jobs/${old.id}/retry`);
    checker.check('POST', `/v1/jobs/${old.id}/retry`, res.status, res.body);
    expect(res.status).toBe(202);
    const retry = res.body;
    expect(retry.id).not.toBe(old.id);
    expect(retry).toMatchObject({ status: 'queued', retry_of: old.id, client: 'acme', attempt: 0 });
    expect(retry.request).toEqual(old.request);
    expect(res.headers.get('location')).toBe(retry.links.self);
    expect(retry.links.retry_of).toBe(old.links.self);
    const again = (await A.get(`/v1/jobs/${old.id}`)).body;
    expect(again.retried_as).toEqual([retry.id]);
    expect(again.links.retried_as).toBe(retry.links.self);
    records.retry = { record: await settle(`/v1/jobs/${retry.id}`), key: KEY_A };
  });

  it("a batch child's retry stands alone; an input image is copied under the retry", async () => {
    const child = records.child!.record;
    const alone = (await A.post(`/v1/jobs/${child.id}/retry`)).body;
    expect(alone.group_id).toBeNull();
    expect(alone.links.group).toBeUndefined();
    const png = await gradientPng(64, 64);
    const img2img = await A.post('/v1/generations', tiny(7, { image: { init: { base64: png.toString('base64') }, strength: 0.5 } }));
    const done = await settle(`/v1/jobs/${img2img.body.id}`);
    const retried = (await A.post(`/v1/jobs/${done.id}/retry`)).body;
    expect(retried.request.image.init.s3_key).toBe(done.request.image.init.s3_key.replace(done.id, retried.id));
    const finished = await settle(`/v1/jobs/${retried.id}`);
    expect(finished.status).toBe('succeeded');
    expect(finished.outputs[0].sha256).toBe(done.outputs[0].sha256); // same request, same seed, same image
    await settle(`/v1/jobs/${alone.id}`);
  });

  it('what cannot be retried: a job still running, a cache or self-test task, a training whose LoRA exists, another tenant\'s job', async () => {
    const running = await A.post('/v1/generations', tiny(8, { scheduler: { steps: 150 }, hyperparameters: { seed: 8, width: 1024, height: 1024 } }));
    const refusals: [string, string, number][] = [
      [KEY_A, running.body.id, 409],
      [KEY_ADMIN, records.cacheTask!.record.id, 409],
      [KEY_ADMIN, records.selfTestTask!.record.id, 409],
      [KEY_A, records.training!.record.id, 409],
      [KEY_B, records.generation!.record.id, 404],
      [KEY_A, randomUUID(), 404],
    ];
    for (const [key, id, status] of refusals) {
      const res = await as(key).post(`/v1/jobs/${id}/retry`);
      checker.check('POST', `/v1/jobs/${id}/retry`, res.status, res.body);
      expect(res.status, `${id}: ${JSON.stringify(res.body)}`).toBe(status);
    }
    await farm.request('DELETE', `/v1/jobs/${running.body.id}`, undefined, bearer(KEY_A));
    await settle(`/v1/jobs/${running.body.id}`);
  });

  it('every link of every kind of record answers as documented', async () => {
    expect(Object.keys(records).sort()).toEqual(['batch', 'cache', 'cacheTask', 'canceled', 'child', 'failed', 'generation', 'retry', 'selfTest', 'selfTestTask', 'training']);
    const followed = new Set<string>();
    for (const [kind, { record, key }] of Object.entries(records)) {
      const fresh = (await as(key).get(new URL(record.links.self).pathname)).body; // links as they are now (retried_as included)
      for (const [name, url] of Object.entries<string>(fresh.links)) {
        const method = METHOD[name];
        expect(method, `${kind}.links.${name}: a link this test does not know`).toBeDefined();
        expect(url.startsWith(farm.api), url).toBe(true);
        const path = url.slice(farm.api.length);
        if (name === 'events') {
          const stream = await openSse(url, bearer(key));
          expect(stream.res.status, `${kind}.links.events`).toBe(200);
          const frames = await stream.finished(10_000);
          expect(events(frames, 'end'), `${kind}.links.events ends`).toHaveLength(1);
        } else {
          const res = await farm.request(method!, path, method === 'POST' ? {} : undefined, bearer(key));
          // the route exists (a missing one is "no route"), and it answered with a documented status and body
          expect(JSON.stringify(res.body), `${kind}.links.${name}: ${method} ${path}`).not.toContain('no route');
          checker.check(method!, path, res.status, res.body, res.headers.get('content-type') ?? '');
          expect(res.status, `${kind}.links.${name}: ${method} ${path} → ${JSON.stringify(res.body).slice(0, 200)}`).toBeOneOf(name === 'cancel' || name === 'retry' ? [200, 202, 409] : [200]);
        }
        followed.add(`${kind}.${name}`);
      }
    }
    // every kind of link was followed somewhere
    for (const name of Object.keys(METHOD)) expect([...followed].some((f) => f.endsWith(`.${name}`)), name).toBe(true);
    // a cache request's cancel is a route now (it was DELETE /v1/cache/<id> with no such route)
    expect(followed).toContain('cache.cancel');
    // a self-test request's and its task's links: the group under /v1/admin/self-tests, no retry
    expect([...followed]).toEqual(expect.arrayContaining(['selfTest.self', 'selfTest.cancel', 'selfTestTask.group', 'selfTestTask.cancel']));
    expect(followed).not.toContain('selfTestTask.retry');
  }, 120_000);
});
