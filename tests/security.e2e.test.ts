import { createHash, randomUUID } from 'node:crypto';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { request as httpRequest } from 'node:http';
import type { AddressInfo } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createJobServices, createLogger, parseEnvOrThrow } from '@kiln/runtime';
import { Client } from 'minio';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { buildApp, type RegisteredRoute } from '../apps/api/src/app.js';
import { ApiEnv } from '../apps/api/src/env.js';
import { KeyRing } from '../apps/api/src/keys.js';
import { ENTRY } from '../scripts/farm-lib.js';
import { basicRequest, Farm, freePort, REDIS_URL, sleep } from './support/farm.js';
import { gradientPng, shapesPng } from './support/images.js';

/**
 * The front door, tried the way an attacker or a careless client would: every route under
 * every spelling of its path, tenant against tenant on every route, client against admin,
 * quotas, S3 keys outside the tenant's area, and LoRA names that must never collide.
 */

const KEY_A = 'acme-key-0123456789abcdef';
const KEY_B = 'bravo-key-0123456789abcdef';
const KEY_ADMIN = 'ops-admin-key-0123456789abcdef';
const KEY_C = 'charlie-key-0123456789abcdef'; // only its sha-256 is in the keys file
const BARE = 'bare-key-0123456789abcdef';
const bearer = (k: string) => ({ authorization: `Bearer ${k}` });

/** GET/POST with the path sent exactly as written: no client-side normalisation. */
function raw(port: number, method: string, path: string, headers: Record<string, string> = {}): Promise<{ status: number; body: string }> {
  return new Promise((resolve, reject) => {
    const req = httpRequest({ host: '127.0.0.1', port, method, path, headers }, (res) => {
      let body = '';
      res.on('data', (c) => (body += c));
      res.on('end', () => resolve({ status: res.statusCode ?? 0, body }));
    });
    req.on('error', reject);
    req.end();
  });
}

/** Ways to spell one path that a router may (or may not) take for it. */
function spellings(path: string): string[] {
  const segs = path.split('/').filter(Boolean);
  const enc = (s: string, i = 0) => `${s.slice(0, i)}%${s.charCodeAt(i).toString(16)}${s.slice(i + 1)}`;
  const encUpper = (s: string) => `%${s.charCodeAt(0).toString(16).toUpperCase()}${s.slice(1)}`;
  const join = (xs: string[]) => `/${xs.join('/')}`;
  const out = new Set<string>([
    path,
    join([enc(segs[0]!), ...segs.slice(1)]),
    join([encUpper(segs[0]!), ...segs.slice(1)]),
    join(segs.map((s) => enc(s))),
    join([...segs.slice(0, -1), enc(segs.at(-1)!, segs.at(-1)!.length - 1)]),
    join(segs.map((s) => [...s].map((c) => `%${c.charCodeAt(0).toString(16)}`).join(''))),
    path.toUpperCase(),
    `/${path}`,
    path.replace(/\//g, '//'),
    `${path}/`,
    `${path}?x=1`,
    `${path};x=1`,
    join([segs[0]!, '.', ...segs.slice(1)]),
    join([segs[0]!, 'x', '..', ...segs.slice(1)]),
    join(['.', ...segs]),
    join(['%2e', ...segs]),
    join([segs[0]!, '%2e%2e', segs[0]!, ...segs.slice(1)]),
    path.replace(/\//g, '%2f').replace(/^%2f/, '/'),
    `${path}%00`,
    `${path}%20`,
  ]);
  return [...out];
}

const samplePath = (url: string) => url.replace(/:[a-z_]+/g, randomUUID()).replace(/\*$/, 'api/queues');

describe('no spelling of a path reaches a route without its key', () => {
  let port = 0;
  let routes: RegisteredRoute[] = [];
  let close = async () => {};
  beforeAll(async () => {
    const env = parseEnvOrThrow(ApiEnv, {
      REDIS_URL,
      KILN_PREFIX: `kiln-test-${randomUUID().slice(0, 8)}`,
      API_KEYS: `acme:${KEY_A}`,
      ADMIN_API_KEYS: `ops:${KEY_ADMIN}`,
      S3_ENDPOINT: 'http://127.0.0.1:9', // never reached: every request here is refused before a handler runs
    });
    const services = createJobServices(env, 'kiln-security-test');
    const built = await buildApp({ env, log: createLogger('api', 'silent'), ring: KeyRing.from(env), ...services });
    await built.app.listen({ host: '127.0.0.1', port: 0 });
    port = (built.app.server.address() as AddressInfo).port;
    routes = built.routes.filter((r) => r.method !== 'HEAD' && r.method !== 'OPTIONS');
    close = async () => {
      await built.close();
      await services.redis.del(...(await services.redis.keys(`${env.KILN_PREFIX}:*`)), 'none');
      await services.close();
    };
  });
  afterAll(() => close());

  it('registers the routes this suite walks (a route added later is walked too)', () => {
    const urls = routes.map((r) => `${r.method} ${r.url}`);
    expect(urls).toEqual(expect.arrayContaining(['POST /v1/generations', 'GET /v1/jobs/:id', 'DELETE /v1/cache', 'GET /admin/queues', 'GET /healthz']));
    // every route is either explicitly public or needs a key: nothing is open by omission
    // (the API reference: its document, and Swagger UI's page and assets)
    expect(routes.filter((r) => r.auth === 'public').map((r) => r.url).sort()).toEqual([
      '/docs',
      '/docs/json',
      '/docs/static/*',
      '/docs/static/index.html',
      '/docs/static/swagger-initializer.js',
      '/docs/yaml',
      '/healthz',
      '/openapi.json',
      '/readyz',
    ]);
  });

  it('every route, under every spelling that routes at all, answers 401 without a key', async () => {
    const leaks: string[] = [];
    for (const r of routes.filter((x) => x.auth !== 'public')) {
      for (const path of spellings(samplePath(r.url))) {
        const res = await raw(port, r.method, path);
        if (res.status !== 401 && res.status !== 404) leaks.push(`${r.method} ${path} → ${res.status} ${res.body.slice(0, 80)}`);
        if (res.status === 404) expect(JSON.parse(res.body).error.code).toBe('not_found');
      }
      // the plain spelling must route (a 404 here would make this test vacuous)
      expect((await raw(port, r.method, samplePath(r.url))).status, `${r.method} ${r.url}`).toBe(401);
    }
    expect(leaks).toEqual([]);
  });

  it('a client key gets 403 on every admin route, however it is spelled', async () => {
    const leaks: string[] = [];
    const adminOnly = routes.filter((r) => r.auth === 'admin' || r.url.startsWith('/admin'));
    expect(adminOnly.map((r) => `${r.method} ${r.url}`)).toEqual(expect.arrayContaining(['POST /v1/cache', 'DELETE /v1/cache', 'POST /v1/loras/share', 'POST /v1/agents/:id/drain', 'POST /v1/agents/:id/resume', 'POST /v1/admin/self-tests', 'GET /v1/admin/self-tests/:id', 'DELETE /v1/admin/self-tests/:id', 'GET /metrics']));
    for (const r of adminOnly) {
      for (const path of spellings(samplePath(r.url))) {
        const res = await raw(port, r.method, path, bearer(KEY_A));
        if (res.status !== 403 && res.status !== 404) leaks.push(`${r.method} ${path} → ${res.status}`);
      }
    }
    expect(leaks).toEqual([]);
  });

  it('a made-up key, a key with a different case and a basic-auth key on /v1 are refused', async () => {
    expect((await raw(port, 'GET', '/v1/agents', bearer('nope-nope-nope-nope-nope'))).status).toBe(401);
    expect((await raw(port, 'GET', '/v1/agents', bearer(KEY_A.toUpperCase()))).status).toBe(401);
    expect((await raw(port, 'GET', '/v1/agents', { authorization: `Basic ${Buffer.from(`x:${KEY_A}`).toString('base64')}` })).status).toBe(401);
    expect((await raw(port, 'GET', '/healthz')).status).toBe(200);
  });
});

describe('tenants, roles and quotas on a running farm', () => {
  const dir = mkdtempSync(join(tmpdir(), 'kiln-keys-'));
  const keysFile = join(dir, 'keys.json');
  writeFileSync(
    keysFile,
    JSON.stringify({
      keys: [{ tenant: 'charlie', sha256: createHash('sha256').update(KEY_C).digest('hex') }],
      tenants: { charlie: { requests_per_minute: 30, max_queued_jobs: 2 } },
    }),
  );
  const farm = new Farm({
    agents: 1,
    env: {
      API_KEYS: `acme:${KEY_A},bravo:${KEY_B},${BARE}`,
      ADMIN_API_KEYS: `ops:${KEY_ADMIN}`,
      API_KEYS_FILE: keysFile,
      KILN_SYNTHETIC_TRAIN_STEP_MS: '160',
    },
    apiKey: KEY_ADMIN,
  });
  let s3: Client;
  const put = (key: string, body: Buffer, type = 'image/png') => s3.putObject('kiln-test', key, body, body.length, { 'Content-Type': type });
  const as = (key: string) => ({
    get: (path: string) => farm.get(path, bearer(key)),
    post: (path: string, body: unknown, headers: Record<string, string> = {}) => farm.request('POST', path, body, { ...bearer(key), ...headers }),
    del: (path: string, body?: unknown) => farm.request('DELETE', path, body, bearer(key)),
  });
  const A = as(KEY_A);
  const B = as(KEY_B);
  const ADMIN = as(KEY_ADMIN);
  const C = as(KEY_C);
  const tiny = (seed: number, over: Record<string, any> = {}) =>
    basicRequest({ scheduler: { type: 'EulerDiscreteScheduler', steps: 2 }, hyperparameters: { seed, width: 64, height: 64 }, ...over });
  const done = async (who: ReturnType<typeof as>, id: string, path = '/v1/jobs') => {
    let rec: any;
    await farm.waitFor(async () => ['succeeded', 'failed', 'canceled'].includes((rec = (await who.get(`${path}/${id}`)).body).status), 60_000, `${path}/${id} ends`);
    return rec;
  };
  const train = (name: string, seed = 3) => ({
    base_model: 'stabilityai/stable-diffusion-xl-base-1.0',
    dataset: { s3_prefix: 'tenants/acme/datasets/kilns/' },
    output: { name },
    hyperparameters: { rank: 4, steps: 4, checkpoint_every: 2, resolution: 256, seed },
  });

  let jobA = '';
  let batchA = '';
  let trainingA = '';
  let cacheId = '';

  beforeAll(async () => {
    await farm.start();
    s3 = new Client({ endPoint: '127.0.0.1', port: Number(new URL(farm.s3.endpoint).port), useSSL: false, accessKey: farm.s3.accessKey, secretKey: farm.s3.secretKey, pathStyle: true, region: 'us-east-1' });
    for (let i = 0; i < 2; i++) {
      await put(`tenants/acme/datasets/kilns/${i}.png`, i ? await shapesPng(64, 64) : await gradientPng(64, 64));
      await put(`tenants/acme/datasets/kilns/${i}.txt`, Buffer.from(`a kiln, number ${i}`), 'text/plain');
    }
    await put('tenants/acme/init.png', await gradientPng(64, 64));
    await put('tenants/bravo/secret.png', await shapesPng(64, 64));
    await put('shared/palette.png', await gradientPng(64, 64));
    const job = await A.post('/v1/generations', tiny(1));
    expect(job.status).toBe(202);
    jobA = job.body.id;
    const batch = await A.post('/v1/batches', { defaults: tiny(2), items: [{}, { hyperparameters: { seed: 3 } }] });
    expect(batch.status).toBe(202);
    batchA = batch.body.id;
    const t = await A.post('/v1/trainings', train('style'));
    expect(t.status, JSON.stringify(t.body)).toBe(202);
    trainingA = t.body.id;
    const cache = await ADMIN.post('/v1/cache', { models: { base: 'stabilityai/stable-diffusion-xl-base-1.0' } });
    expect(cache.status).toBe(202);
    cacheId = cache.body.id;
    await done(A, jobA);
    await done(A, trainingA, '/v1/trainings');
  }, 120_000);
  afterAll(async () => {
    await farm.close();
    rmSync(dir, { recursive: true, force: true });
  });

  it("another tenant's id is a 404 exactly like an unknown id, on every route", async () => {
    const unknown = randomUUID();
    const cases: [string, string, string][] = [
      ['GET', '/v1/jobs', jobA],
      ['DELETE', '/v1/jobs', jobA],
      ['GET', '/v1/batches', batchA],
      ['DELETE', '/v1/batches', batchA],
      ['GET', '/v1/trainings', trainingA],
      ['DELETE', '/v1/trainings', trainingA],
      ['GET', '/v1/cache', cacheId],
    ];
    for (const [method, base, id] of cases) {
      const theirs = await farm.request(method, `${base}/${id}`, undefined, bearer(KEY_B));
      const none = await farm.request(method, `${base}/${unknown}`, undefined, bearer(KEY_B));
      expect(theirs.status, `${method} ${base}`).toBe(404);
      expect(theirs.body.error.code).toBe('not_found');
      expect(theirs.body.error.message.replace(id, 'ID')).toBe(none.body.error.message.replace(unknown, 'ID'));
      expect(JSON.stringify(theirs.body)).not.toContain('lighthouse');
    }
    // the owner and an admin see them
    expect((await A.get(`/v1/jobs/${jobA}`)).status).toBe(200);
    expect((await A.get(`/v1/batches/${batchA}`)).status).toBe(200);
    expect((await ADMIN.get(`/v1/jobs/${jobA}`)).body.client).toBe('acme');
    expect((await ADMIN.get(`/v1/cache/${cacheId}`)).status).toBe(200);
    // and B's cancel did nothing to A's batch
    expect((await A.get(`/v1/batches/${batchA}`)).body.cancel_requested).toBe(false);
  });

  it('an id that is not a UUID is a 404 before it reaches Redis (no WRONGTYPE 500)', async () => {
    for (const base of ['/v1/jobs', '/v1/batches', '/v1/trainings', '/v1/cache']) {
      for (const id of [`${jobA}:events`, `${jobA}:deliveries`, `${batchA}:events`, 'not-a-uuid', '*', `${jobA.toUpperCase()}`]) {
        const res = await ADMIN.get(`${base}/${encodeURIComponent(id)}`);
        expect(res.status, `${base}/${id}`).toBe(404);
        expect(res.body.error.code).toBe('not_found');
      }
    }
  });

  it('a client sees the fleet but not which job each agent runs; an admin does', async () => {
    const slow = await A.post('/v1/generations', tiny(9, { scheduler: { steps: 150 }, hyperparameters: { seed: 9, width: 1024, height: 1024 } }));
    await farm.waitFor(async () => (await ADMIN.get('/v1/agents')).body.agents.some((a: any) => a.current_job === slow.body.id), 20_000, 'the slow job runs');
    const seen = (await B.get('/v1/agents')).body.agents;
    expect(seen.length).toBe(1);
    expect(seen.every((a: any) => a.current_job === null)).toBe(true);
    expect([202, 409]).toContain((await A.del(`/v1/jobs/${slow.body.id}`)).status);
    await done(A, slow.body.id);
  });

  it('Bull Board and its JSON API are admin-only: a client key gets 403 and cannot pause a queue', async () => {
    for (const path of ['/admin/queues', '/admin/queues/api/queues', '/admin/queues/api/redis/stats']) {
      expect((await B.get(path)).status, path).toBe(403);
      expect((await farm.get(path, { authorization: '' })).status, path).toBe(401);
    }
    const basicClient = `Basic ${Buffer.from(`x:${KEY_B}`).toString('base64')}`;
    expect((await farm.get('/admin/queues', { authorization: basicClient })).status).toBe(403);
    expect((await farm.request('PUT', '/admin/queues/api/queues/webhooks/pause', undefined, bearer(KEY_B))).status).toBe(403);
    const queues = await ADMIN.get('/admin/queues/api/queues');
    expect(queues.status).toBe(200);
    expect(queues.body.queues.find((q: any) => q.name === 'webhooks').isPaused).toBe(false);
    const basicAdmin = `Basic ${Buffer.from(`ops:${KEY_ADMIN}`).toString('base64')}`;
    expect(String((await farm.get('/admin/queues', { authorization: basicAdmin })).body)).toContain('<html');
  });

  it('cache writes are admin-only; residency reads stay open to clients', async () => {
    const load = await B.post('/v1/cache', { models: { base: 'stabilityai/stable-diffusion-xl-base-1.0' }, pin: true });
    expect(load.status).toBe(403);
    expect(load.body.error.code).toBe('forbidden');
    expect((await B.del('/v1/cache', { models: ['stabilityai/stable-diffusion-xl-base-1.0'] })).status).toBe(403);
    expect((await B.get('/v1/cache')).status).toBe(200);
    expect((await B.get('/v1/models')).status).toBe(200);
  });

  it('S3 keys a client names stay within its tenant area, the shared prefixes and its own outputs', async () => {
    const outputKey = (await A.get(`/v1/jobs/${jobA}`)).body.outputs[0].key;
    const refused: [ReturnType<typeof as>, string][] = [
      [B, 'tenants/acme/init.png'],
      [B, outputKey],
      [A, 'tenants/bravo/secret.png'],
      [A, 'tenants/acme/../bravo/secret.png'],
      [A, 'tenants/acmeX/x.png'],
      [A, 'inputs/x/init.png'],
    ];
    for (const [who, key] of refused) {
      const res = await who.post('/v1/generations', tiny(4, { image: { init: { s3_key: key } } }));
      expect(res.status, key).toBe(400);
      expect(res.body.error.details).toEqual([expect.objectContaining({ field: 'image.init.s3_key', rule: expect.stringMatching(/outside_tenant_area|invalid_format/) })]);
    }
    for (const key of ['tenants/acme/init.png', 'shared/palette.png', outputKey]) {
      const res = await A.post('/v1/validate', tiny(4, { image: { init: { s3_key: key } } }));
      expect(res.status, `${key}: ${JSON.stringify(res.body)}`).toBe(200);
    }
    // a dataset prefix outside the area is refused without listing anything in it
    const dataset = await B.post('/v1/trainings', { ...train('peek'), dataset: { s3_prefix: 'outputs/' } });
    expect(dataset.status).toBe(400);
    expect(dataset.body.error.details[0]).toMatchObject({ field: 'dataset.s3_prefix', rule: 'outside_tenant_area' });
    expect(JSON.stringify(dataset.body)).not.toContain(jobA);
    const prefixTrick = await B.post('/v1/trainings', { ...train('peek'), dataset: { s3_prefix: 'tenants/bravo' } });
    expect(prefixTrick.body.error.details[0]).toMatchObject({ rule: 'outside_tenant_area' }); // "tenants/bravo" would also list "tenants/bravo2/"
    await put('tenants/bravo/manifest.json', Buffer.from(JSON.stringify([{ image: 'tenants/acme/datasets/kilns/0.png', caption: 'mine now' }])), 'application/json');
    const manifest = await B.post('/v1/trainings', { ...train('peek'), dataset: { manifest: 'tenants/bravo/manifest.json' } });
    expect(manifest.status).toBe(400);
    expect(manifest.body.error.details[0]).toMatchObject({ field: 'dataset.manifest', rule: 'outside_tenant_area' });
  });

  it("a trained LoRA is its tenant's: named <tenant>/<name>, usable by its short name, invisible to others until an admin shares it", async () => {
    const t = await A.get(`/v1/trainings/${trainingA}`);
    expect(t.body.status).toBe('succeeded');
    expect(t.body.training.lora.name).toBe('acme/style');
    expect((await A.get('/v1/loras')).body.trained.map((l: any) => l.name)).toContain('acme/style');
    expect((await B.get('/v1/loras')).body.trained.map((l: any) => l.name)).not.toContain('acme/style');

    const mine = await A.post('/v1/generations', tiny(5, { loras: [{ name: 'style' }] }));
    expect(mine.status, JSON.stringify(mine.body)).toBe(202);
    expect(mine.body.request.loras[0].name).toBe('acme/style');
    expect((await done(A, mine.body.id)).status).toBe('succeeded');

    for (const name of ['acme/style', 'style']) {
      const theirs = await B.post('/v1/generations', tiny(5, { loras: [{ name }] }));
      expect(theirs.status, name).toBe(422);
      expect(theirs.body.error.details[0]).toMatchObject({ field: 'loras.0.name', rule: 'unknown_model' });
    }
    expect((await B.post('/v1/loras/share', { name: 'acme/style' })).status).toBe(403);
    const shared = await ADMIN.post('/v1/loras/share', { name: 'acme/style' });
    expect(shared.status).toBe(200);
    expect(shared.body.shared).toBe(true);
    const now = await B.post('/v1/generations', tiny(5, { loras: [{ name: 'acme/style' }] }));
    expect(now.status).toBe(202);
    expect((await done(B, now.body.id)).status).toBe('succeeded');
    expect((await ADMIN.post('/v1/loras/share', { name: 'acme/nothing' })).status).toBe(404);
  });

  it('two tenants may use the same LoRA name; "a/b" and "a--b" never share a file; a name is reserved at submission', async () => {
    const [x, y] = await Promise.all([A.post('/v1/trainings', train('x/y', 11)), A.post('/v1/trainings', train('x--y', 12))]);
    expect([x.status, y.status]).toEqual([202, 202]);
    // the same name twice at once: exactly one wins, before either trains
    const race = await Promise.all([A.post('/v1/trainings', train('dup')), A.post('/v1/trainings', train('dup'))]);
    expect(race.map((r) => r.status).sort()).toEqual([202, 409]);
    expect(race.find((r) => r.status === 409)!.body.error.details[0]).toMatchObject({ field: 'output.name', rule: 'exists' });
    await put('tenants/bravo/datasets/d/0.png', await gradientPng(64, 64));
    await put('tenants/bravo/datasets/d/0.txt', Buffer.from('a bravo kiln'), 'text/plain');
    const bStyle = await B.post('/v1/trainings', { ...train('style', 21), dataset: { s3_prefix: 'tenants/bravo/datasets/d/' } });
    expect(bStyle.status, JSON.stringify(bStyle.body)).toBe(202);
    for (const id of [x.body.id, y.body.id, race.find((r) => r.status === 202)!.body.id]) expect((await done(A, id, '/v1/trainings')).status).toBe('succeeded');
    expect((await done(B, bStyle.body.id, '/v1/trainings')).training.lora.name).toBe('bravo/style');

    const loras = (await ADMIN.get('/v1/loras')).body.trained;
    const byName = (n: string) => loras.find((l: any) => l.name === n);
    expect(byName('acme/x/y').key).not.toBe(byName('acme/x--y').key);
    expect(byName('acme/x/y').sha256).not.toBe(byName('acme/x--y').sha256);
    expect(byName('bravo/style').key).not.toBe(byName('acme/style').key);
    // each generation gets its own LoRA's effect: different LoRAs, different images
    const outs = [];
    for (const name of ['x/y', 'x--y']) {
      const g = await A.post('/v1/generations', tiny(6, { loras: [{ name }] }));
      outs.push((await done(A, g.body.id)).outputs[0].sha256);
    }
    expect(outs[0]).not.toBe(outs[1]);
    const bGen = await B.post('/v1/generations', tiny(6, { loras: [{ name: 'style' }] }));
    expect(bGen.body.request.loras[0].name).toBe('bravo/style');
  });

  it('an agent refuses a LoRA whose bytes no longer match the sha256 the registry recorded', async () => {
    const t = await A.post('/v1/trainings', train('tampered', 31));
    await done(A, t.body.id, '/v1/trainings');
    const lora = (await A.get('/v1/loras')).body.trained.find((l: any) => l.name === 'acme/tampered');
    await put(lora.key, Buffer.from('not the trained weights'), 'application/octet-stream');
    const g = await A.post('/v1/generations', tiny(7, { loras: [{ name: 'tampered' }] }));
    const rec = await done(A, g.body.id);
    expect(rec.status).toBe('failed');
    expect(rec.error.code).toBe('integrity_failed');
    expect(rec.error.message).toContain('acme/tampered');
    expect(rec.attempt).toBe(1); // another try would read the same bytes
  });

  it('training captions are text: a lone surrogate or a control character is a 400, Windows line ends are fine', async () => {
    await put('tenants/acme/m/bad.json', Buffer.from('[{"image":"tenants/acme/datasets/kilns/0.png","caption":"a \\ud800 kiln"}]'), 'application/json');
    const manifest = await A.post('/v1/trainings', { ...train('caps-1'), dataset: { manifest: 'tenants/acme/m/bad.json' } });
    expect(manifest.status).toBe(400);
    expect(manifest.body.error.details[0]).toMatchObject({ field: 'dataset.manifest', rule: 'invalid_manifest' });
    await put('tenants/acme/caps/0.png', await gradientPng(64, 64));
    await put('tenants/acme/caps/0.txt', Buffer.from('a kiln\u0007 that beeps'), 'text/plain');
    const bell = await A.post('/v1/trainings', { ...train('caps-2'), dataset: { s3_prefix: 'tenants/acme/caps/' } });
    expect(bell.status).toBe(400);
    expect(bell.body.error.details[0]).toMatchObject({ field: 'dataset.s3_prefix', rule: 'control_character' });
    await put('tenants/acme/caps/0.txt', Buffer.from('a kiln\r\nat dusk\r\n'), 'text/plain');
    const ok = await A.post('/v1/trainings', { ...train('caps-3'), dataset: { s3_prefix: 'tenants/acme/caps/' } });
    expect(ok.status, JSON.stringify(ok.body)).toBe(202);
    expect(ok.body.request.dataset.items[0].caption).toBe('a kiln\nat dusk');
    await A.del(`/v1/trainings/${ok.body.id}`);
  });

  it('a bare key is its own tenant; the keys file authenticates by hash alone', async () => {
    const bare = await as(BARE).post('/v1/generations', tiny(8));
    expect(bare.status).toBe(202);
    expect(bare.body.client).toMatch(/^t-[0-9a-f]{12}$/);
    expect((await A.get(`/v1/jobs/${bare.body.id}`)).status).toBe(404);
    expect((await C.get('/v1/models')).status).toBe(200);
  });

  it('Idempotency-Key: the same body replays, a different body is a 422, another tenant is independent', async () => {
    const key = `idem-${randomUUID()}`;
    const first = await A.post('/v1/generations', tiny(10), { 'idempotency-key': key });
    const again = await A.post('/v1/generations', tiny(10), { 'idempotency-key': key });
    expect(first.status).toBe(202);
    expect(again.status).toBe(200);
    expect(again.body.id).toBe(first.body.id);
    const other = await A.post('/v1/generations', tiny(11), { 'idempotency-key': key });
    expect(other.status).toBe(422);
    expect(other.body.error).toMatchObject({ code: 'idempotency_mismatch', details: [{ field: 'Idempotency-Key', rule: 'different_body' }] });
    const theirs = await B.post('/v1/generations', tiny(10), { 'idempotency-key': key });
    expect(theirs.status).toBe(202);
    expect(theirs.body.id).not.toBe(first.body.id);
  });

  it('a tenant over its queued-jobs quota gets 429 naming the limit; others are unaffected', async () => {
    const long = () => C.post('/v1/generations', tiny(12, { scheduler: { steps: 150 } }));
    const [one, two] = [await long(), await long()];
    expect([one.status, two.status]).toEqual([202, 202]);
    const three = await long();
    expect(three.status).toBe(429);
    expect(three.body.error).toMatchObject({ code: 'quota_exceeded', details: [{ rule: 'max_queued_jobs' }] });
    expect(three.body.error.message).toContain('2');
    const batch = await C.post('/v1/batches', { defaults: tiny(1), items: [{}] });
    expect(batch.status).toBe(429);
    expect((await A.post('/v1/generations', tiny(13))).status).toBe(202);
    // once one ends, the tenant may queue again
    await C.del(`/v1/jobs/${one.body.id}`);
    await done(C, one.body.id);
    expect((await long()).status).toBe(202);
    for (const id of [two.body.id]) await C.del(`/v1/jobs/${id}`);
  });

  it('requests per minute: 429 with Retry-After, counted in Redis across API instances, per tenant', async () => {
    // a second API process on the same Redis: the tenant's count is shared
    const port2 = await freePort();
    farm.spawn('api-2', ENTRY.api, { PORT: String(port2) });
    const api2 = `http://127.0.0.1:${port2}`;
    await farm.waitFor(async () => (await fetch(`${api2}/healthz`).catch(() => null))?.ok === true, 30_000, 'second API up');
    await sleep(0);
    const statuses: number[] = [];
    let limited: Response | null = null;
    for (let i = 0; i < 40 && !limited; i++) {
      const res = await fetch(`${i % 2 ? api2 : farm.api}/v1/models`, { headers: bearer(KEY_C) });
      statuses.push(res.status);
      if (res.status === 429) limited = res;
    }
    expect(limited, `statuses: ${statuses.join(',')}`).not.toBeNull();
    // charlie's limit is 30 a minute, and about half the requests went to each instance
    expect(statuses.length).toBeLessThanOrEqual(31);
    expect(Number(limited!.headers.get('retry-after'))).toBeGreaterThan(0);
    const body = (await limited!.json()) as any;
    expect(body.error).toMatchObject({ code: 'rate_limited', details: [{ rule: 'requests_per_minute' }] });
    // another tenant is not slowed, and health is never limited
    expect((await A.get('/v1/models')).status).toBe(200);
    expect((await fetch(`${api2}/healthz`)).status).toBe(200);
  });
});
