import { LoraRegistry, QUEUES } from '@kiln/runtime';
import { Queue } from 'bullmq';
import { expect, it } from 'vitest';
import { AgentQueues } from './agent-queues.js';
import { AgentViews, HeldView } from './agent-views.js';
import { heartbeat, resident, SDXL_BASE } from '../../../tests/support/heartbeat.js';
import { commandsDuring as commandsOn, intakeFixture, queuedJob } from '../../../tests/support/redis-fixture.js';

const f = intakeFixture('agent-views-test');
const queued = (priority: number, steps?: number) => queuedJob(f, priority, steps);
const commandsDuring = (fn: () => Promise<unknown>) => commandsOn(f.redis, fn);

it('reads an agent queue again only when the agent named itself, the dispatcher has not seen it, or at a full refresh', async () => {
  const q = new Queue(QUEUES.agent('a1'), { connection: f.redis, prefix: f.keys.prefix });
  try {
    const view = new HeldView(f.redis, f.keys);
    const queues = new Map([['a1', q]]);
    await q.add('job', { job_id: 'j1', attempt: 1, client: 'c', work: { key: 'generation m', steps: 4, pixels: 4 } }, { jobId: 'j1-a1' });
    expect((await view.read(queues, false)).get('a1')!.map((h) => [h.id, h.data.work?.steps])).toEqual([['j1-a1', 4]]);
    // the dispatcher records what it adds; an unchanged agent costs no command
    await q.add('job', { job_id: 'j2', attempt: 1, client: 'c' }, { jobId: 'j2-a1' });
    view.added('a1', 'j2-a1', { job_id: 'j2', attempt: 1, client: 'c' });
    const sent = await commandsDuring(() => view.read(queues, false));
    expect(sent).toEqual([]);
    // the agent finished j1 and said so: its queue is read again
    await q.remove('j1-a1');
    view.changed('a1');
    expect((await view.read(queues, false)).get('a1')!.map((h) => h.id)).toEqual(['j2-a1']);
    // something added behind the dispatcher's back shows at the next full refresh
    await q.add('job', { job_id: 'j3', attempt: 1, client: 'c' }, { jobId: 'j3-a1' });
    expect((await view.read(queues, false)).get('a1')!).toHaveLength(1);
    expect((await view.read(queues, true)).get('a1')!.map((h) => h.id)).toEqual(['j2-a1', 'j3-a1']);
  } finally {
    await q.close();
  }
});

it('drops the entry an agent names as it frees a slot without reading its queue; an entry it does not hold makes it read the queue', async () => {
  const q = new Queue(QUEUES.agent('a1'), { connection: f.redis, prefix: f.keys.prefix });
  try {
    const view = new HeldView(f.redis, f.keys);
    const queues = new Map([['a1', q]]);
    await q.add('job', { job_id: 'j1', attempt: 1, client: 'c' }, { jobId: 'j1-a1' });
    await q.add('job', { job_id: 'j2', attempt: 1, client: 'c' }, { jobId: 'j2-a1' });
    const before = (await view.read(queues, false)).get('a1')!;
    expect(before.map((h) => [h.id, h.processedOn])).toEqual([['j1-a1', null], ['j2-a1', null]]);
    // the agent's wake names the entry that left: the slot is free and the next entry is running, for no command
    await q.remove('j1-a1');
    view.entryLeft('a1', 'j1-a1');
    let held: Awaited<ReturnType<HeldView['read']>> = new Map();
    expect(await commandsDuring(async () => void (held = await view.read(queues, false)))).toEqual([]);
    expect(held.get('a1')!.map((h) => h.id)).toEqual(['j2-a1']);
    expect(held.get('a1')![0]!.processedOn).toBeGreaterThan(0);
    // a wake naming an entry this view never saw (an agent task added behind its back): the queue is read
    await q.add('task', { job_id: 'j3', attempt: 1, client: 'c' }, { jobId: 'j3-a1' });
    view.entryLeft('a1', 'j9-a1');
    expect((await view.read(queues, false)).get('a1')!.map((h) => h.id)).toEqual(['j2-a1', 'j3-a1']);
  } finally {
    await q.close();
  }
});

it("frees an agent's slot as soon as the job of its entry ended, before BullMQ moved the entry out of active", async () => {
  const q = new Queue(QUEUES.agent('a1'), { connection: f.redis, prefix: f.keys.prefix });
  try {
    const job = await queued(5);
    await f.store.update(job.id, { status: ['queued'] }, { status: 'running', stage: 'dispatched', agent: 'a1', attempt: 1 });
    await q.add('job', { job_id: job.id, attempt: 1, client: 'c' }, { jobId: `${job.id}-a1` });
    const view = new HeldView(f.redis, f.keys);
    const queues = new Map([['a1', q]]);
    expect((await view.read(queues, false)).get('a1')).toHaveLength(1);
    // the agent ended the job and woke the dispatcher; its entry is still in the queue
    await f.store.update(job.id, { status: ['running'], attempt: 1 }, { status: 'succeeded', stage: 'done', finished_at: new Date().toISOString() });
    view.changed('a1');
    expect((await view.read(queues, false)).get('a1')).toEqual([]);
    expect(await q.getJob(`${job.id}-a1`)).toBeTruthy();
  } finally {
    await q.close();
  }
});

it('keeps counting the model a finished job loaded until the agent beats again, so the next job does not evict it', async () => {
  const env = { AGENT_SLOTS: 2, SWEEP_INTERVAL_MS: 60_000, KILN_PREFIX: f.keys.prefix, QUEUE_KEEP_COMPLETED: 10, QUEUE_KEEP_FAILED: 10, QUEUE_KEEP_S: 60 };
  const queues = new AgentQueues(f.redis, env);
  try {
    const views = new AgentViews(env, new LoraRegistry(f.redis, f.keys), queues, f.redis, f.keys);
    const BASE = SDXL_BASE;
    const beat = (models: string[]) => heartbeat('a1', { gpu: { name: 'g', vram_total_mb: 10_240, vram_free_mb: 10_240 }, resident: models.map((m) => resident(m)) }, { [BASE]: 7_000 });
    const hbBefore = beat([]); // the beat the dispatcher holds: from before the job loaded its model
    const q = queues.get('a1');
    const job = await queued(5);
    await f.store.update(job.id, { status: ['queued'] }, { status: 'running', stage: 'dispatched', agent: 'a1', attempt: 1 });
    await q.add('job', { job_id: job.id, attempt: 1, client: 'c', models: [BASE], activation_mb: 100 }, { jobId: `${job.id}-a1` });
    expect([...(await views.build([hbBefore])).agents[0]!.resident]).toEqual([BASE]); // held: projected
    // the job ends (the agent beat with the model before writing it, but our snapshot is older)
    await f.store.update(job.id, { status: ['running'], attempt: 1 }, { status: 'succeeded', stage: 'done', finished_at: new Date().toISOString() });
    await q.remove(`${job.id}-a1`);
    views.changed('a1');
    const after = (await views.build([hbBefore])).agents[0]!;
    expect(after.free).toBe(2);
    expect([...after.resident]).toEqual([BASE]);
    // the next beat is the truth again: here the model was since unloaded
    expect([...(await views.build([beat([])])).agents[0]!.resident]).toEqual([]);
  } finally {
    await queues.close();
  }
});
