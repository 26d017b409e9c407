import { createServer, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { Client } from 'minio';
import sharp from 'sharp';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { basicRequest, Farm } from './support/farm.js';
import { b64, gradientPng, maskPng, shapesPng } from './support/images.js';

const REFINER = 'stabilityai/stable-diffusion-xl-refiner-1.0';
const VAE = 'madebyollin/sdxl-vae-fp16-fix';

/** Every SDXL feature through the whole farm (synthetic backend), end to end. */
describe('the full SDXL request through the farm', () => {
  const farm = new Farm({ agents: 2, env: { INPUT_ALLOW_PRIVATE: 'true' } });
  let images: Server;
  let imageUrl = '';
  const small = (over: Record<string, any> = {}) =>
    basicRequest({ hyperparameters: { seed: 5, width: 256, height: 256 }, ...over });

  beforeAll(async () => {
    await farm.start();
    const shapes = await shapesPng();
    images = createServer((req, res) => {
      if (req.url === '/shapes.png') {
        res.setHeader('content-type', 'image/png');
        res.end(shapes);
      } else {
        res.statusCode = 404;
        res.end();
      }
    });
    await new Promise<void>((r) => images.listen(0, '127.0.0.1', r));
    imageUrl = `http://127.0.0.1:${(images.address() as AddressInfo).port}`;
  });
  afterAll(async () => {
    await new Promise((r) => images.close(r));
    await farm.close();
  });

  const run = async (body: unknown) => {
    const job = await farm.waitForDone((await farm.submit(body)).id, 60_000);
    expect(job.status, JSON.stringify(job.error)).toBe('succeeded');
    return job;
  };
  const pixels = async (url: string) => (await sharp(Buffer.from(await (await fetch(url)).arrayBuffer())).raw().toBuffer());

  it('advertises what the farm can do', async () => {
    const caps = (await farm.get('/v1/capabilities')).body;
    expect(caps.aggregate.schedulers).toHaveLength(10);
    expect(caps.aggregate.scheduler_aliases['DPM++ 2M Karras']).toEqual({ type: 'DPMSolverMultistepScheduler', use_karras_sigmas: true });
    expect(caps.aggregate.controlnet_types).toEqual(expect.arrayContaining(['canny', 'depth', 'openpose', 'lineart', 'scribble', 'normal', 'seg']));
    expect(caps.aggregate.features).toEqual(expect.arrayContaining(['refiner', 'vae', 'lora', 'controlnet', 'img2img', 'inpaint', 'upscale', 'safety_check']));
    expect(caps.aggregate.upscalers).toContain('lanczos');
    expect(caps.aggregate.output_formats).toEqual(expect.arrayContaining(['png', 'jpeg', 'webp']));
    expect(caps.agents).toHaveLength(2);
  });

  it('maps scheduler aliases to diffusers classes and options, and stores the canonical form', async () => {
    const job = await run(small({ scheduler: { type: 'DPM++ 2M Karras', steps: 4 } }));
    expect(job.request.scheduler).toMatchObject({ type: 'DPMSolverMultistepScheduler', use_karras_sigmas: true, steps: 4 });
    const sde = await farm.submit(small({ scheduler: { type: 'DPM++ 2M SDE', steps: 4 } }));
    expect(sde.request.scheduler).toMatchObject({ type: 'DPMSolverMultistepScheduler', algorithm_type: 'sde-dpmsolver++' });
  });

  it('runs every scheduler', async () => {
    const caps = (await farm.get('/v1/capabilities')).body.aggregate.schedulers as string[];
    const jobs = await Promise.all(caps.map((type) => farm.submit(small({ scheduler: { type, steps: 2 } }))));
    const done = await Promise.all(jobs.map((j) => farm.waitForDone(j.id, 60_000)));
    expect(done.map((j) => j.status)).toEqual(caps.map(() => 'succeeded'));
  });

  it('base + refiner as an ensemble of experts, with refiner progress', async () => {
    const body = small({ model: { base: 'stabilityai/stable-diffusion-xl-base-1.0', refiner: REFINER }, scheduler: { type: 'EulerDiscreteScheduler', steps: 10 }, refiner: { denoising_switch: 0.7, steps: 10 } });
    const job = await run(body);
    expect(job.outputs[0]!.metadata).toMatchObject({ models: expect.objectContaining({ refiner: REFINER }) });
    // per-stage progress: the base runs round(10 × 0.7) steps, then the refiner its 10
    const stages = job.events.map((e) => e.message ?? '').filter((m) => m.startsWith('stage '));
    expect(stages).toEqual(expect.arrayContaining(['stage base: 7 steps', 'stage refiner: 10 steps']));
    const plain = await run(small({ scheduler: { type: 'EulerDiscreteScheduler', steps: 10 } }));
    expect(job.outputs[0]!.sha256).not.toBe(plain.outputs[0]!.sha256);
  });

  it('a custom VAE changes the image and is reported', async () => {
    const a = await run(small());
    const b = await run(small({ model: { base: 'stabilityai/stable-diffusion-xl-base-1.0', vae: VAE } }));
    expect(b.outputs[0]!.sha256).not.toBe(a.outputs[0]!.sha256);
    expect(b.outputs[0]!.metadata).toMatchObject({ models: expect.objectContaining({ vae: VAE }) });
  });

  it('several LoRAs at once; they stay resident and are reused by the next job', async () => {
    const models = (await farm.get('/v1/models')).body.models.filter((m: any) => m.kind === 'lora').map((m: any) => m.name);
    expect(models.length).toBeGreaterThanOrEqual(2);
    const loras = [{ name: models[0], weight: 0.8 }, { name: models[1], weight: -0.5 }];
    const first = await run(small({ loras }));
    const again = await run(small({ loras, hyperparameters: { seed: 6, width: 256, height: 256 } }));
    expect(first.outputs[0]!.metadata).toMatchObject({ loras: [expect.objectContaining({ name: models[0] }), expect.objectContaining({ name: models[1] })] });
    if (again.agent === first.agent) expect(again.timings.model_load_ms).toBe(0);
    const weighted = await run(small({ loras: [{ name: models[0], weight: 0.3 }, loras[1]] }));
    expect(weighted.outputs[0]!.sha256).not.toBe(first.outputs[0]!.sha256);
  });

  it('two ControlNets: canny preprocessed in the worker from base64, depth from a URL; models chosen when not named', async () => {
    const job = await run(
      small({
        controlnets: [
          { type: 'canny', image: { base64: b64(await shapesPng()) }, preprocess: true, conditioning_scale: 0.8 },
          { type: 'depth', image: { url: `${imageUrl}/shapes.png` }, guidance_start: 0.1, guidance_end: 0.9 },
        ],
      }),
    );
    expect(job.request.controlnets![0]!.model).toBeTruthy();
    expect(job.request.controlnets![1]!.model).toBeTruthy();
    expect(job.request.controlnets![0]!.image).toEqual({ s3_key: `inputs/${job.id}/control-0.png` });
    expect(job.outputs[0]!.metadata).toMatchObject({ controlnets: expect.any(Array) });
  });

  it('img2img from an S3 key: low strength stays closer to the init image than high strength', async () => {
    const init = await gradientPng(256, 256);
    const s3 = new Client({ endPoint: '127.0.0.1', port: Number(new URL(farm.s3.endpoint).port), useSSL: false, accessKey: farm.s3.accessKey, secretKey: farm.s3.secretKey, pathStyle: true, region: 'us-east-1' });
    await s3.putObject('kiln-test', 'uploads/gradient.png', init, init.length, { 'Content-Type': 'image/png' });
    const steps = { type: 'EulerDiscreteScheduler', steps: 10 };
    const low = await run(small({ scheduler: steps, image: { init: { s3_key: 'uploads/gradient.png' }, strength: 0.2 } }));
    const high = await run(small({ scheduler: steps, image: { init: { s3_key: 'uploads/gradient.png' }, strength: 0.95 } }));
    expect(low.request.image!.init).toEqual({ s3_key: `inputs/${low.id}/init.png` });
    const ref = await sharp(init).raw().toBuffer();
    const diff = (a: Buffer) => a.reduce((s, v, i) => s + Math.abs(v - ref[i]!), 0) / a.length;
    expect(diff(await pixels(low.outputs[0]!.url))).toBeLessThan(diff(await pixels(high.outputs[0]!.url)));
  });

  it('inpainting repaints only the masked region', async () => {
    const init = await gradientPng(256, 256);
    const job = await run(small({ image: { init: { base64: b64(init) }, mask: { base64: b64(await maskPng(256, 256)) }, strength: 1 } }));
    const out = await pixels(job.outputs[0]!.url);
    const ref = await sharp(init).raw().toBuffer();
    const at = (buf: Buffer, x: number, y: number) => [...buf.subarray((y * 256 + x) * 3, (y * 256 + x) * 3 + 3)];
    expect(at(out, 5, 5)).toEqual(at(ref, 5, 5)); // outside the mask: untouched
    expect(at(out, 128, 128)).not.toEqual(at(ref, 128, 128)); // inside: repainted
  });

  it('upscales ×2 by resampling and ×4 with a model, and says which ran', async () => {
    const x2 = await run(small({ postprocess: { upscale: { factor: 2, upscaler: 'lanczos' } } }));
    expect(x2.outputs[0]).toMatchObject({ width: 512, height: 512, upscaled: { factor: 2, upscaler: 'lanczos', kind: 'resample' } });
    const x4 = await run(small({ postprocess: { upscale: { factor: 4 } } }));
    expect(x4.outputs[0]).toMatchObject({ width: 1024, height: 1024, upscaled: { factor: 4, kind: 'model' } });
    const bytes = Buffer.from(await (await fetch(x4.outputs[0]!.url)).arrayBuffer());
    expect(await sharp(bytes).metadata()).toMatchObject({ width: 1024, height: 1024 });
  });

  it('reports a safety verdict per image when asked', async () => {
    const ok = await run(small({ postprocess: { safety_check: true }, hyperparameters: { seed: 1, width: 256, height: 256, num_images: 2 } }));
    expect(ok.outputs.map((o) => o.safety)).toEqual([expect.objectContaining({ checked: true, nsfw: false }), expect.objectContaining({ checked: true, nsfw: false })]);
    const flagged = await run(small({ postprocess: { safety_check: true }, conditioning: { prompt: 'nsfw-test content' } }));
    expect(flagged.outputs[0]!.safety).toMatchObject({ checked: true, nsfw: true });
    const unchecked = await run(small());
    expect(unchecked.outputs[0]!.safety).toBeNull();
  });

  it('writes jpeg and webp with quality, and embeds generation metadata', async () => {
    for (const format of ['jpeg', 'webp'] as const) {
      const job = await run(small({ output: { format, quality: 70 } }));
      const out = job.outputs[0]!;
      expect(out.content_type).toBe(`image/${format}`);
      expect(out.key).toMatch(new RegExp(`^outputs/${job.id}/a1-[0-9a-f]{6}/0\\.${format}$`));
      const meta = await sharp(Buffer.from(await (await fetch(out.url)).arrayBuffer())).metadata();
      expect(meta).toMatchObject({ format, width: 256, height: 256 });
    }
    const png = await run(small());
    const file = Buffer.from(await (await fetch(png.outputs[0]!.url)).arrayBuffer());
    expect(file.includes(Buffer.from('a lighthouse at dusk'))).toBe(true);
    expect(png.outputs[0]!.metadata).toMatchObject({ prompt: 'a lighthouse at dusk', seed: 5 });
    expect(png.outputs[0]!.metadata.timings).toBeTruthy();
  });

  it('accepts performance options the workers support', async () => {
    await run(small({ performance: { dtype: 'bf16', attention_slicing: true, vae_slicing: true, vae_tiling: true, channels_last: true } }));
  });

  it('POST /v1/validate checks a request without running it', async () => {
    const ok = await farm.request('POST', '/v1/validate', small({ scheduler: { type: 'Euler a', steps: 3 } }));
    expect(ok.status).toBe(200);
    expect(ok.body.valid).toBe(true);
    expect(ok.body.request.scheduler.type).toBe('EulerAncestralDiscreteScheduler');
    expect(ok.body.agents.sort()).toEqual(['agent-0', 'agent-1']);
    const bad = await farm.request('POST', '/v1/validate', small({ loras: [{ name: 'nobody/has-this', weight: 1 }] }));
    expect(bad.status).toBe(422);
    expect(bad.body.error.details[0]).toMatchObject({ field: 'loras.0.name', rule: 'unknown_model' });
  });
});
