import type { FastifyPluginAsyncZod } from 'fastify-type-provider-zod';
import type { z } from 'zod';
import { AgentsResponse, CapabilitiesResponse, ModelsResponse, SCHEDULER_ALIASES } from '@kiln/contracts';
import type { ApiContext } from '../context.js';

/** GET /v1/agents (live agents) and GET /v1/models (what the live agents can run). */
export function agentRoutes(ctx: ApiContext): FastifyPluginAsyncZod {
  return async (app) => {
    // a client sees the fleet, not which job (maybe another tenant's) each agent runs
    app.get('/v1/agents', { schema: { summary: 'Live agents', description: 'GPU, VRAM, resident models, state, worker; a client key sees no agent\'s current job.', response: { 200: AgentsResponse } } }, async (req) => ({
      agents: (await ctx.registry.live()).map((a) => (req.principal.role === 'admin' ? a : { ...a, current_job: null })),
    }));

    /** What the farm can do: per agent, and the union over live agents. */
    app.get('/v1/capabilities', { schema: { summary: 'What the farm can do', description: 'Per live agent, and the union over them: schedulers and aliases, ControlNet types, upscalers, features, formats, dtypes, performance options, models.', response: { 200: CapabilitiesResponse } } }, async () => {
      const agents = (await ctx.registry.live()).filter((a) => a.capabilities);
      const union = <T>(pick: (c: NonNullable<(typeof agents)[number]['capabilities']>) => T[]) =>
        [...new Set(agents.flatMap((a) => pick(a.capabilities!)))].sort();
      return {
        aggregate: {
          schedulers: union((c) => c.schedulers),
          scheduler_aliases: SCHEDULER_ALIASES,
          controlnet_types: union((c) => c.controlnet_types),
          controlnet_preprocessors: union((c) => c.controlnet_preprocessors),
          upscalers: ['lanczos', ...union((c) => c.upscalers)],
          features: union((c) => c.features),
          output_formats: union((c) => c.output_formats),
          dtypes: union((c) => c.dtypes),
          performance: union((c) => c.performance),
          models: union((c) => c.models.map((m) => m.name)),
          max_side: Math.max(0, ...agents.map((a) => a.capabilities!.max_side)),
          max_images: Math.max(0, ...agents.map((a) => a.capabilities!.max_images)),
        },
        agents: agents.map((a) => ({ agent_id: a.agent_id, vram_total_mb: a.gpu.vram_total_mb, ...a.capabilities! })),
      };
    });

    app.get('/v1/models', { schema: { summary: 'Models the live agents can run', description: 'Which agents can load each, and where each is resident now.', response: { 200: ModelsResponse } } }, async (): Promise<z.infer<typeof ModelsResponse>> => {
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
