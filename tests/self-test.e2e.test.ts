import { mkdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { resolve } from 'node:path';
import { execa } from 'execa';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { REPO_ROOT } from '../scripts/farm-lib.js';
import { basicRequest, Farm } from './support/farm.js';
import { OpenApiChecker } from './support/openapi.js';

/**
 * The GPU self-test through the API (issue 9): an admin starts it on chosen agents of a real farm;
 * each agent's worker runs the check with the models it has and the task's record carries the
 * report. Only the chosen agents run it; it waits for the job an agent is running; an agent that
 * dies fails its task (agent_lost); a cancel stops it; tenants cannot start or see it.
 */

const KEY_A = 'acme-selftest-key-0123456789';
const KEY_ADMIN = 'ops-selftest-key-0123456789';
const bearer = (k: string) => ({ authorization: `Bearer ${k}` });
const ENDED = ['succeeded', 'failed', 'partially_succeeded', 'canceled'];
const SHORT = { size: 64, steps: 2, schedulers: ['EulerDiscreteScheduler', 'HeunDiscreteScheduler'] };
/** The synthetic catalog's first base by name: the one the benchmark runs on. */
const PINNED = 'RunDiffusion/Juggernaut-XL-v9';

/** A safetensors file: an 8-byte little-endian header length, the JSON header, the tensor bytes. */
function safetensors(path: string, floats: number): void {
  const header = Buffer.from(JSON.stringify({ w: { dtype: 'F32', shape: [floats], data_offsets: [0, floats * 4] } }));
  const len = Buffer.alloc(8);
  len.writeBigUInt64LE(BigInt(header.length));
  writeFileSync(path, Buffer.concat([len, header, Buffer.alloc(floats * 4)]));
}

describe('self-test through the API', () => {
  const modelsDir = resolve(REPO_ROOT, '.kiln/test-models', `selftest-${process.pid}`);
  const farm = new Farm({
    agents: 2,
    apiKey: KEY_ADMIN,
    env: { API_KEYS: `acme:${KEY_A}`, ADMIN_API_KEYS: `ops:${KEY_ADMIN}`, KILN_SYNTHETIC_STEP_MS: '20', MODELS_DIR: modelsDir },
  });
  let checker: OpenApiChecker;
  const admin = {
    get: (path: string) => farm.request('GET', path, undefined, bearer(KEY_ADMIN)),
    post: (path: string, body: unknown) => farm.request('POST', path, body, bearer(KEY_ADMIN)),
    del: (path: string) => farm.request('DELETE', path, undefined, bearer(KEY_ADMIN)),
  };
  const checked = async (method: string, path: string, res: Promise<{ status: number; body: any; headers: Headers }>) => {
    const r = await res;
    checker.check(method, path, r.status, r.body);
    return r;
  };
  const settle = async (path: string, timeoutMs = 60_000) => {
    let rec: any;
    await farm.waitFor(async () => ENDED.includes((rec = (await admin.get(path)).body).status), timeoutMs, `${path} ends`);
    return rec;
  };

  beforeAll(async () => {
    mkdirSync(resolve(modelsDir, 'lora'), { recursive: true });
    safetensors(resolve(modelsDir, 'lora', 'team--good.safetensors'), 8);
    await farm.start();
    checker = new OpenApiChecker(await (await fetch(`${farm.api}/openapi.json`)).json());
  }, 120_000);
  afterAll(async () => {
    await farm.close();
    rmSync(modelsDir, { recursive: true, force: true });
  });

  it('an admin starts it on one agent of two: only that agent runs it, and its record carries the report', async () => {
    // a pinned model on that agent: the one the benchmark unloads and moves (the first base by name)
    const pin = await admin.post('/v1/cache', { models: { base: PINNED }, target: { agents: ['agent-1'] }, pin: true });
    expect((await settle(`/v1/cache/${pin.body.id}`)).status).toBe('succeeded');
    const started = await checked('POST', '/v1/admin/self-tests', admin.post('/v1/admin/self-tests', { agents: ['agent-1'], benchmark: SHORT, timeout_s: 120 }));
    expect(started.status, JSON.stringify(started.body)).toBe(202);
    const group = started.body;
    expect(group).toMatchObject({ kind: 'self_test', client: 'ops', status: 'running' });
    expect(group.children.map((c: any) => c.agent)).toEqual(['agent-1']);
    expect(started.headers.get('location')).toBe(group.links.self);
    expect(group.links.self).toBe(`${farm.api}/v1/admin/self-tests/${group.id}`);

    const ended = await settle(`/v1/admin/self-tests/${group.id}`);
    checker.check('GET', `/v1/admin/self-tests/${group.id}`, 200, ended);
    expect(ended.status).toBe('succeeded');
    const res = await checked('GET', `/v1/jobs/${ended.children[0].id}`, admin.get(`/v1/jobs/${ended.children[0].id}`));
    const task = res.body;
    expect(task).toMatchObject({ kind: 'self_test', status: 'succeeded', agent: 'agent-1', attempt: 1, group_id: group.id, error: null });
    expect(task.request).toEqual({ checks: ['environment', 'models', 'benchmark'], benchmark: SHORT, timeout_s: 120, target_agent: 'agent-1' });
    expect(task.links.retry).toBeUndefined();
    expect(task.links.group).toBe(group.links.self);

    const report = task.self_test.report;
    expect(report).toMatchObject({ backend: 'synthetic', verdict: 'pass', reasons: [] });
    expect(report.environment).toMatchObject({ backend: 'synthetic', cuda_available: false, devices: [] });
    // the model files of its MODELS_DIR, each with a verdict
    expect(report.models.models_dir).toBe(modelsDir);
    expect(report.models.items).toEqual([expect.objectContaining({ kind: 'lora', name: 'team/good', ok: true, problems: [], params: 8 })]);
    // benchmark rows, labelled as the synthetic backend's, never as GPU figures
    expect(report.benchmark).toMatchObject({ mode: 'synthetic', size: 64, steps: 2 });
    expect(report.benchmark.note).toContain('not GPU figures');
    const rows = Object.fromEntries(report.benchmark.rows.map((r: any) => [r.case, r]));
    for (const s of SHORT.schedulers) expect(rows[`base 64² 2 steps, ${s}`]).toMatchObject({ ok: true, steps: { base: 2 } });
    expect(Object.keys(rows).some((c) => c.startsWith('load ') && c.endsWith(' from disk'))).toBe(true);
    // the pinned model was put back, pinned, and the agent's heartbeat shows the residency after
    expect(report.residency.before).toContainEqual({ name: PINNED, location: 'vram', pinned: true });
    expect(report.residency.after).toContainEqual({ name: PINNED, location: 'vram', pinned: true });
    expect(report.residency.restored).toEqual([PINNED]);
    const agent = (await admin.get('/v1/agents')).body.agents.find((a: any) => a.agent_id === 'agent-1');
    const residency = (list: any[]) => list.map((r) => [r.name, r.location, r.pinned]).sort();
    expect(residency(agent.resident)).toEqual(residency(report.residency.after));
    // progress per case reached the record's history
    expect(task.events.some((e: any) => e.message?.startsWith('stage self_test:'))).toBe(true);

    // the other agent did not run it
    const logs = (name: string) => readFileSync(resolve(farm.logDir, `${name}.log`), 'utf8');
    expect(logs('agent-1')).toContain(task.id);
    expect(logs('agent-0')).not.toContain(task.id);
    const listed = await checked('GET', '/v1/jobs?kind=self_test', admin.get('/v1/jobs?kind=self_test'));
    expect(listed.body.data.map((j: any) => [j.id, j.agent])).toEqual([[task.id, 'agent-1']]);
  }, 90_000);

  it('refuses a tenant key (403), no key (401), and an agent that is not live (422 naming the field)', async () => {
    const tenant = await checked('POST', '/v1/admin/self-tests', farm.request('POST', '/v1/admin/self-tests', {}, bearer(KEY_A)));
    expect(tenant.status).toBe(403);
    const anonymous = await fetch(`${farm.api}/v1/admin/self-tests`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: '{}' });
    expect(anonymous.status).toBe(401);
    const unknown = await checked('POST', '/v1/admin/self-tests', admin.post('/v1/admin/self-tests', { agents: ['agent-1', 'agent-9'] }));
    expect(unknown.status).toBe(422);
    expect(unknown.body.error.details).toEqual([expect.objectContaining({ field: 'agents.1', rule: 'unknown_agent' })]);
    expect(unknown.body.error.message).toContain('agent-9');
    const bad = await checked('POST', '/v1/admin/self-tests', admin.post('/v1/admin/self-tests', { benchmark: { steps: 500 } }));
    expect(bad.status).toBe(400);
    expect(bad.body.error.details[0].field).toBe('benchmark.steps');
    // nothing was queued by the refusals
    expect((await admin.get('/v1/jobs?kind=self_test')).body.data).toHaveLength(1);
    // a tenant sees neither the request nor its tasks
    const [first] = (await admin.get('/v1/jobs?kind=self_test')).body.data;
    expect((await farm.request('GET', `/v1/jobs/${first.id}`, undefined, bearer(KEY_A))).status).toBe(404);
    expect((await farm.request('GET', `/v1/admin/self-tests/${first.group_id}`, undefined, bearer(KEY_A))).status).toBe(403);
  });

  it('kiln self-test --wait prints each agent\'s verdict and rows; --json gives the reports; a tenant key exits 1', async () => {
    const bin = resolve(REPO_ROOT, 'packages/client/bin/kiln.mjs');
    const kiln = (key: string, ...args: string[]) => execa('node', [bin, ...args], { env: { KILN_URL: farm.api, KILN_API_KEY: key }, reject: false, timeout: 120_000 });
    const human = await kiln(KEY_ADMIN, 'self-test', '--agent', 'agent-0', '--size', '64', '--steps', '2', '--scheduler', 'EulerDiscreteScheduler', '--wait');
    expect(human.exitCode, human.stderr).toBe(0);
    expect(human.stdout).toContain('agent-0: PASS (synthetic, benchmark synthetic)');
    expect(human.stdout).toMatch(/base 64² 2 steps, EulerDiscreteScheduler\s+\d+(\.\d+)? ms/);
    const reports = JSON.parse((await kiln(KEY_ADMIN, '--json', 'self-test', '--agent', 'agent-1', '--checks', 'environment,models', '--wait')).stdout);
    expect(reports).toEqual([expect.objectContaining({ agent: 'agent-1', status: 'succeeded', report: expect.objectContaining({ verdict: 'pass', benchmark: null }) })]);
    const refused = await kiln(KEY_A, 'self-test');
    expect(refused.exitCode).toBe(1);
    expect(refused.stderr).toContain('403 forbidden');
  }, 90_000);

  it('waits for the job its agent is running, then runs', async () => {
    const gen = await farm.request('POST', '/v1/generations', basicRequest({ scheduler: { steps: 60 }, hyperparameters: { seed: 3, width: 1024, height: 1024 } }), bearer(KEY_A));
    const running = await farm.waitForJob(gen.body.id, (j) => j.stage === 'running' && (j.progress?.step ?? 0) >= 1);
    const started = await admin.post('/v1/admin/self-tests', { agents: [running.agent], checks: ['environment'] });
    expect(started.status).toBe(202);
    const ended = await settle(`/v1/admin/self-tests/${started.body.id}`);
    expect(ended.status).toBe('succeeded');
    const task = (await admin.get(`/v1/jobs/${ended.children[0].id}`)).body;
    const done = await farm.waitForDone(gen.body.id);
    expect(done.status).toBe('succeeded');
    // the worker took the self-test only once it had answered the generation: the generation ran
    // (from its start: model load, then inference) before the self-test's first progress
    const firstProgress = task.events.find((e: any) => e.message?.startsWith('stage self_test:'));
    const generationRan = Date.parse(done.started_at!) + done.timings.model_load_ms! + done.timings.inference_ms!;
    expect(Date.parse(firstProgress.at)).toBeGreaterThanOrEqual(generationRan - 5);
    expect(task.self_test.report.benchmark).toBeNull();
    expect(task.self_test.report.checks).toEqual(['environment']);
  }, 60_000);

  it('a cancel stops it; an agent that dies fails its task with agent_lost instead of leaving it stuck', async () => {
    const long = { size: 1024, steps: 50 };
    const started = await admin.post('/v1/admin/self-tests', { agents: ['agent-0'], benchmark: long });
    const task = started.body.children[0].id;
    await farm.waitFor(async () => ((await admin.get(`/v1/jobs/${task}`)).body.progress?.step ?? 0) >= 3, 30_000, 'the benchmark has begun');
    const canceled = await checked('DELETE', `/v1/admin/self-tests/${started.body.id}`, admin.del(`/v1/admin/self-tests/${started.body.id}`));
    expect(canceled.status).toBe(202);
    const ended = await settle(`/v1/admin/self-tests/${started.body.id}`, 30_000);
    expect(ended.status).toBe('canceled');
    expect(ended.children[0]).toMatchObject({ status: 'canceled', error: { code: 'canceled' } });
    const again = await checked('DELETE', `/v1/admin/self-tests/${started.body.id}`, admin.del(`/v1/admin/self-tests/${started.body.id}`));
    expect(again.status).toBe(409);

    // agent-1 holds a long generation; its self-test waits behind it when the agent dies
    const gen = await farm.request('POST', '/v1/generations', basicRequest({ scheduler: { steps: 150 }, hyperparameters: { seed: 4, width: 1024, height: 1024 } }), bearer(KEY_A));
    const running = await farm.waitForJob(gen.body.id, (j) => j.stage === 'running' && (j.progress?.step ?? 0) >= 1);
    const victim = running.agent!;
    const queued = await admin.post('/v1/admin/self-tests', { agents: [victim], checks: ['environment'] });
    expect(queued.status).toBe(202);
    const proc = farm.procs.get(victim)!;
    proc.kill('SIGKILL');
    await proc;
    const lost = await settle(`/v1/admin/self-tests/${queued.body.id}`, 30_000);
    expect(lost.status).toBe('failed');
    expect(lost.children[0]).toMatchObject({ status: 'failed', agent: victim, error: { code: 'agent_lost' } });
    // the generation is not the self-test's: it goes on elsewhere
    expect((await farm.waitForDone(gen.body.id, 60_000)).status).toBe('succeeded');
    await farm.waitFor(async () => !(await farm.agents()).some((a) => a.agent_id === victim), 10_000, 'dead agent removed');
    farm.startAgent(Number(victim.split('-')[1]));
    await farm.waitForAgents(2);
  }, 120_000);
});
