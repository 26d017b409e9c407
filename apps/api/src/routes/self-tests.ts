import { ApiError, GroupRecord, isTerminal, type SelfTestJob, SelfTestRequest, type StoredGroup } from '@kiln/contracts';
import { groupRecord, KilnError } from '@kiln/runtime';
import type { FastifyPluginAsyncZod } from 'fastify-type-provider-zod';
import { startAgentTasks } from '../agent-tasks.js';
import type { ApiContext } from '../context.js';
import { IdParams, loadVisible } from '../tenancy.js';
import { checkWebhookOf } from '../webhook-check.js';
import { cancelJob } from './jobs.js';

const unschedulable = (field: string, rule: string, message: string) =>
  new KilnError('unschedulable', `invalid self-test request: ${field}: ${message}`, { details: [{ field, rule, message }] });

/**
 * The GPU self-test through the API (admin): `POST /v1/admin/self-tests` runs the GPU check
 * (`npm run gpu-check`: environment, model validation, benchmark) in the workers of chosen
 * agents, or every live one. Like a cache request it is a group with one task per agent, put on
 * that agent's own queue: it waits behind the job the agent is running, runs in its worker with
 * the models it has, and its record carries the report. An agent that is gone fails its task
 * (agent_lost); nothing is placed elsewhere.
 */
export function selfTestRoutes(ctx: ApiContext): FastifyPluginAsyncZod {
  const view = (g: StoredGroup) => groupRecord(g, ctx.jobs.groups, ctx.store, ctx.storage, ctx.env.PUBLIC_URL);
  const load = (principal: Parameters<typeof loadVisible>[0], id: string) =>
    loadVisible(principal, id, 'self-test', (i) => ctx.jobs.groups.get(i), (g) => g.kind === 'self_test');

  return async (app) => {
    app.post(
      '/v1/admin/self-tests',
      {
        config: { auth: 'admin' },
        schema: {
          summary: 'Run the GPU self-test on agents',
          description:
            "The GPU check in the workers of the named agents (or every live one): environment, every model in MODELS_DIR with a verdict, and a bounded timed benchmark. One task per agent, on that agent's own queue (it waits for the job the agent is running). 202 with the request's record; each task's record (GET /v1/jobs/:id) carries `self_test.report` with a pass/fail verdict and its reasons. On the synthetic backend the benchmark rows are simulated and labelled so; without a GPU or weights the diffusers backend benchmarks the tiny random pipeline and says so. Admin key.",
          body: SelfTestRequest,
          response: { 202: GroupRecord, 422: ApiError },
        },
      },
      async (req, reply) => {
        const body = req.body;
        await checkWebhookOf(ctx, body.webhook?.url);
        // an agent shutting down takes nothing new; one in maintenance (drained by an operator) does: testing it is why it was drained
        const usable = (await ctx.registry.live()).filter((a) => !!a.capabilities && !(a.state === 'draining' && !a.maintenance));
        let targets: string[];
        if (body.agents === 'all') {
          if (usable.length === 0) throw unschedulable('agents', 'no_live_agent', 'no agent is live with a ready worker');
          targets = usable.map((a) => a.agent_id).sort();
        } else {
          targets = body.agents.map((id, i) => {
            if (!usable.some((a) => a.agent_id === id)) throw unschedulable(`agents.${i}`, 'unknown_agent', `no live agent ${id} with a ready worker`);
            return id;
          });
        }
        const group = await startAgentTasks<SelfTestJob>(
          ctx,
          'self_test',
          req.principal.tenant,
          targets.map((agent) => ({
            body: { kind: 'self_test', request: { checks: body.checks, benchmark: body.benchmark, timeout_s: body.timeout_s, target_agent: agent }, self_test: null },
          })),
          body.webhook ?? null,
        );
        ctx.log.info({ group: group.id, agents: targets, checks: body.checks }, 'self-test started');
        const record = await view(group);
        return reply.code(202).header('location', record.links.self).send(record);
      },
    );

    app.get(
      '/v1/admin/self-tests/:id',
      {
        config: { auth: 'admin' },
        schema: { summary: 'A self-test request', description: "Each agent's task: its status and error; the report is on each task's record (children[].id → GET /v1/jobs/:id). Admin key.", params: IdParams, response: { 200: GroupRecord } },
      },
      async (req) => view(await load(req.principal, req.params.id)),
    );

    app.delete(
      '/v1/admin/self-tests/:id',
      {
        config: { auth: 'admin' },
        schema: { summary: 'Cancel a self-test request', description: 'Cancels its tasks not yet done: a running one stops between cases, its pinned models put back. Admin key; one that has ended is a 409.', params: IdParams, response: { 202: GroupRecord, 409: ApiError } },
      },
      async (req, reply) => {
        const group = await load(req.principal, req.params.id);
        if (['succeeded', 'failed', 'partially_succeeded', 'canceled'].includes(group.status)) throw new KilnError('conflict', `self-test ${group.id} already ${group.status}`);
        const asked = (await ctx.jobs.groups.requestCancel(group.id))!;
        for (const c of await ctx.store.getMany(group.children)) if (c && !isTerminal(c.status)) await cancelJob(ctx, c.id).catch(() => {});
        return reply.code(202).send(await view((await ctx.jobs.groups.get(group.id)) ?? asked));
      },
    );
  };
}
