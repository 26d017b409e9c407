import { AgentHeartbeat } from '@kiln/contracts';
import { KilnError } from '@kiln/runtime';
import type { FastifyPluginAsyncZod } from 'fastify-type-provider-zod';
import { z } from 'zod';
import type { ApiContext } from '../context.js';

const Params = z.object({ id: z.string().min(1).max(128) });
const Answer = z.object({
  agent_id: z.string(),
  maintenance: z.boolean(),
  agent: AgentHeartbeat.nullable().describe('the agent as GET /v1/agents shows it now; null while it is not live'),
});

/**
 * Maintenance mode (admin): `POST /v1/agents/:id/drain` takes an agent out of rotation — it
 * finishes the jobs it holds (the running one and the next) and placement gives it nothing new;
 * `POST /v1/agents/:id/resume` puts it back. The mark is kept in Redis, so an agent restarted
 * for its maintenance stays out until resumed. Both are idempotent.
 */
export function agentMaintenanceRoutes(ctx: ApiContext): FastifyPluginAsyncZod {
  return async (app) => {
    const answer = async (id: string, on: boolean) => {
      await ctx.registry.setMaintenance(id, on);
      await ctx.jobs.wake(); // a resumed agent can take work at once
      const agent = (await ctx.registry.live()).find((a) => a.agent_id === id) ?? null;
      ctx.log.info({ agent: id }, on ? 'agent drained for maintenance' : 'agent resumed');
      return { agent_id: id, maintenance: on, agent };
    };
    const known = async (id: string) => (await ctx.registry.registered()).includes(id);

    app.post(
      '/v1/agents/:id/drain',
      { config: { auth: 'admin' }, schema: { summary: 'Take an agent out of rotation', description: 'It finishes what it holds and gets nothing new, until resumed (admin).', params: Params, response: { 200: Answer } } },
      async (req) => {
        if (!(await known(req.params.id))) throw new KilnError('not_found', `no agent ${req.params.id}`);
        return answer(req.params.id, true);
      },
    );

    app.post(
      '/v1/agents/:id/resume',
      { config: { auth: 'admin' }, schema: { summary: 'Put a drained agent back in rotation', description: 'Admin.', params: Params, response: { 200: Answer } } },
      async (req) => {
        if (!(await known(req.params.id)) && !(await ctx.registry.inMaintenance(req.params.id))) throw new KilnError('not_found', `no agent ${req.params.id}`);
        return answer(req.params.id, false);
      },
    );
  };
}
