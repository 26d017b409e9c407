import type { FastifyPluginAsyncZod } from 'fastify-type-provider-zod';
import type { z } from 'zod';
import type { ModelsResponse } from '@kiln/contracts';
import type { ApiContext } from '../context.js';

/** GET /v1/agents (live agents) and GET /v1/models (what the live agents can run). */
export function agentRoutes(ctx: ApiContext): FastifyPluginAsyncZod {
  return async (app) => {
    app.get('/v1/agents', async () => ({ agents: await ctx.registry.live() }));

    app.get('/v1/models', async (): Promise<z.infer<typeof ModelsResponse>> => {
      const models = new Map<string, z.infer<typeof ModelsResponse>['models'][number]>();
      for (const agent of await ctx.registry.live()) {
        for (const m of agent.capabilities?.models ?? []) {
          const entry = models.get(m.name) ?? { name: m.name, kind: m.kind, vram_mb: m.vram_mb, agents: [], resident_on: [] };
          entry.agents.push(agent.agent_id);
          if (agent.resident.some((r) => r.name === m.name)) entry.resident_on.push(agent.agent_id);
          models.set(m.name, entry);
        }
      }
      return { models: [...models.values()].sort((a, b) => a.name.localeCompare(b.name)) };
    });
  };
}
