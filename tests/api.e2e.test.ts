import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { basicRequest, Farm } from './support/farm.js';

/** Bad input a client can send: every case a clear 4xx naming the field and rule. */
describe('the API refuses bad requests clearly', () => {
  const farm = new Farm({ agents: 1, env: { WEBHOOK_ALLOW_PRIVATE: 'false' } });
  beforeAll(() => farm.start());
  afterAll(() => farm.close());

  const cases: Array<[string, unknown, string, string]> = [
    ['width not a multiple of 8', basicRequest({ hyperparameters: { width: 513, height: 512 } }), 'hyperparameters.width', 'not_multiple_of'],
    ['width too large', basicRequest({ hyperparameters: { width: 4096, height: 512 } }), 'hyperparameters.width', 'too_big'],
    ['zero steps', basicRequest({ scheduler: { type: 'EulerDiscreteScheduler', steps: 0 } }), 'scheduler.steps', 'too_small'],
    ['guidance too high', basicRequest({ hyperparameters: { guidance_scale: 99 } }), 'hyperparameters.guidance_scale', 'too_big'],
    ['seed negative', basicRequest({ hyperparameters: { seed: -1 } }), 'hyperparameters.seed', 'too_small'],
    ['empty prompt', basicRequest({ conditioning: { prompt: '   ' } }), 'conditioning.prompt', 'too_small'],
    ['missing prompt', basicRequest({ conditioning: {} }), 'conditioning.prompt', 'invalid_type'],
    ['missing model', { conditioning: { prompt: 'x' } }, 'model', 'invalid_type'],
    ['unknown scheduler', basicRequest({ scheduler: { type: 'MagicScheduler', steps: 4 } }), 'scheduler.type', 'invalid_value'],
    ['a feature not built yet (loras)', basicRequest({ loras: [{ name: 'x', weight: 1 }] }), 'loras', 'unrecognized_keys'],
    ['a nested unknown field', basicRequest({ model: { base: 'stabilityai/stable-diffusion-xl-base-1.0', refiner: 'r' } }), 'model.refiner', 'unrecognized_keys'],
    ['jpeg output (not yet)', basicRequest({ output: { format: 'jpeg' } }), 'output.format', 'invalid_value'],
    ['bad priority', basicRequest({ priority: 'urgent' }), 'priority', 'invalid_value'],
    ['timeout too long', basicRequest({ timeout_s: 10 ** 7 }), 'timeout_s', 'too_big'],
    ['webhook not http', basicRequest({ webhook: { url: 'ftp://example.com/x' } }), 'webhook.url', 'invalid_format'],
    ['unknown webhook event', basicRequest({ webhook: { url: 'https://example.com/x', events: ['finished'] } }), 'webhook.events.0', 'invalid_value'],
    ['webhook to loopback', basicRequest({ webhook: { url: 'http://127.0.0.1:9/hook' } }), 'webhook.url', 'private_address'],
    ['webhook to cloud metadata', basicRequest({ webhook: { url: 'http://169.254.169.254/latest' } }), 'webhook.url', 'private_address'],
  ];
  it.each(cases)('%s → 400 naming the field', async (_name, body, field, rule) => {
    const res = await farm.request('POST', '/v1/generations', body);
    expect(res.status).toBe(400);
    expect(res.body.error.code).toBe('validation_failed');
    expect(res.body.error.details).toEqual(expect.arrayContaining([expect.objectContaining({ field, rule })]));
    expect(res.body.error.message).toContain(field);
  });

  it('a body that is not JSON → 400', async () => {
    const res = await farm.request('POST', '/v1/generations', '{"model": ');
    expect(res.status).toBe(400);
    expect(res.body.error.code).toBe('validation_failed');
  });

  it('a body over the size limit → 413', async () => {
    const res = await farm.request('POST', '/v1/generations', basicRequest({ conditioning: { prompt: 'x'.repeat(2 * 1024 * 1024) } }));
    expect(res.status).toBe(413);
    expect(res.body.error.code).toBe('payload_too_large');
  });

  it('a model no live agent can run → 422 naming the model, and nothing is queued', async () => {
    const res = await farm.request('POST', '/v1/generations', basicRequest({ model: { base: 'acme/not-a-model' } }));
    expect(res.status).toBe(422);
    expect(res.body.error.code).toBe('unschedulable');
    expect(res.body.error.details[0]).toMatchObject({ field: 'model.base', rule: 'unknown_model' });
    expect(res.body.error.details[0].message).toContain('stabilityai/stable-diffusion-xl-base-1.0');
  });

  it('a request needing more VRAM than any GPU has → 422', async () => {
    const res = await farm.request('POST', '/v1/generations', basicRequest({ hyperparameters: { width: 2048, height: 2048, num_images: 8 } }));
    expect(res.status).toBe(422);
    expect(res.body.error.details[0]).toMatchObject({ field: 'hyperparameters', rule: 'exceeds_vram' });
  });

  it('an unknown job id → 404, and cancel of it → 404', async () => {
    expect((await farm.get('/v1/jobs/00000000-0000-0000-0000-000000000000')).status).toBe(404);
    const del = await farm.request('DELETE', '/v1/jobs/nope');
    expect(del.status).toBe(404);
    expect(del.body.error.code).toBe('not_found');
  });

  it('an unknown route → 404 in the same error shape', async () => {
    const res = await farm.get('/v1/nothing-here');
    expect(res.status).toBe(404);
    expect(res.body.error.code).toBe('not_found');
  });

  it('the same Idempotency-Key returns the same job instead of a second one', async () => {
    const headers = { 'idempotency-key': `k-${Date.now()}` };
    const a = await farm.request('POST', '/v1/generations', basicRequest(), headers);
    const b = await farm.request('POST', '/v1/generations', basicRequest(), headers);
    expect(a.status).toBe(202);
    expect(b.status).toBe(200);
    expect(b.headers.get('idempotent-replayed')).toBe('true');
    expect(b.body.id).toBe(a.body.id);
  });

  it('cancelling a finished job → 409', async () => {
    const job = await farm.submit(basicRequest());
    await farm.waitForDone(job.id);
    const res = await farm.request('DELETE', `/v1/jobs/${job.id}`);
    expect(res.status).toBe(409);
    expect(res.body.error.code).toBe('conflict');
  });
});

describe('API keys', () => {
  const key = 'test-key-0123456789abcdef';
  const farm = new Farm({ agents: 0, env: { API_KEYS: `${key},second-key-0123456789abcdef` } });
  beforeAll(() => farm.start());
  afterAll(() => farm.close());

  it('every /v1 route needs a valid bearer key', async () => {
    const none = await farm.get('/v1/agents');
    expect(none.status).toBe(401);
    expect(none.body.error.code).toBe('unauthorized');
    expect((await farm.get('/v1/agents', { authorization: 'Bearer wrong-key-0123456789' })).status).toBe(401);
    expect((await farm.get('/v1/agents', { authorization: `Bearer ${key}` })).status).toBe(200);
    expect((await farm.get('/v1/models', { authorization: 'Bearer second-key-0123456789abcdef' })).status).toBe(200);
    expect((await farm.request('POST', '/v1/generations', basicRequest())).status).toBe(401);
    expect((await farm.request('DELETE', '/v1/jobs/x')).status).toBe(401);
  });

  it('health stays open for load balancers', async () => {
    expect((await farm.get('/healthz')).status).toBe(200);
  });

  it('Bull Board needs the key, as a bearer token or a basic-auth password, and shows every Kiln queue', async () => {
    const none = await farm.get('/admin/queues');
    expect(none.status).toBe(401);
    expect(none.headers.get('www-authenticate')).toContain('Basic');
    const basic = `Basic ${Buffer.from(`admin:${key}`).toString('base64')}`;
    const page = await farm.get('/admin/queues', { authorization: basic });
    expect(page.status).toBe(200);
    expect(String(page.body)).toContain('<html');
    const wrongBasic = `Basic ${Buffer.from('admin:nope').toString('base64')}`;
    expect((await farm.get('/admin/queues', { authorization: wrongBasic })).status).toBe(401);
    const queues = await farm.get('/admin/queues/api/queues', { authorization: `Bearer ${key}` });
    expect(queues.status).toBe(200);
    const names = queues.body.queues.map((q: any) => q.name);
    expect(names).toEqual(expect.arrayContaining(['intake', 'webhooks']));
  });
});
