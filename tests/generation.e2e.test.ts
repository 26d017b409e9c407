import { createHash } from 'node:crypto';
import { Webhook } from 'standardwebhooks';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { basicRequest, Farm, pngSize, WEBHOOK_SECRET } from './support/farm.js';
import { WebhookReceiver } from './support/webhook-receiver.js';

describe('a generation through the whole farm', () => {
  const farm = new Farm({ agents: 2 });
  beforeAll(() => farm.start());
  afterAll(() => farm.close());

  it('succeeds, stores a PNG of the requested size in S3, and reports it on the record', async () => {
    const submitted = await farm.submit(basicRequest({ hyperparameters: { seed: 11, width: 512, height: 384 } }));
    expect(submitted.status).toBe('queued');
    expect(submitted.links.self).toBe(`${farm.api}/v1/jobs/${submitted.id}`);

    const job = await farm.waitForDone(submitted.id);
    expect(job.status).toBe('succeeded');
    expect(job.attempt).toBe(1);
    expect(job.agent).toMatch(/^agent-/);
    expect(job.outputs).toHaveLength(1);
    const out = job.outputs[0]!;
    expect(out).toMatchObject({ index: 0, width: 512, height: 384, seed: 11, content_type: 'image/png', key: expect.stringMatching(new RegExp(`^outputs/${job.id}/a1-[0-9a-f]{6}/0\\.png$`)) });

    const res = await fetch(out.url);
    expect(res.status).toBe(200);
    const bytes = Buffer.from(await res.arrayBuffer());
    expect(pngSize(bytes)).toEqual({ width: 512, height: 384 });
    expect(bytes.length).toBe(out.bytes);
    expect(createHash('sha256').update(bytes).digest('hex')).toBe(out.sha256);

    expect(job.timings.total_ms).toBeGreaterThan(0);
    expect(job.timings.inference_ms).toBeGreaterThan(0);
    expect(job.timings.upload_ms).not.toBeNull();
    expect(job.started_at).not.toBeNull();
    expect(job.finished_at).not.toBeNull();
    expect(job.events.map((e) => e.status)).toEqual(expect.arrayContaining(['queued', 'running', 'succeeded']));
  });

  it('gives byte-identical images for the same seed and different ones for another seed', async () => {
    const [a, b, c] = await Promise.all([
      farm.submit(basicRequest({ hyperparameters: { seed: 42, width: 256, height: 256 } })),
      farm.submit(basicRequest({ hyperparameters: { seed: 42, width: 256, height: 256 } })),
      farm.submit(basicRequest({ hyperparameters: { seed: 43, width: 256, height: 256 } })),
    ]);
    const [ja, jb, jc] = await Promise.all([a, b, c].map((j) => farm.waitForDone(j!.id)));
    const bytes = await Promise.all([ja, jb, jc].map(async (j) => Buffer.from(await (await fetch(j!.outputs[0]!.url)).arrayBuffer())));
    expect(bytes[0]!.equals(bytes[1]!)).toBe(true);
    expect(bytes[0]!.equals(bytes[2]!)).toBe(false);
  });

  it('chooses and reports a seed when none is given, and one seed per image', async () => {
    const submitted = await farm.submit(basicRequest({ hyperparameters: { width: 256, height: 256, num_images: 3 } }));
    const seed = submitted.request.hyperparameters.seed;
    expect(Number.isInteger(seed)).toBe(true);
    const job = await farm.waitForDone(submitted.id);
    expect(job.status).toBe('succeeded');
    expect(job.outputs.map((o) => o.seed)).toEqual([seed, seed + 1, seed + 2]);
    expect(new Set(job.outputs.map((o) => o.sha256)).size).toBe(3);
  });

  it('delivers a signed completed webhook with the final record, even after the receiver fails twice', async () => {
    const receiver = await new WebhookReceiver(2).start();
    try {
      const submitted = await farm.submit(basicRequest({ webhook: { url: receiver.url } }));
      await farm.waitForDone(submitted.id);
      await farm.waitFor(async () => receiver.received.some((r) => r.status === 204), 15_000, 'webhook delivered');
      expect(receiver.received.map((r) => r.status)).toEqual([500, 500, 204]);
      const ok = receiver.received[2]!;
      const payload = new Webhook(WEBHOOK_SECRET).verify(ok.body, ok.headers) as any;
      expect(payload.type).toBe('job.completed');
      expect(payload.data.id).toBe(submitted.id);
      expect(payload.data.status).toBe('succeeded');
      expect(payload.data.outputs).toHaveLength(1);
      // one message: the same webhook-id on every try
      expect(new Set(receiver.received.map((r) => r.headers['webhook-id'])).size).toBe(1);
      // a tampered body does not verify
      expect(() => new Webhook(WEBHOOK_SECRET).verify(ok.body.replace('succeeded', 'failed'), ok.headers)).toThrow();
      // every try is listed on the job
      await farm.waitFor(async () => (await farm.job(submitted.id)).webhook_deliveries.length === 3, 5_000, 'deliveries recorded');
      const job = await farm.job(submitted.id);
      expect(job.webhook_deliveries.map((d) => [d.try, d.status_code, d.ok])).toEqual([
        [1, 500, false],
        [2, 500, false],
        [3, 204, true],
      ]);
    } finally {
      await receiver.close();
    }
  });

  it('sends started and progress events when asked', async () => {
    const receiver = await new WebhookReceiver().start();
    try {
      const submitted = await farm.submit(
        basicRequest({ scheduler: { type: 'EulerDiscreteScheduler', steps: 6 }, webhook: { url: receiver.url, events: ['started', 'progress', 'completed'] } }),
      );
      await farm.waitForDone(submitted.id);
      await farm.waitFor(async () => receiver.received.some((r) => JSON.parse(r.body).type === 'job.completed'), 10_000, 'completed webhook');
      const types = receiver.received.map((r) => JSON.parse(r.body).type);
      expect(types).toContain('job.started');
      expect(types).toContain('job.progress');
    } finally {
      await receiver.close();
    }
  });

  it('lists live agents and the models they can run', async () => {
    const agents = await farm.agents();
    expect(agents.map((a) => a.agent_id).sort()).toEqual(['agent-0', 'agent-1']);
    const full = (await farm.get('/v1/agents')).body.agents[0];
    expect(full.gpu.vram_total_mb).toBeGreaterThan(0);
    expect(full.gpu.vram_free_mb).toBeLessThanOrEqual(full.gpu.vram_total_mb);
    expect(full.capabilities.backend).toBe('synthetic');
    const models = (await farm.get('/v1/models')).body.models;
    const names = models.map((m: any) => m.name);
    expect(names).toContain('stabilityai/stable-diffusion-xl-base-1.0');
    expect(names).toContain('stabilityai/stable-diffusion-xl-refiner-1.0');
    expect(models.find((m: any) => m.name === 'stabilityai/stable-diffusion-xl-base-1.0').agents.sort()).toEqual(['agent-0', 'agent-1']);
  });

  it('answers health and readiness', async () => {
    expect((await farm.get('/healthz')).status).toBe(200);
    const ready = await farm.get('/readyz');
    expect(ready.status).toBe(200);
    expect(ready.body.checks).toEqual({ redis: { ok: true }, storage: { ok: true } });
  });
});
