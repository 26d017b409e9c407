import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { basicRequest, Farm, randomKey, sleep } from './support/farm.js';
import { scrape, total } from './support/metrics.js';

/**
 * Maintenance mode: an admin drains an agent; it finishes what it holds (the running job and
 * the next one on its queue), takes nothing new, and shows as draining in GET /v1/agents and in
 * the metrics, until resumed.
 */
const ADMIN = randomKey();
const CLIENT = randomKey();
const port0 = 33000 + Math.floor(Math.random() * 3000) * 2;

describe('agent maintenance mode', () => {
  const farm = new Farm({
    agents: 2,
    apiKey: ADMIN,
    env: { API_KEYS: `acme:${CLIENT}`, ADMIN_API_KEYS: `ops:${ADMIN}` },
    dispatcherEnv: { METRICS_PORT: String(port0) },
    agentEnv: (i) => ({ METRICS_PORT: String(port0 + 1 + i) }),
  });
  const agentMetrics = (i: number) => scrape(`http://127.0.0.1:${port0 + 1 + i}/metrics`);
  const long = () => basicRequest({ scheduler: { steps: 120 }, hyperparameters: { width: 1024, height: 1024, seed: 3 } });
  const state = async (id: string) => (await farm.agents()).find((a) => a.agent_id === id) as { state: string; maintenance: boolean } | undefined;

  beforeAll(() => farm.start(), 90_000);
  afterAll(() => farm.close());

  it('is admin-only and names unknown agents', async () => {
    expect((await farm.request('POST', '/v1/agents/agent-0/drain', undefined, { authorization: `Bearer ${CLIENT}` })).status).toBe(403);
    expect((await farm.request('POST', '/v1/agents/agent-0/drain', undefined, { authorization: '' })).status).toBe(401);
    const unknown = await farm.request('POST', '/v1/agents/agent-9/drain');
    expect(unknown.status).toBe(404);
    expect(unknown.body.error.code).toBe('not_found');
    expect((await state('agent-0'))?.maintenance).toBe(false);
  });

  it('a drained agent finishes the jobs it holds and gets nothing new; resumed, it takes work again', async () => {
    // everything goes to agent-0 while agent-1 is out: it holds two (running + next)
    expect((await farm.request('POST', '/v1/agents/agent-1/drain')).status).toBe(200);
    const held = [await farm.submit(long()), await farm.submit(long())];
    await farm.waitFor(async () => (await Promise.all(held.map((j) => farm.job(j.id)))).every((j) => j.agent === 'agent-0'), 10_000, 'both placed on agent-0');

    // now agent-0 goes into maintenance and agent-1 comes back
    const drained = await farm.request('POST', '/v1/agents/agent-0/drain');
    expect(drained.status).toBe(200);
    expect(drained.body).toMatchObject({ agent_id: 'agent-0', maintenance: true, agent: { agent_id: 'agent-0', state: 'draining', maintenance: true } });
    const resumed = await farm.request('POST', '/v1/agents/agent-1/resume');
    expect(resumed.body).toMatchObject({ agent_id: 'agent-1', maintenance: false });
    expect(await state('agent-0')).toMatchObject({ state: 'draining', maintenance: true });

    const after = await Promise.all([0, 1, 2].map(() => farm.submit(basicRequest())));
    const done = await Promise.all([...held, ...after].map((j) => farm.waitForDone(j.id, 30_000)));
    expect(done.map((j) => j.status)).toEqual(Array(5).fill('succeeded'));
    // what agent-0 held finished there, on its first attempt; nothing new went to it
    expect(done.slice(0, 2).map((j) => [j.agent, j.attempt])).toEqual([['agent-0', 1], ['agent-0', 1]]);
    expect(done.slice(2).map((j) => j.agent)).toEqual(['agent-1', 'agent-1', 'agent-1']);

    // visible in the metrics: the agent's own state and the dispatcher's fleet
    await farm.waitFor(async () => total(await agentMetrics(0), 'kiln_agent_state', { state: 'draining' }) === 1, 5_000, 'agent-0 reports draining');
    expect(total(await scrape(`http://127.0.0.1:${port0}/metrics`), 'kiln_agents', { state: 'draining' })).toBe(1);
    // its own heartbeat says so too, once it has nothing left
    expect(await state('agent-0')).toMatchObject({ state: 'draining', maintenance: true });

    // resumed, it is placed on again: drain agent-1 so the next job can only go to agent-0
    await farm.request('POST', '/v1/agents/agent-1/drain');
    const back = await farm.request('POST', '/v1/agents/agent-0/resume');
    expect(back.body).toMatchObject({ maintenance: false });
    await farm.waitFor(async () => (await state('agent-0'))?.state === 'ready', 5_000, 'agent-0 ready again');
    const next = await farm.waitForDone((await farm.submit(basicRequest())).id, 20_000);
    expect(next).toMatchObject({ status: 'succeeded', agent: 'agent-0' });
    // its gauge follows its heartbeat, which comes just after the job's end
    await farm.waitFor(async () => total(await agentMetrics(0), 'kiln_agent_state', { state: 'ready' }) === 1, 5_000, 'agent-0 reports ready');
    await farm.request('POST', '/v1/agents/agent-1/resume');
    await sleep(100);
  }, 90_000);
});
