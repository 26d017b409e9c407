import { randomUUID } from 'node:crypto';
import { type CacheJob, type SelfTestJob, type StoredGroup } from '@kiln/contracts';
import { entryName, keepHistory, newJobFields, QUEUES, quietErrors, trackGroup } from '@kiln/runtime';
import { Queue } from 'bullmq';
import type { ApiContext } from './context.js';

type AgentTask = CacheJob | SelfTestJob;
/** What a task adds to the fields every job starts with: its kind, request and empty result. */
export type TaskBody<J extends AgentTask> = Pick<J, 'kind' | 'request'> & Omit<J, keyof ReturnType<typeof newJobFields> | 'kind' | 'request'>;

/**
 * Starts a group of agent tasks (cache, self-test): one job per target agent, each created
 * running on attempt 1 and put straight on that agent's own queue (high priority), where it runs
 * in order with the agent's other work; placement never moves it. The group's record shows each
 * agent's result. `models`: what the task makes resident in VRAM, so placement projects it.
 */
export async function startAgentTasks<J extends AgentTask>(
  ctx: ApiContext,
  kind: StoredGroup['kind'] & J['kind'],
  client: string,
  tasks: { body: TaskBody<J>; models?: string[] }[],
  webhook: StoredGroup['webhook'],
): Promise<StoredGroup> {
  const groupId = randomUUID();
  const now = new Date().toISOString();
  const children = tasks.map((t) => ({
    job: {
      ...newJobFields(randomUUID(), client, 'high', groupId, now),
      ...t.body,
      status: 'running',
      stage: 'dispatched',
      attempt: 1,
      agent: t.body.request.target_agent,
    } as J,
    models: t.models ?? [],
  }));
  const group: StoredGroup = { id: groupId, kind, client, status: 'running', priority: 'high', children: children.map((c) => c.job.id), webhook, cancel_requested: false, created_at: now, finished_at: null };
  await ctx.jobs.groups.create(group);
  await trackGroup(ctx.groupsQueue, group);
  for (const { job, models } of children) {
    await ctx.store.create(job);
    const q = quietErrors(new Queue(QUEUES.agent(job.agent!), { connection: ctx.redis, prefix: ctx.env.KILN_PREFIX }), `queue agent.${job.agent}`);
    await q.add(entryName(job), { job_id: job.id, attempt: 1, client, models }, { jobId: `${job.id}-a1`, ...keepHistory(ctx.env), priority: 1 });
    await q.close();
    await ctx.jobs.wake(job.agent!); // placement counts the task on that agent's queue at once
  }
  return group;
}
