import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { basicRequest, Farm, sleep } from './support/farm.js';

/** Processes die mid-job; the job still finishes, once, and nothing is left stuck. */
describe('failures of workers and agents', () => {
  // slow steps (400 ms each at 1024×1024) so there is time to kill things mid-run
  const farm = new Farm({ agents: 2, env: { KILN_SYNTHETIC_STEP_MS: '400' } });
  beforeAll(() => farm.start());
  afterAll(() => farm.close());

  const slow = (seed: number) => basicRequest({ scheduler: { type: 'EulerDiscreteScheduler', steps: 10 }, hyperparameters: { seed, width: 1024, height: 1024 } });

  it('SIGKILL of the worker mid-job: the agent starts a fresh worker and the job succeeds on attempt 2', async () => {
    const submitted = await farm.submit(slow(1));
    const running = await farm.waitForJob(submitted.id, (j) => j.stage === 'running' && (j.progress?.step ?? 0) >= 1);
    const agent = (await farm.agents()).find((a) => a.agent_id === running.agent)!;
    const pid = agent.worker.pid!;
    process.kill(pid, 'SIGKILL');

    const job = await farm.waitForDone(submitted.id, 60_000);
    expect(job.status).toBe('succeeded');
    expect(job.attempt).toBe(2);
    expect(job.events.some((e) => e.message?.includes('worker_crashed'))).toBe(true);
    expect(job.outputs).toHaveLength(1);
    // the agent replaced its worker
    await farm.waitFor(async () => {
      const a = (await farm.agents()).find((x) => x.agent_id === running.agent);
      return !!a && a.worker.pid !== pid && a.worker.restarts >= 1 && a.state !== 'defunct';
    }, 20_000, 'worker restarted');
  });

  it('SIGKILL of an agent mid-job: the dispatcher re-places the job and it succeeds on the other agent', async () => {
    const submitted = await farm.submit(slow(2));
    const running = await farm.waitForJob(submitted.id, (j) => j.stage === 'running' && (j.progress?.step ?? 0) >= 1);
    const victim = running.agent!;
    const idx = Number(victim.split('-')[1]);
    const proc = farm.procs.get(victim)!;
    proc.kill('SIGKILL');
    await proc;

    const job = await farm.waitForDone(submitted.id, 60_000);
    expect(job.status).toBe('succeeded');
    expect(job.attempt).toBe(2);
    expect(job.agent).not.toBe(victim);
    expect(job.events.some((e) => e.message?.includes('agent_lost'))).toBe(true);
    // the output is the second run's own object
    const out = job.outputs[0]!;
    expect(out.key).toMatch(new RegExp(`^outputs/${job.id}/a2-[0-9a-f]{6}/0\\.png$`));
    expect((await fetch(out.url)).status).toBe(200);
    // the dead agent left the registry; bring it back for the next test
    await farm.waitFor(async () => !(await farm.agents()).some((a) => a.agent_id === victim), 10_000, 'dead agent removed');
    farm.startAgent(idx);
    await farm.waitForAgents(2);
  });

  it('SIGTERM of an agent: it stops taking work, hands back or finishes what it holds, and leaves cleanly', async () => {
    const jobs = await Promise.all([20, 21, 22].map((s) => farm.submit(slow(s))));
    const running = await farm.waitForJob(jobs[0]!.id, (j) => j.stage === 'running' && (j.progress?.step ?? 0) >= 1);
    const victim = running.agent!;
    const idx = Number(victim.split('-')[1]);
    const proc = farm.procs.get(victim)!;
    const t0 = Date.now();
    proc.kill('SIGTERM');
    const exit = await proc;
    expect(exit.exitCode).toBe(0);
    expect(Date.now() - t0).toBeLessThan(8_000);
    // gone from the registry at once, not after a heartbeat lapse
    expect((await farm.agents()).some((a) => a.agent_id === victim)).toBe(false);
    const done = await Promise.all(jobs.map((j) => farm.waitForDone(j.id, 60_000)));
    expect(done.map((j) => j.status)).toEqual(['succeeded', 'succeeded', 'succeeded']);
    // a hand-back is not a failure: no job was charged an attempt for it (the one handed back was
    // placed again as a new attempt)
    expect(done.every((j) => (j.charged_attempts ?? 0) === 0)).toBe(true);
    expect(done.every((j) => !j.events.some((e) => e.message?.includes('agent_lost')))).toBe(true);
    farm.startAgent(idx);
    await farm.waitForAgents(2);
  });

  it('cancelling a running job: canceled within about two seconds, and the worker takes the next job', async () => {
    const submitted = await farm.submit(slow(3));
    const running = await farm.waitForJob(submitted.id, (j) => j.stage === 'running' && (j.progress?.step ?? 0) >= 1);
    const asked = Date.now();
    const res = await farm.request('DELETE', `/v1/jobs/${submitted.id}`);
    expect(res.status).toBe(202);
    expect(res.body.cancel_requested).toBe(true);
    const job = await farm.waitForDone(submitted.id, 10_000);
    const took = Date.now() - asked;
    expect(job.status).toBe('canceled');
    expect(job.error?.code).toBe('canceled');
    expect(job.outputs).toEqual([]);
    expect(took).toBeLessThan(2_500);

    // the same agent, same worker, takes new work
    const pidBefore = (await farm.agents()).find((a) => a.agent_id === running.agent)!.worker.pid;
    const next = await farm.submit(basicRequest({ hyperparameters: { seed: 4, width: 256, height: 256 } }));
    expect((await farm.waitForDone(next.id, 30_000)).status).toBe('succeeded');
    expect((await farm.agents()).find((a) => a.agent_id === running.agent)!.worker.pid).toBe(pidBefore);
  });

  it('cancelling a queued job: canceled at once and never runs', async () => {
    // fill both agents' slots so the last job stays queued
    const fillers = await Promise.all([5, 6, 7, 8, 9, 10].map((s) => farm.submit(slow(s))));
    const queued = await farm.submit(slow(99));
    const res = await farm.request('DELETE', `/v1/jobs/${queued.id}`);
    expect([200, 202]).toContain(res.status);
    const job = await farm.waitForDone(queued.id, 20_000);
    expect(job.status).toBe('canceled');
    await sleep(300);
    expect((await farm.job(queued.id)).status).toBe('canceled');
    for (const f of fillers) await farm.request('DELETE', `/v1/jobs/${f.id}`);
    await Promise.all(fillers.map((f) => farm.waitForDone(f.id, 30_000)));
  });
});
