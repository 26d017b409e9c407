import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { basicRequest, Farm, type GenRecord, randomKey, sleep } from './support/farm.js';
import { type Sample, scrape, total } from './support/metrics.js';
import { WebhookReceiver } from './support/webhook-receiver.js';

/**
 * Every process's /metrics, scraped while a real farm runs jobs: the figures move as the jobs
 * flow and match what the jobs' records say.
 */
const BASE = 'stabilityai/stable-diffusion-xl-base-1.0';
const TURBO = 'stabilityai/sdxl-turbo';
const ADMIN = randomKey();
const CLIENT = randomKey();
const port0 = 41000 + Math.floor(Math.random() * 8000) * 2;
const PORTS = { api: port0, dispatcher: port0 + 1, agent: (i: number) => port0 + 2 + i };

describe('Prometheus metrics on every process during a real run', () => {
  // 10 GB of VRAM: the base model and turbo (7 GB each) cannot both be resident
  const farm = new Farm({
    agents: 2,
    apiKey: ADMIN,
    env: { API_KEYS: `acme:${CLIENT}`, ADMIN_API_KEYS: `ops:${ADMIN}`, KILN_SYNTHETIC_VRAM_MB: '10240' },
    apiEnv: { METRICS_PORT: String(PORTS.api) },
    dispatcherEnv: { METRICS_PORT: String(PORTS.dispatcher) },
    agentEnv: (i) => ({ METRICS_PORT: String(PORTS.agent(i)) }),
  });
  const receiver = new WebhookReceiver();
  const url = {
    api: `http://127.0.0.1:${PORTS.api}/metrics`,
    dispatcher: `http://127.0.0.1:${PORTS.dispatcher}/metrics`,
    agent: (i: number) => `http://127.0.0.1:${PORTS.agent(i)}/metrics`,
  };
  const all = async () => {
    const [api, dispatcher, a0, a1] = await Promise.all([scrape(url.api), scrape(url.dispatcher), scrape(url.agent(0)), scrape(url.agent(1))]);
    return { api, dispatcher, agents: [a0!, a1!], every: [...api, ...dispatcher, ...a0, ...a1] };
  };
  const client = { authorization: `Bearer ${CLIENT}` };

  beforeAll(async () => {
    await receiver.start();
    await farm.start();
  }, 90_000);
  afterAll(async () => {
    await farm.close();
    await receiver.close();
  });

  it('the API answers /metrics to an admin key only; METRICS_PORT serves the same without one', async () => {
    expect((await fetch(`${farm.api}/metrics`)).status).toBe(401);
    expect((await fetch(`${farm.api}/metrics`, { headers: client })).status).toBe(403);
    const res = await fetch(`${farm.api}/metrics`, { headers: { authorization: `Bearer ${ADMIN}` } });
    expect(res.status).toBe(200);
    expect(res.headers.get('content-type')).toContain('text/plain');
    expect(await res.text()).toContain('kiln_http_requests_total');
    const own = await all();
    expect(total(own.api, 'kiln_http_requests_total', { route: '/metrics', status: '401' })).toBeGreaterThanOrEqual(1);
    // every process has its own families, and the dispatcher and agents the shared ones too
    expect(total(own.dispatcher, 'kiln_agents', { state: 'ready' })).toBe(2);
    for (const [i, a] of own.agents.entries()) {
      expect(total(a, 'kiln_agent_state', { state: 'ready', agent: farm.agentId(i) })).toBe(1);
      expect(a.some((s) => s.name === 'kiln_gpu_busy_seconds_total')).toBe(true);
    }
  });

  it('counts move as jobs flow: submitted, queue depth up and back to 0, ends by outcome and code, stage times, placements, webhooks, loads', async () => {
    const before = await all();
    // four long jobs fill both agents' slots (running + next), so the next ones wait in intake
    const long = await Promise.all([0, 1, 2, 3].map(() => farm.submit(basicRequest({ scheduler: { steps: 150 }, hyperparameters: { width: 1024, height: 1024, seed: 1 } }))));
    const quick = [] as GenRecord[];
    for (let i = 0; i < 4; i++) quick.push(await farm.submit({ ...basicRequest(), priority: 'low' }, client));
    let depthSeen = 0;
    let breakdown = 0;
    const deadline = Date.now() + 5_000;
    while (Date.now() < deadline && depthSeen < 4) {
      const d = await scrape(url.dispatcher);
      depthSeen = Math.max(depthSeen, total(d, 'kiln_queue_depth'));
      if (depthSeen >= 4) breakdown = total(d, 'kiln_queue_jobs', { tenant: 'acme', priority: 'low', model: BASE });
      await sleep(50);
    }
    expect(depthSeen).toBeGreaterThanOrEqual(4);
    expect(breakdown).toBe(4);

    // one that times out, one canceled while it waits, one with a webhook
    const timedOut = await farm.submit(basicRequest({ scheduler: { steps: 150 }, hyperparameters: { width: 1024, height: 1024 }, timeout_s: 1 }));
    const canceled = await farm.submit(basicRequest());
    expect((await farm.request('DELETE', `/v1/jobs/${canceled.id}`)).status).toBe(200);
    const hooked = await farm.submit(basicRequest({ webhook: { url: receiver.url, events: ['completed'] } }));
    const gens = [...long, ...quick, timedOut, canceled, hooked];
    const done = await Promise.all(gens.map((j) => farm.waitForDone(j.id, 60_000)));
    await farm.waitFor(async () => receiver.received.length >= 1, 10_000, 'the webhook');
    await farm.waitFor(async () => total(await scrape(url.dispatcher), 'kiln_queue_depth') === 0, 5_000, 'queue depth back to 0');

    let after = await all();
    const delta = (name: string, where: Record<string, string> = {}, pick: (s: Awaited<ReturnType<typeof all>>) => Sample[] = (s) => s.every) =>
      total(pick(after), name, where) - total(pick(before), name, where);
    // a process counts just after its write: the client can see a job's end (or a webhook) a moment before
    await farm.waitFor(
      async () => {
        after = await all();
        const idle = after.agents.every((a) => total(a, 'kiln_agent_state', { state: 'ready' }) === 1);
        return idle && delta('kiln_jobs_ended_total') === gens.length && delta('kiln_webhook_deliveries_total', { outcome: 'delivered' }, (s) => s.dispatcher) === 1;
      },
      5_000,
      'every process to have counted',
    );
    const succeeded = done.filter((j) => j.status === 'succeeded');
    expect(succeeded).toHaveLength(gens.length - 2);
    expect(done.find((j) => j.id === timedOut.id)?.error?.code).toBe('timeout');

    // submissions are counted by the API, ends by whichever process ended the job
    expect(delta('kiln_jobs_submitted_total', { kind: 'generation' }, (s) => s.api)).toBe(gens.length);
    expect(delta('kiln_http_requests_total', { method: 'POST', route: '/v1/generations', status: '202' }, (s) => s.api)).toBe(gens.length);
    expect(delta('kiln_jobs_ended_total', { kind: 'generation', outcome: 'succeeded', code: 'none' })).toBe(succeeded.length);
    expect(delta('kiln_jobs_ended_total', { kind: 'generation', outcome: 'failed', code: 'timeout' })).toBe(1);
    expect(delta('kiln_jobs_ended_total', { kind: 'generation', outcome: 'canceled', code: 'canceled' }, (s) => s.api)).toBe(1);
    expect(delta('kiln_jobs_ended_total')).toBe(gens.length);
    for (const stage of ['queued', 'model_load', 'inference', 'upload']) {
      expect(delta('kiln_job_stage_seconds_count', { kind: 'generation', stage }), stage).toBe(succeeded.length);
    }
    expect(delta('kiln_job_stage_seconds_sum', { stage: 'inference' })).toBeGreaterThan(4 * 1.2); // the long ones: 150 steps at 10 ms
    expect(delta('kiln_job_duration_seconds_count', { kind: 'generation' })).toBe(gens.length);

    // placement: one per attempt that ran, each with its reason; ticks timed
    const attempts = done.reduce((s, j) => s + j.attempt, 0);
    expect(delta('kiln_placement_decisions_total', { decision: 'placed' }, (s) => s.dispatcher)).toBe(attempts);
    const loads = done.filter((j) => (j.loaded_models ?? []).length > 0).length; // what loaded, not time spent (a busy host spends some with nothing to load)
    expect(delta('kiln_placement_decisions_total', { decision: 'placed', reason: 'model_resident' }, (s) => s.dispatcher)).toBeGreaterThanOrEqual(attempts - loads - 1);
    expect(delta('kiln_placement_tick_seconds_count', {}, (s) => s.dispatcher)).toBeGreaterThan(0);
    // the agents' model loads: one per job that had to load its model (the synthetic base is one model)
    expect(delta('kiln_model_loads_total', { tier: 'disk' })).toBe(loads);

    // webhooks: the one message, delivered once, timed
    expect(delta('kiln_webhook_deliveries_total', { outcome: 'delivered' }, (s) => s.dispatcher)).toBe(1);
    expect(delta('kiln_webhook_delivery_seconds_count', {}, (s) => s.dispatcher)).toBe(1);

    // the GPUs worked: about 1.5 s for each long job, 1 s for the one that timed out
    expect(delta('kiln_gpu_busy_seconds_total')).toBeGreaterThan(4 * 1.2);
    for (const [i, a] of after.agents.entries()) expect(total(a, 'kiln_agent_state', { state: 'ready', agent: farm.agentId(i) })).toBe(1);
    expect(total(after.dispatcher, 'kiln_queue_jobs')).toBe(0);
  }, 120_000);

  it('a forced model load and the evictions it causes are counted by tier', async () => {
    const agent1 = (s: Awaited<ReturnType<typeof all>>) => s.agents[1]!;
    const cache = async (model: string) => {
      const res = await farm.request('POST', '/v1/cache', { models: { base: model }, target: { agents: ['agent-1'] } });
      expect(res.status, JSON.stringify(res.body)).toBe(202);
      await farm.waitFor(async () => (await farm.get(`/v1/cache/${res.body.id}`)).body.status === 'succeeded', 20_000, `${model} cached`);
    };
    await cache(BASE); // base hot on agent-1, whatever ran there before
    const before = await all();
    await cache(TURBO); // cold from disk; base leaves VRAM (kept warm in host RAM)
    const mid = await all();
    expect(total(agent1(mid), 'kiln_model_loads_total', { tier: 'disk' }) - total(agent1(before), 'kiln_model_loads_total', { tier: 'disk' })).toBe(1);
    expect(total(agent1(mid), 'kiln_model_evictions_total', { tier: 'vram' }) - total(agent1(before), 'kiln_model_evictions_total', { tier: 'vram' })).toBe(1);
    await cache(BASE); // back from host RAM: a warm load; turbo leaves VRAM
    const after = await all();
    expect(total(agent1(after), 'kiln_model_loads_total', { tier: 'ram' }) - total(agent1(mid), 'kiln_model_loads_total', { tier: 'ram' })).toBe(1);
    expect(total(agent1(after), 'kiln_model_loads_total', { tier: 'disk' })).toBe(total(agent1(mid), 'kiln_model_loads_total', { tier: 'disk' }));
    expect(total(agent1(after), 'kiln_model_evictions_total', { tier: 'vram' }) - total(agent1(mid), 'kiln_model_evictions_total', { tier: 'vram' })).toBe(1);
    expect(total(agent1(after), 'kiln_vram_bytes', { kind: 'used' })).toBe(7000 * 1024 * 1024);
    // cache tasks are jobs too: submitted by the API, ended by the agent
    expect(total(after.api, 'kiln_jobs_submitted_total', { kind: 'cache' }) - total(before.api, 'kiln_jobs_submitted_total', { kind: 'cache' })).toBe(2);
    expect(total(agent1(after), 'kiln_jobs_ended_total', { kind: 'cache', outcome: 'succeeded' }) - total(agent1(before), 'kiln_jobs_ended_total', { kind: 'cache', outcome: 'succeeded' })).toBe(2);
  }, 60_000);

  it('storage errors are counted where they happen', async () => {
    const before = total(await scrape(url.api), 'kiln_s3_errors_total', { operation: 'ping' });
    await farm.s3.stop();
    try {
      expect((await fetch(`${farm.api}/readyz`)).status).toBe(503);
    } finally {
      await farm.s3.resume();
    }
    expect(total(await scrape(url.api), 'kiln_s3_errors_total', { operation: 'ping' })).toBeGreaterThan(before);
    expect(total(await scrape(url.api), 'kiln_http_requests_total', { route: '/readyz', status: '503' })).toBe(1);
  });
});
