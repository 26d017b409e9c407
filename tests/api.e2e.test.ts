import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import sharp from 'sharp';
import { basicRequest, Farm } from './support/farm.js';
import { b64, gradientPng, maskPng } from './support/images.js';

/** Bad input a client can send: every case a clear 4xx naming the field and rule. */
describe('the API refuses bad requests clearly', () => {
  const farm = new Farm({ agents: 1, env: { WEBHOOK_ALLOW_PRIVATE: 'false', KILN_SYNTHETIC_NO_BF16: '1', BODY_LIMIT_BYTES: String(2 * 1024 * 1024) } });
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
    ['an unknown top-level field', basicRequest({ styles: ['x'] }), 'styles', 'unrecognized_keys'],
    ['a nested unknown field', basicRequest({ model: { base: 'stabilityai/stable-diffusion-xl-base-1.0', unet: 'r' } }), 'model.unet', 'unrecognized_keys'],
    ['gif output', basicRequest({ output: { format: 'gif' } }), 'output.format', 'invalid_value'],
    ['jpeg quality 0', basicRequest({ output: { format: 'jpeg', quality: 0 } }), 'output.quality', 'too_small'],
    ['Karras sigmas on Euler a', basicRequest({ scheduler: { type: 'Euler a', use_karras_sigmas: true } }), 'scheduler.use_karras_sigmas', 'unsupported_option'],
    ['Karras sigmas on DDIM', basicRequest({ scheduler: { type: 'DDIMScheduler', use_karras_sigmas: true } }), 'scheduler.use_karras_sigmas', 'unsupported_option'],
    ['an algorithm type on Euler', basicRequest({ scheduler: { type: 'EulerDiscreteScheduler', algorithm_type: 'dpmsolver++' } }), 'scheduler.algorithm_type', 'unsupported_option'],
    ['an SDE algorithm the singlestep solver lacks', basicRequest({ scheduler: { type: 'DPMSolverSinglestepScheduler', algorithm_type: 'sde-dpmsolver' } }), 'scheduler.algorithm_type', 'unsupported_option'],
    ['timestep spacing on DPM++ SDE', basicRequest({ scheduler: { type: 'DPM++ SDE', timestep_spacing: 'trailing' } }), 'scheduler.timestep_spacing', 'unsupported_option'],
    ['solver order on Heun', basicRequest({ scheduler: { type: 'HeunDiscreteScheduler', solver_order: 2 } }), 'scheduler.solver_order', 'unsupported_option'],
    ['an unknown alias', basicRequest({ scheduler: { type: 'DPM fast' } }), 'scheduler.type', 'invalid_value'],
    ['refiner options without a refiner', basicRequest({ refiner: { denoising_switch: 0.8 } }), 'refiner', 'requires_model_refiner'],
    ['refiner switch too early', basicRequest({ model: { base: 'b', refiner: 'r' }, refiner: { denoising_switch: 0.2 } }), 'refiner.denoising_switch', 'too_small'],
    ['refiner with ControlNets', basicRequest({ model: { base: 'b', refiner: 'r' }, controlnets: [{ type: 'canny', image: { s3_key: 'x.png' } }] }), 'model.refiner', 'unsupported_combination'],
    ['LoRA weight above 2', basicRequest({ loras: [{ name: 'l', weight: 2.5 }] }), 'loras.0.weight', 'too_big'],
    ['the same LoRA twice', basicRequest({ loras: [{ name: 'l' }, { name: 'l' }] }), 'loras', 'custom'],
    ['nine LoRAs', basicRequest({ loras: Array.from({ length: 9 }, (_, i) => ({ name: `l${i}` })) }), 'loras', 'too_big'],
    ['an unknown ControlNet type', basicRequest({ controlnets: [{ type: 'pose3d', image: { s3_key: 'x.png' } }] }), 'controlnets.0.type', 'invalid_value'],
    ['a ControlNet guidance window that ends before it starts', basicRequest({ controlnets: [{ type: 'canny', image: { s3_key: 'x.png' }, guidance_start: 0.6, guidance_end: 0.4 }] }), 'controlnets.0.guidance_end', 'must_exceed_start'],
    ['preprocessing a depth map', basicRequest({ controlnets: [{ type: 'depth', image: { s3_key: 'x.png' }, preprocess: true }] }), 'controlnets.0.preprocess', 'preprocess_unsupported'],
    ['five ControlNets', basicRequest({ controlnets: Array.from({ length: 5 }, () => ({ type: 'canny', image: { s3_key: 'x.png' } })) }), 'controlnets', 'too_big'],
    ['an image given two ways', basicRequest({ image: { init: { s3_key: 'a.png', url: 'https://example.com/a.png' } } }), 'image.init', 'exactly_one'],
    ['an image given no way', basicRequest({ image: { init: {} } }), 'image.init', 'exactly_one'],
    ['a mask without an init image', basicRequest({ image: { mask: { s3_key: 'm.png' } } }), 'image.init', 'invalid_type'],
    ['img2img with no denoising step left', basicRequest({ scheduler: { steps: 4 }, image: { init: { s3_key: 'a.png' }, strength: 0.2 } }), 'image.strength', 'no_denoising_steps'],
    ['strength 0', basicRequest({ image: { init: { s3_key: 'a.png' }, strength: 0 } }), 'image.strength', 'too_small'],
    ['an S3 key with odd characters', basicRequest({ image: { init: { s3_key: 'a b.png' } } }), 'image.init.s3_key', 'invalid_format'],
    ['upscale ×3', basicRequest({ postprocess: { upscale: { factor: 3 } } }), 'postprocess.upscale.factor', 'invalid_value'],
    ['an unknown dtype', basicRequest({ performance: { dtype: 'int8' } }), 'performance.dtype', 'invalid_value'],
    ['an unknown offload mode', basicRequest({ performance: { cpu_offload: 'disk' } }), 'performance.cpu_offload', 'invalid_value'],
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

  it.each([
    ['not base64', { base64: '###not-base64###' }, 'image.init.base64', 'invalid_base64', 400],
    ['corrupt bytes', { base64: Buffer.from('this is not an image at all').toString('base64') }, 'image.init.base64', 'image_unreadable', 400],
    ['a truncated PNG', 'truncated', 'image.init.base64', 'image_unreadable', 400],
    ['a GIF', 'gif', 'image.init.base64', 'image_format', 400],
    ['a 5000-pixel-wide image', 'huge', 'image.init.base64', 'image_too_large', 413],
    ['a missing S3 key', { s3_key: 'uploads/none.png' }, 'image.init.s3_key', 'image_not_found', 400],
    ['a private URL', { url: 'http://127.0.0.1:9/x.png' }, 'image.init.url', 'private_address', 400],
  ])('an input image that is %s → %s naming the field', async (_what, ref, field, rule, status) => {
    let init: unknown = ref;
    if (ref === 'truncated') init = { base64: (await gradientPng(128, 128)).subarray(0, 200).toString('base64') };
    if (ref === 'gif') init = { base64: (await sharp({ create: { width: 8, height: 8, channels: 3, background: '#000' } }).gif().toBuffer()).toString('base64') };
    if (ref === 'huge') init = { base64: (await sharp({ create: { width: 5000, height: 8, channels: 3, background: '#000' } }).png().toBuffer()).toString('base64') };
    const res = await farm.request('POST', '/v1/generations', basicRequest({ image: { init } }));
    expect(res.status).toBe(status);
    expect(res.body.error.details).toEqual(expect.arrayContaining([expect.objectContaining({ field, rule })]));
  });

  it('a mask of another size than the init image → 400', async () => {
    const res = await farm.request('POST', '/v1/generations', basicRequest({ image: { init: { base64: b64(await gradientPng(128, 128)) }, mask: { base64: b64(await maskPng(64, 64)) } } }));
    expect(res.status).toBe(400);
    expect(res.body.error.details[0]).toMatchObject({ field: 'image.mask', rule: 'mask_size_mismatch' });
  });

  it.each([
    ['an unknown LoRA', { loras: [{ name: 'nobody/lora' }] }, 'loras.0.name', 'unknown_model'],
    ['an unknown refiner', { model: { base: 'stabilityai/stable-diffusion-xl-base-1.0', refiner: 'nobody/refiner' } }, 'model.refiner', 'unknown_model'],
    ['a base model given as the refiner', { model: { base: 'stabilityai/stable-diffusion-xl-base-1.0', refiner: 'stabilityai/sdxl-turbo' } }, 'model.refiner', 'unknown_model'],
    ['an unknown VAE', { model: { base: 'stabilityai/stable-diffusion-xl-base-1.0', vae: 'nobody/vae' } }, 'model.vae', 'unknown_model'],
    ['a depth ControlNet named for canny', { controlnets: [{ type: 'canny', model: 'diffusers/controlnet-depth-sdxl-1.0', image: { s3_key: 'x.png' } }] }, 'controlnets.0.model', 'unknown_model'],
    ['an unknown upscaler', { postprocess: { upscale: { factor: 2, upscaler: 'nobody/esrgan' } } }, 'postprocess.upscale.upscaler', 'unknown_model'],
    ['bf16 where no worker has it', { performance: { dtype: 'bf16' } }, 'performance.dtype', 'unsupported_dtype'],
  ])('%s → 422 naming the field', async (_what, over, field, rule) => {
    const res = await farm.request('POST', '/v1/generations', basicRequest(over));
    expect(res.status).toBe(422);
    expect(res.body.error.code).toBe('unschedulable');
    expect(res.body.error.details[0]).toMatchObject({ field, rule });
  });

  it('a body that is not JSON → 400', async () => {
    const res = await farm.request('POST', '/v1/generations', '{"model": ');
    expect(res.status).toBe(400);
    expect(res.body.error.code).toBe('validation_failed');
  });

  it('a body over the size limit → 413', async () => {
    const res = await farm.request('POST', '/v1/generations', basicRequest({ conditioning: { prompt: 'x'.repeat(3 * 1024 * 1024) } }));
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
  // an admin key (Bull Board needs one) and a client key; tests/security.e2e.test.ts covers roles and tenants
  const farm = new Farm({ agents: 0, env: { ADMIN_API_KEYS: `ops:${key}`, API_KEYS: 'second-key-0123456789abcdef' } });
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

  it('Bull Board needs an admin key, as a bearer token or a basic-auth password, and shows every Kiln queue', async () => {
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
    expect(names).toEqual(expect.arrayContaining(['intake', 'groups', 'webhooks']));
  });
});
