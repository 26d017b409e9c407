import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ENTRY } from '../scripts/farm-lib.js';
import { basicRequest, Farm, sleep } from './support/farm.js';

const BASE = 'stabilityai/stable-diffusion-xl-base-1.0';
const TURBO = 'stabilityai/sdxl-turbo';

describe('placement with model affinity', () => {
  // loads cost ~0.7 s, steps 10 ms: reloading a model is the expensive mistake to avoid; each
  // GPU has room for one SDXL model, so a job on the wrong agent would evict
  const farm = new Farm({ agents: 2, env: { KILN_SYNTHETIC_VRAM_MB: '10240' } });
  beforeAll(() => farm.start());
  afterAll(() => farm.close());

  it('sends each job to the agent that already holds its model (two models, two agents: no reloads)', async () => {
    // one job per model first: each model ends up on one agent
    const warm = [];
    for (const [i, model] of [BASE, TURBO].entries()) warm.push(await farm.waitForDone((await farm.submit(basicRequest({ model: { base: model }, hyperparameters: { seed: 100 + i, width: 256, height: 256 } }))).id));
    expect(warm.filter((j) => (j.loaded_models ?? []).length > 0)).toHaveLength(2);
    const holder: Record<string, string | null> = { [BASE]: warm[0]!.agent, [TURBO]: warm[1]!.agent };
    expect(holder[BASE]).not.toBe(holder[TURBO]);

    // then interleaved traffic: every job goes to its model's holder, and nothing is reloaded
    const jobs = [];
    for (let i = 0; i < 12; i++) {
      jobs.push(await farm.submit(basicRequest({ model: { base: i % 2 ? TURBO : BASE }, hyperparameters: { seed: i, width: 256, height: 256 } })));
    }
    const done = await Promise.all(jobs.map((j) => farm.waitForDone(j.id, 60_000)));
    expect(done.every((j) => j.status === 'succeeded')).toBe(true);
    expect(done.filter((j) => (j.loaded_models ?? []).length > 0)).toHaveLength(0);
    expect(done.every((j) => j.agent === holder[j.request.model.base])).toBe(true);

    const models = (await farm.get('/v1/models')).body.models;
    expect(models.find((m: any) => m.name === BASE).resident_on).toEqual([holder[BASE]]);
  });
});

describe('dispatcher failover', () => {
  const farm = new Farm({ agents: 1, dispatcher: false });
  beforeAll(() => farm.start());
  afterAll(() => farm.close());

  it('a standby dispatcher takes over when the active one is SIGKILLed; no job is lost', async () => {
    const first = farm.spawn('dispatcher-a', ENTRY.dispatcher);
    await sleep(1000);
    farm.spawn('dispatcher-b', ENTRY.dispatcher);
    const a = await farm.submit(basicRequest({ hyperparameters: { seed: 1, width: 256, height: 256 } }));
    expect((await farm.waitForDone(a.id)).status).toBe('succeeded');

    first.kill('SIGKILL');
    await first;
    const jobs = await Promise.all([2, 3, 4].map((seed) => farm.submit(basicRequest({ hyperparameters: { seed, width: 256, height: 256 } }))));
    const done = await Promise.all(jobs.map((j) => farm.waitForDone(j.id, 30_000)));
    expect(done.map((j) => j.status)).toEqual(['succeeded', 'succeeded', 'succeeded']);
    expect(done.map((j) => j.attempt)).toEqual([1, 1, 1]);
  });
});

describe('jobs no agent can run', () => {
  const farm = new Farm({ agents: 0, env: { UNSCHEDULABLE_GRACE_MS: '1500' } });
  beforeAll(() => farm.start());
  afterAll(() => farm.close());

  it('with no live agent, a job is accepted and then fails as unschedulable instead of waiting forever', async () => {
    const job = await farm.submit(basicRequest());
    const done = await farm.waitForDone(job.id, 15_000);
    expect(done.status).toBe('failed');
    expect(done.error).toMatchObject({ code: 'unschedulable', retryable: false });
    expect(done.error!.message).toContain('no live agent');
  });
});
