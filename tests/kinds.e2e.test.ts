import { Client } from 'minio';
import { Webhook } from 'standardwebhooks';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { basicRequest, Farm, sleep, WEBHOOK_SECRET } from './support/farm.js';
import { gradientPng, shapesPng } from './support/images.js';
import { WebhookReceiver } from './support/webhook-receiver.js';

const BASE = 'stabilityai/stable-diffusion-xl-base-1.0';
const TURBO = 'stabilityai/sdxl-turbo';
const tiny = (seed: number, over: Record<string, any> = {}) =>
  basicRequest({ scheduler: { type: 'EulerDiscreteScheduler', steps: 2 }, hyperparameters: { seed, width: 64, height: 64 }, ...over });

describe('batches', () => {
  const farm = new Farm({ agents: 2, env: { KILN_SYNTHETIC_RAISE_ON_PROMPT: 'explode-here' } });
  beforeAll(() => farm.start());
  afterAll(() => farm.close());

  it('fans out across agents, reports each child, and ends partially_succeeded when one child fails; its webhook fires once', async () => {
    const receiver = await new WebhookReceiver().start();
    try {
      const items = Array.from({ length: 8 }, (_, i) => ({ hyperparameters: { seed: i, width: 256, height: 256 } }));
      items[5] = { conditioning: { prompt: 'please explode-here' }, hyperparameters: { seed: 5, width: 256, height: 256 } } as never;
      const res = await farm.request('POST', '/v1/batches', {
        defaults: { model: { base: BASE }, scheduler: { steps: 6 }, conditioning: { prompt: 'a kiln at dawn' } },
        items,
        webhook: { url: receiver.url },
      });
      expect(res.status).toBe(202);
      expect(res.body.counts.total).toBe(8);
      const id = res.body.id;
      let batch: any;
      await farm.waitFor(async () => ['succeeded', 'failed', 'partially_succeeded'].includes((batch = (await farm.get(`/v1/batches/${id}`)).body).status), 60_000, 'batch ended');
      expect(batch.status).toBe('partially_succeeded');
      expect(batch.counts).toMatchObject({ total: 8, succeeded: 7, failed: 1, queued: 0, running: 0 });
      expect(batch.children[5]).toMatchObject({ index: 5, status: 'failed', error: expect.objectContaining({ code: 'internal' }) });
      expect(batch.children[0].outputs[0].url).toMatch(/^http/);
      expect(new Set(batch.children.map((c: any) => c.agent)).size).toBe(2);
      await farm.waitFor(async () => receiver.received.length >= 1, 10_000, 'batch webhook');
      await sleep(500);
      expect(receiver.received).toHaveLength(1);
      const payload = new Webhook(WEBHOOK_SECRET).verify(receiver.received[0]!.body, receiver.received[0]!.headers) as any;
      expect(payload.type).toBe('batch.completed');
      expect(payload.data.counts.failed).toBe(1);
      // Bull Board shows the batch on the groups queue, completed once its children ended
      await farm.waitFor(async () => {
        const q = (await farm.get('/admin/queues/api/queues?activeQueue=groups&status=completed')).body.queues.find((x: any) => x.name === 'groups');
        return q?.counts?.completed >= 1 && q.jobs.some((j: any) => j.id === id && j.progress === 100 && j.returnValue?.status === 'partially_succeeded');
      }, 10_000, 'batch visible in Bull Board');
    } finally {
      await receiver.close();
    }
  });

  it('rejects the whole batch when one item is invalid, naming the item and field', async () => {
    const res = await farm.request('POST', '/v1/batches', { defaults: { model: { base: BASE }, conditioning: { prompt: 'x' } }, items: [{}, {}, {}, { hyperparameters: { width: 100 } }] });
    expect(res.status).toBe(400);
    expect(res.body.error.details[0]).toMatchObject({ field: 'items.3.hyperparameters.width', rule: 'not_multiple_of' });
    const unknown = await farm.request('POST', '/v1/batches', { defaults: { conditioning: { prompt: 'x' } }, items: [{ model: { base: BASE } }, { model: { base: 'nobody/model' } }] });
    expect(unknown.status).toBe(422);
    expect(unknown.body.error.details[0]).toMatchObject({ field: 'items.1.model.base', rule: 'unknown_model' });
    const empty = await farm.request('POST', '/v1/batches', { items: [] });
    expect(empty.status).toBe(400);
    const tooMany = await farm.request('POST', '/v1/batches', { items: Array.from({ length: 1001 }, () => ({})) });
    expect(tooMany.status).toBe(400);
    expect(tooMany.body.error.details[0]).toMatchObject({ field: 'items', rule: 'too_big' });
  });

  it('cancelling a batch cancels its unfinished children', async () => {
    const res = await farm.request('POST', '/v1/batches', {
      defaults: { model: { base: BASE }, conditioning: { prompt: 'slow' }, scheduler: { steps: 150 }, hyperparameters: { width: 1024, height: 1024 } },
      items: Array.from({ length: 6 }, (_, i) => ({ hyperparameters: { seed: i } })),
    });
    const id = res.body.id;
    await sleep(300);
    const del = await farm.request('DELETE', `/v1/batches/${id}`);
    expect(del.status).toBe(202);
    let batch: any;
    await farm.waitFor(async () => (batch = (await farm.get(`/v1/batches/${id}`)).body).status === 'canceled', 20_000, 'batch canceled');
    expect(batch.counts.canceled).toBe(6);
    expect((await farm.request('DELETE', `/v1/batches/${id}`)).status).toBe(202);
  });

  it('a thousand-item batch is accepted in one request and does not starve another client’s single job', async () => {
    const items = Array.from({ length: 1000 }, (_, i) => ({ hyperparameters: { seed: i, width: 64, height: 64 } }));
    const t0 = Date.now();
    const res = await farm.request('POST', '/v1/batches', { defaults: { model: { base: BASE }, scheduler: { steps: 1 }, conditioning: { prompt: 'many' } }, items });
    expect(res.status).toBe(202);
    expect(res.body.counts.total).toBe(1000);
    const accepted = Date.now() - t0;
    const single = await farm.submit(tiny(1));
    const done = await farm.waitForDone(single.id, 30_000);
    expect(done.status).toBe('succeeded');
    const batch = (await farm.get(`/v1/batches/${res.body.id}`)).body;
    // the single job finished while most of the batch still waited
    expect(batch.counts.queued).toBeGreaterThan(500);
    console.log(`1000-item batch accepted in ${accepted} ms; a single job behind it finished in ${done.timings.total_ms} ms with ${batch.counts.queued} batch items still queued`);
    await farm.request('DELETE', `/v1/batches/${res.body.id}`);
  }, 120_000);
});

describe('cache: model residency', () => {
  const farm = new Farm({ agents: 2 });
  beforeAll(() => farm.start());
  afterAll(() => farm.close());

  it('pins a suite on a chosen agent, and matching jobs go there without a load', async () => {
    const res = await farm.request('POST', '/v1/cache', { models: { base: TURBO, vae: 'madebyollin/sdxl-vae-fp16-fix' }, target: { agents: ['agent-1'] }, pin: true });
    expect(res.status).toBe(202);
    const id = res.body.id;
    let group: any;
    await farm.waitFor(async () => (group = (await farm.get(`/v1/cache/${id}`)).body).status === 'succeeded', 20_000, 'cache loaded');
    expect(group.children).toHaveLength(1);
    expect(group.children[0].agent).toBe('agent-1');
    await farm.waitFor(async () => {
      const a = (await farm.get('/v1/cache')).body.agents.find((x: any) => x.agent_id === 'agent-1');
      return a.resident.some((r: any) => r.name === TURBO && r.pinned && r.location === 'vram');
    }, 5_000, 'residency visible');
    const suite = { model: { base: TURBO, vae: 'madebyollin/sdxl-vae-fp16-fix' } };
    const first = await farm.waitForDone((await farm.submit(tiny(1, suite))).id);
    const jobs = await Promise.all([2, 3, 4].map((s) => farm.submit(tiny(s, suite))));
    const done = [first, ...(await Promise.all(jobs.map((j) => farm.waitForDone(j.id))))];
    expect(done.map((j) => j.agent)).toEqual(['agent-1', 'agent-1', 'agent-1', 'agent-1']);
    expect(done.filter((j) => (j.loaded_models ?? []).length > 0)).toHaveLength(0);
  });

  it('a warm (RAM) copy loads faster than a cold one from disk', async () => {
    const warm = await farm.request('POST', '/v1/cache', { models: { base: 'RunDiffusion/Juggernaut-XL-v9' }, target: { agents: ['agent-0'] }, location: 'ram' });
    await farm.waitFor(async () => (await farm.get(`/v1/cache/${warm.body.id}`)).body.status === 'succeeded', 20_000, 'warm load');
    const residency = (await farm.get('/v1/cache')).body.agents.find((x: any) => x.agent_id === 'agent-0');
    expect(residency.resident.find((r: any) => r.name === 'RunDiffusion/Juggernaut-XL-v9')?.location).toBe('ram');
    const hot = await farm.request('POST', '/v1/cache', { models: { base: 'RunDiffusion/Juggernaut-XL-v9' }, target: { agents: ['agent-0'] } });
    const cold = await farm.request('POST', '/v1/cache', { models: { base: 'playgroundai/playground-v2.5-1024px-aesthetic' }, target: { agents: ['agent-0'] } });
    const loadMs = async (id: string) => {
      let g: any;
      await farm.waitFor(async () => (g = (await farm.get(`/v1/cache/${id}`)).body).status === 'succeeded', 20_000, 'loaded');
      return (await farm.get(`/v1/jobs/${g.children[0].id}`)).body.timings.model_load_ms as number;
    };
    const fromRam = await loadMs(hot.body.id);
    const fromDisk = await loadMs(cold.body.id);
    expect(fromRam).toBeLessThan(fromDisk);
  });

  it('evicts on DELETE, and refuses unknown models and agents', async () => {
    const del = await farm.request('DELETE', '/v1/cache', { models: [TURBO] });
    expect(del.status).toBe(202);
    await farm.waitFor(async () => (await farm.get(`/v1/cache/${del.body.id}`)).body.status === 'succeeded', 20_000, 'evicted');
    const agents = (await farm.get('/v1/cache')).body.agents;
    expect(agents.some((a: any) => a.resident.some((r: any) => r.name === TURBO && r.location === 'vram'))).toBe(false);
    const unknown = await farm.request('POST', '/v1/cache', { models: { loras: ['nobody/lora'] } });
    expect(unknown.status).toBe(422);
    expect(unknown.body.error.details[0]).toMatchObject({ field: 'models.loras.0', rule: 'unknown_model' });
    const badAgent = await farm.request('POST', '/v1/cache', { models: { base: BASE }, target: { agents: ['agent-9'] } });
    expect(badAgent.status).toBe(422);
    expect(badAgent.body.error.details[0]).toMatchObject({ field: 'target.agents.0', rule: 'unknown_agent' });
    const none = await farm.request('POST', '/v1/cache', { models: {} });
    expect(none.status).toBe(400);
    const replicas = await farm.request('POST', '/v1/cache', { models: { base: BASE }, target: { replicas: 3 } });
    expect(replicas.status).toBe(422);
    expect(replicas.body.error.details[0]).toMatchObject({ field: 'target.replicas', rule: 'too_many_replicas' });
  });
});

describe('training', () => {
  // steps are slow enough to kill an agent between checkpoints
  const farm = new Farm({ agents: 2, env: { KILN_SYNTHETIC_TRAIN_STEP_MS: '6400' } }); // 400 ms a step at 256²
  let s3: Client;
  beforeAll(async () => {
    await farm.start();
    s3 = new Client({ endPoint: '127.0.0.1', port: Number(new URL(farm.s3.endpoint).port), useSSL: false, accessKey: farm.s3.accessKey, secretKey: farm.s3.secretKey, pathStyle: true, region: 'us-east-1' });
    const put = async (key: string, body: Buffer, type: string) => s3.putObject('kiln-test', key, body, body.length, { 'Content-Type': type });
    for (let i = 0; i < 3; i++) {
      await put(`datasets/kilns/${i}.png`, i % 2 ? await shapesPng(128, 128) : await gradientPng(128, 128), 'image/png');
      await put(`datasets/kilns/${i}.txt`, Buffer.from(`a photo of a kiln, number ${i}`), 'text/plain');
    }
    await put('datasets/uncaptioned/0.png', await gradientPng(64, 64), 'image/png');
  });
  afterAll(() => farm.close());

  const trainBody = (name: string, over: Record<string, any> = {}) => ({
    base_model: BASE,
    dataset: { s3_prefix: 'datasets/kilns/' },
    output: { name },
    hyperparameters: { rank: 4, steps: 24, checkpoint_every: 4, resolution: 256, seed: 3 },
    ...over,
  });

  it('checkpoints, survives a SIGKILL of its agent by resuming, and its LoRA is usable by the next generation', async () => {
    const res = await farm.request('POST', '/v1/trainings', trainBody('kiln/test-style'));
    expect(res.status).toBe(202);
    expect(res.body.request.dataset.items).toHaveLength(3);
    const id = res.body.id;
    let job: any;
    await farm.waitFor(async () => ((job = (await farm.get(`/v1/trainings/${id}`)).body).training.last_checkpoint?.step ?? 0) >= 8, 60_000, 'two checkpoints');
    expect(job.training.loss).toBeGreaterThan(0);
    const victim = job.agent;
    const checkpointAtKill = job.training.last_checkpoint.step;
    farm.procs.get(victim)!.kill('SIGKILL');
    await farm.waitFor(async () => (job = (await farm.get(`/v1/trainings/${id}`)).body).status === 'succeeded', 120_000, 'training done');
    expect(job.attempt).toBe(2);
    expect(job.agent).not.toBe(victim);
    expect(job.events.some((e: any) => e.message?.startsWith(`resuming from the checkpoint at step`))).toBe(true);
    const resumedAt = Number(job.events.find((e: any) => e.message?.startsWith('resuming')).message.match(/step (\d+)/)[1]);
    expect(resumedAt).toBeGreaterThanOrEqual(checkpointAtKill);
    // the LoRA is its tenant's (the open farm's one tenant is "default"), used by its short name
    expect(job.training).toMatchObject({ step: 24, total: 24, lora: { name: 'default/kiln/test-style', base_model: BASE, rank: 4 } });
    const loras = (await farm.get('/v1/loras')).body;
    expect(loras.trained.map((l: any) => l.name)).toContain('default/kiln/test-style');

    const without = await farm.waitForDone((await farm.submit(tiny(9))).id);
    const withLora = await farm.waitForDone((await farm.submit(tiny(9, { loras: [{ name: 'kiln/test-style', weight: 1 }] }))).id);
    expect(withLora.status, JSON.stringify(withLora.error)).toBe('succeeded');
    expect(withLora.outputs[0]!.sha256).not.toBe(without.outputs[0]!.sha256);
    farm.startAgent(Number(victim.split('-')[1]));
    await farm.waitForAgents(2);
  }, 240_000);

  it('cancelling stops it promptly and keeps the last checkpoint', async () => {
    const res = await farm.request('POST', '/v1/trainings', trainBody('kiln/cancel-me', { hyperparameters: { rank: 4, steps: 200, checkpoint_every: 2, resolution: 256 } }));
    const id = res.body.id;
    await farm.waitFor(async () => ((await farm.get(`/v1/trainings/${id}`)).body.training.last_checkpoint?.step ?? 0) >= 2, 60_000, 'a checkpoint');
    const asked = Date.now();
    expect((await farm.request('DELETE', `/v1/trainings/${id}`)).status).toBe(202);
    let job: any;
    await farm.waitFor(async () => (job = (await farm.get(`/v1/trainings/${id}`)).body).status === 'canceled', 10_000, 'canceled');
    expect(Date.now() - asked).toBeLessThan(3_000);
    expect(job.training.last_checkpoint.step).toBeGreaterThanOrEqual(2);
    expect((await s3.statObject('kiln-test', job.training.last_checkpoint.key)).size).toBe(job.training.last_checkpoint.bytes);
  });

  it('refuses bad training requests clearly', async () => {
    const noCaption = await farm.request('POST', '/v1/trainings', trainBody('x1', { dataset: { s3_prefix: 'datasets/uncaptioned/' } }));
    expect(noCaption.status).toBe(400);
    expect(noCaption.body.error.details[0]).toMatchObject({ field: 'dataset.s3_prefix', rule: 'missing_caption' });
    const empty = await farm.request('POST', '/v1/trainings', trainBody('x2', { dataset: { s3_prefix: 'datasets/none/' } }));
    expect(empty.body.error.details[0]).toMatchObject({ field: 'dataset.s3_prefix', rule: 'empty_dataset' });
    const both = await farm.request('POST', '/v1/trainings', trainBody('x3', { dataset: { s3_prefix: 'a/', manifest: 'b.json' } }));
    expect(both.body.error.details[0]).toMatchObject({ field: 'dataset', rule: 'exactly_one' });
    const base = await farm.request('POST', '/v1/trainings', trainBody('x4', { base_model: 'nobody/base' }));
    expect(base.status).toBe(422);
    expect(base.body.error.details[0]).toMatchObject({ field: 'base_model', rule: 'unknown_model' });
    const rank = await farm.request('POST', '/v1/trainings', trainBody('x5', { hyperparameters: { rank: 0 } }));
    expect(rank.body.error.details[0]).toMatchObject({ field: 'hyperparameters.rank', rule: 'too_small' });
    const res = await farm.request('POST', '/v1/trainings', trainBody('x6', { hyperparameters: { resolution: 500 } }));
    expect(res.body.error.details[0]).toMatchObject({ field: 'hyperparameters.resolution', rule: 'not_multiple_of' });
    const name = await farm.request('POST', '/v1/trainings', trainBody('bad name!'));
    expect(name.body.error.details[0]).toMatchObject({ field: 'output.name' });
  });
});
