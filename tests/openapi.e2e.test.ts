import { randomUUID } from 'node:crypto';
import { Validator } from '@seriousme/openapi-schema-validator';
import { createJobServices, createLogger, parseEnvOrThrow } from '@kiln/runtime';
import { Client } from 'minio';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { buildApp, type RegisteredRoute } from '../apps/api/src/app.js';
import { ApiEnv } from '../apps/api/src/env.js';
import { KeyRing } from '../apps/api/src/keys.js';
import { REQUEST_EXAMPLES } from '../apps/api/src/openapi-examples.js';
import { undocumented } from '../apps/api/src/plugins/openapi.js';
import { basicRequest, Farm, REDIS_URL } from './support/farm.js';
import { gradientPng } from './support/images.js';
import { OpenApiChecker } from './support/openapi.js';

/**
 * The OpenAPI document: a valid OpenAPI 3.1 document that lists every route the API registers,
 * with the auth scheme and error responses, and whose schemas the real responses of a running
 * farm match — the success and the error ones. /docs renders from assets Kiln serves itself.
 */

const KEY_A = 'acme-openapi-key-0123456789';
const KEY_ADMIN = 'ops-openapi-key-0123456789';
const bearer = (k: string) => ({ authorization: `Bearer ${k}` });
const toOpenApiPath = (url: string) => url.replace(/:(\w+)/g, '{$1}');

describe('the document, from the app as built', () => {
  let routes: RegisteredRoute[] = [];
  let doc: any;
  let close = async () => {};
  beforeAll(async () => {
    const env = parseEnvOrThrow(ApiEnv, {
      REDIS_URL,
      KILN_PREFIX: `kiln-test-${randomUUID().slice(0, 8)}`,
      API_KEYS: `acme:${KEY_A}`,
      ADMIN_API_KEYS: `ops:${KEY_ADMIN}`,
      S3_ENDPOINT: 'http://127.0.0.1:9', // never reached: the document needs no storage
    });
    const services = createJobServices(env, 'kiln-openapi-test');
    const built = await buildApp({ env, log: createLogger('api', 'silent'), ring: KeyRing.from(env), ...services });
    await built.app.ready();
    routes = built.routes.filter((r) => r.method !== 'HEAD' && r.method !== 'OPTIONS');
    const res = await built.app.inject({ method: 'GET', url: '/openapi.json' });
    expect(res.statusCode).toBe(200);
    doc = res.json();
    close = async () => {
      await built.close();
      await services.close();
    };
  });
  afterAll(() => close());

  it('is a valid OpenAPI 3.1 document', async () => {
    expect(doc.openapi).toBe('3.1.0');
    const result = await new Validator().validate(doc);
    expect(result.errors ?? [], JSON.stringify(result.errors)).toEqual([]);
    expect(result.valid).toBe(true);
  });

  it('lists every registered route but the reference page and Bull Board internals', () => {
    const missing: string[] = [];
    const listed = routes.filter((r) => !undocumented(r.url));
    for (const r of listed) if (!doc.paths[toOpenApiPath(r.url)]?.[r.method.toLowerCase()]) missing.push(`${r.method} ${r.url}`);
    expect(missing).toEqual([]);
    // and nothing else: the document does not invent routes
    const documented = Object.entries<Record<string, unknown>>(doc.paths).flatMap(([p, ops]) => Object.keys(ops).map((m) => `${m.toUpperCase()} ${p}`));
    expect(documented.sort()).toEqual([...new Set(listed.map((r) => `${r.method} ${toOpenApiPath(r.url)}`))].sort());
    // the exclusions are what they claim to be
    expect(routes.filter((r) => undocumented(r.url)).every((r) => r.url.startsWith('/docs') || r.url.startsWith('/admin/queues/'))).toBe(true);
  });

  it('documents, on every operation, a summary, a success response with a schema, the auth scheme and the errors auth produces', () => {
    const problems: string[] = [];
    for (const [path, ops] of Object.entries<Record<string, any>>(doc.paths)) {
      for (const [method, op] of Object.entries<any>(ops)) {
        const name = `${method.toUpperCase()} ${path}`;
        if (!op.summary) problems.push(`${name}: no summary`);
        const ok = Object.entries<any>(op.responses).filter(([s]) => s.startsWith('2'));
        if (!ok.length) problems.push(`${name}: no success response`);
        for (const [s, r] of ok) if (!Object.values<any>(r.content ?? {}).some((m) => m.schema)) problems.push(`${name} ${s}: no schema`);
        for (const [s, r] of Object.entries<any>(op.responses)) if (!r.description || r.description === 'Default Response') problems.push(`${name} ${s}: no description`);
        const route = routes.find((r) => toOpenApiPath(r.url) === path || (path === '/admin/queues' && r.url === '/admin/queues'));
        const isPublic = route?.auth === 'public';
        if (isPublic) {
          if (JSON.stringify(op.security) !== '[]') problems.push(`${name}: public but documented with security`);
        } else {
          if (!op.security?.some((s: object) => 'bearer' in s)) problems.push(`${name}: no bearer security`);
          if (op.responses['401']?.content?.['application/json']?.schema?.$ref !== '#/components/schemas/Error') problems.push(`${name}: no 401 Error`);
        }
        if ((route?.auth === 'admin' || path.startsWith('/admin')) && !op.responses['403']) problems.push(`${name}: admin route without 403`);
        if (op.requestBody && !op.responses['400']) problems.push(`${name}: a body without 400`);
      }
    }
    expect(problems).toEqual([]);
    expect(doc.components.securitySchemes.bearer).toMatchObject({ type: 'http', scheme: 'bearer' });
  });

  it("every example is a request its operation's documented schema accepts", () => {
    const checker = new OpenApiChecker(doc);
    let n = 0;
    for (const [key, examples] of Object.entries(REQUEST_EXAMPLES)) {
      const [method, path] = key.split(' ') as [string, string];
      const media = doc.paths[toOpenApiPath(path)][method.toLowerCase()].requestBody.content['application/json'];
      expect(Object.keys(media.examples)).toEqual(Object.keys(examples));
      for (const ex of Object.values(examples)) {
        checker.checkRequest(method, path, ex.value);
        n++;
      }
    }
    expect(n).toBeGreaterThanOrEqual(8);
  });
});

describe('a running farm answers as documented', () => {
  const farm = new Farm({ agents: 1, apiKey: KEY_A, env: { API_KEYS: `acme:${KEY_A}`, ADMIN_API_KEYS: `ops:${KEY_ADMIN}`, KILN_SYNTHETIC_TRAIN_STEP_MS: '20' } });
  let checker: OpenApiChecker;
  const seen = new Set<string>();
  /** A request whose answer must match the document (status listed, body valid). */
  const call = async (method: string, path: string, body?: unknown, key: string | null = KEY_A, headers: Record<string, string> = {}) => {
    const res = await farm.request(method, path, body, { ...(key ? bearer(key) : { authorization: '' }), ...headers });
    checker.check(method, path, res.status, res.body, res.headers.get('content-type') ?? '');
    seen.add(`${method} ${checker.operation(method, path).path} ${res.status}`);
    return res;
  };
  const tiny = (seed: number) => basicRequest({ scheduler: { type: 'EulerDiscreteScheduler', steps: 2 }, hyperparameters: { seed, width: 64, height: 64 } });
  const untilDone = async (path: string, key = KEY_A) => {
    let rec: any;
    await farm.waitFor(async () => ['succeeded', 'failed', 'canceled', 'partially_succeeded'].includes((rec = (await call('GET', path, undefined, key)).body).status), 60_000, `${path} ends`);
    return rec;
  };

  beforeAll(async () => {
    await farm.start();
    const res = await fetch(`${farm.api}/openapi.json`);
    expect(res.status).toBe(200);
    checker = new OpenApiChecker(await res.json());
    const s3 = new Client({ endPoint: '127.0.0.1', port: Number(new URL(farm.s3.endpoint).port), useSSL: false, accessKey: farm.s3.accessKey, secretKey: farm.s3.secretKey, pathStyle: true, region: 'us-east-1' });
    for (let i = 0; i < 2; i++) {
      const png = await gradientPng(64, 64);
      await s3.putObject('kiln-test', `tenants/acme/datasets/d/${i}.png`, png, png.length, { 'Content-Type': 'image/png' });
      await s3.putObject('kiln-test', `tenants/acme/datasets/d/${i}.txt`, Buffer.from(`kiln ${i}`), 9, { 'Content-Type': 'text/plain' });
    }
  }, 120_000);
  afterAll(() => farm.close());

  it('every route, on its successes and its errors', async () => {
    const unknown = randomUUID();
    // health and the document itself, without a key
    await call('GET', '/healthz', undefined, null);
    await call('GET', '/readyz', undefined, null);
    await call('GET', '/openapi.json', undefined, null);
    // auth
    await call('GET', '/v1/agents', undefined, null);
    await call('GET', '/v1/agents', undefined, 'not-a-key-not-a-key-00');
    await call('POST', '/v1/cache', { models: { base: 'stabilityai/stable-diffusion-xl-base-1.0' } });
    // the farm
    await call('GET', '/v1/agents');
    await call('GET', '/v1/agents', undefined, KEY_ADMIN);
    await call('GET', '/v1/capabilities');
    await call('GET', '/v1/models');
    await call('GET', '/v1/cache');
    await call('GET', '/v1/loras');
    // generations
    expect((await call('POST', '/v1/validate', tiny(1))).status).toBe(200);
    expect((await call('POST', '/v1/validate', basicRequest({ model: { base: 'no/such-model' } }))).status).toBe(422);
    expect((await call('POST', '/v1/generations', { ...tiny(1), extra: 1 })).status).toBe(400);
    expect((await call('POST', '/v1/generations', '<x/>', KEY_A, { 'content-type': 'application/xml' })).status).toBe(415);
    const job = await call('POST', '/v1/generations', tiny(2), KEY_A, { 'idempotency-key': 'openapi-1' });
    expect(job.status).toBe(202);
    expect((await call('POST', '/v1/generations', tiny(2), KEY_A, { 'idempotency-key': 'openapi-1' })).status).toBe(200);
    expect((await call('POST', '/v1/generations', tiny(3), KEY_A, { 'idempotency-key': 'openapi-1' })).status).toBe(422);
    const done = await untilDone(`/v1/jobs/${job.body.id}`);
    expect(done.status).toBe('succeeded');
    expect(done.outputs).toHaveLength(1);
    expect((await call('DELETE', `/v1/jobs/${job.body.id}`)).status).toBe(409);
    expect((await call('GET', `/v1/jobs/${unknown}`)).status).toBe(404);
    expect((await call('GET', '/v1/jobs/not-an-id')).status).toBe(404);
    const long = await call('POST', '/v1/generations', { ...tiny(4), scheduler: { steps: 150 } });
    expect((await call('DELETE', `/v1/jobs/${long.body.id}`)).status).toBeOneOf([200, 202]);
    // batches
    const batch = await call('POST', '/v1/batches', { defaults: tiny(5), items: [{}, { hyperparameters: { seed: 6 } }] });
    expect(batch.status).toBe(202);
    expect((await untilDone(`/v1/batches/${batch.body.id}`)).status).toBe('succeeded');
    expect((await call('DELETE', `/v1/batches/${batch.body.id}`)).status).toBe(409);
    expect((await call('GET', `/v1/batches/${unknown}`)).status).toBe(404);
    // cache (admin)
    const cache = await call('POST', '/v1/cache', { models: { base: 'stabilityai/stable-diffusion-xl-base-1.0' } }, KEY_ADMIN);
    expect(cache.status).toBe(202);
    await untilDone(`/v1/cache/${cache.body.id}`, KEY_ADMIN);
    expect((await call('DELETE', '/v1/cache', { models: ['stabilityai/stable-diffusion-xl-base-1.0'] }, KEY_ADMIN)).status).toBe(202);
    expect((await call('DELETE', '/v1/cache', { models: ['no/such-model'] }, KEY_ADMIN)).status).toBe(200);
    // trainings and LoRAs
    const training = await call('POST', '/v1/trainings', {
      base_model: 'stabilityai/stable-diffusion-xl-base-1.0',
      dataset: { s3_prefix: 'tenants/acme/datasets/d/' },
      output: { name: 'openapi-style' },
      hyperparameters: { rank: 4, steps: 4, checkpoint_every: 2, resolution: 256, seed: 1 },
    });
    expect(training.status, JSON.stringify(training.body)).toBe(202);
    expect((await untilDone(`/v1/trainings/${training.body.id}`)).status).toBe('succeeded');
    expect((await call('DELETE', `/v1/trainings/${training.body.id}`)).status).toBe(409);
    expect((await call('POST', '/v1/trainings', { ...training.body.request, dataset: { s3_prefix: 'tenants/acme/datasets/d/' } })).status).toBe(409);
    expect((await call('GET', '/v1/loras')).body.trained.map((l: { name: string }) => l.name)).toContain('acme/openapi-style');
    expect((await call('POST', '/v1/loras/share', { name: 'acme/openapi-style' }, KEY_ADMIN)).status).toBe(200);
    expect((await call('POST', '/v1/loras/share', { name: 'acme/nothing' }, KEY_ADMIN)).status).toBe(404);

    // the statuses above reached every kind of answer the API gives
    for (const s of ['GET /healthz 200', 'GET /v1/agents 401', 'POST /v1/cache 403', 'POST /v1/generations 202', 'POST /v1/generations 400', 'POST /v1/generations 415', 'POST /v1/generations 422', 'POST /v1/validate 422', 'GET /v1/jobs/{id} 404', 'DELETE /v1/jobs/{id} 409', 'POST /v1/trainings 409'])
      expect([...seen]).toContain(s);
  }, 180_000);

  it('/docs renders from assets the farm serves itself (works offline)', async () => {
    const page = await fetch(`${farm.api}/docs/`);
    expect(page.status).toBe(200);
    expect(page.headers.get('content-type')).toContain('text/html');
    const html = await page.text();
    const assets = [...html.matchAll(/(?:src|href)="([^"]+)"/g)].map((m) => m[1]!);
    expect(assets.length).toBeGreaterThanOrEqual(4);
    for (const a of assets) {
      expect(a, 'no asset from another host').not.toMatch(/^(https?:)?\/\//);
      const res = await fetch(new URL(a, `${farm.api}/docs/`));
      expect(res.status, a).toBe(200);
      const text = await res.text();
      if (a.endsWith('swagger-initializer.js')) expect(text).toContain("resolveUrl('./json')");
    }
    expect(html).toContain('swagger-ui-bundle.js');
    // the page loads the same document
    const json = await fetch(`${farm.api}/docs/json`);
    expect(json.status).toBe(200);
    expect(((await json.json()) as { paths: unknown }).paths).toEqual(checker.doc.paths);
    // /docs without the slash answers too
    expect((await fetch(`${farm.api}/docs`)).status).toBe(200);
  });
});
