import { type AgentHeartbeat, ApiError, isTerminal, type CacheJob, CacheRequest, type CacheTask, EvictRequest, GroupRecord, type ModelInfo, NothingToEvict, ResidencyResponse, type StoredGroup } from '@kiln/contracts';
import { groupRecord, KilnError } from '@kiln/runtime';
import type { FastifyPluginAsyncZod } from 'fastify-type-provider-zod';
import { startAgentTasks } from '../agent-tasks.js';
import type { ApiContext } from '../context.js';
import { IdParams, loadVisible } from '../tenancy.js';
import { checkWebhookOf } from '../webhook-check.js';
import { cancelJob } from './jobs.js';

type Agent = AgentHeartbeat & { capabilities: NonNullable<AgentHeartbeat['capabilities']> };

const unschedulable = (field: string, rule: string, message: string) =>
  new KilnError('unschedulable', `invalid cache request: ${field}: ${message}`, { details: [{ field, rule, message }] });

/**
 * Model residency. POST /v1/cache loads a suite onto chosen agents (all, a number of replicas,
 * or named ones), hot in VRAM or warm in host RAM, optionally pinned so placement never evicts
 * it; DELETE /v1/cache evicts; GET /v1/cache shows what is resident where. Each agent's share
 * runs on that agent's own queue, in order with its other work; the request is a group whose
 * record shows each agent's result.
 */
export function cacheRoutes(ctx: ApiContext): FastifyPluginAsyncZod {
  const view = (g: StoredGroup) => groupRecord(g, ctx.jobs.groups, ctx.store, ctx.storage, ctx.env.PUBLIC_URL);

  // a cache task belongs to its target agent: it starts placed there, on attempt 1
  const dispatch = (client: string, tasks: CacheTask[], webhook: StoredGroup['webhook']) =>
    startAgentTasks<CacheJob>(
      ctx,
      'cache',
      client,
      tasks.map((t) => ({ body: { kind: 'cache', request: t, cache: null }, models: t.action === 'load' && t.location === 'vram' ? t.models : [] })),
      webhook,
    );

  return async (app) => {
    app.get('/v1/cache', { schema: { summary: 'What is resident where', description: 'Per live agent: VRAM, and each resident model\'s size, location (vram or ram), pinned flag and last use.', response: { 200: ResidencyResponse } } }, async () => ({
      agents: (await ctx.registry.live()).map((a) => ({
        agent_id: a.agent_id,
        state: a.state,
        vram_total_mb: a.gpu.vram_total_mb,
        vram_free_mb: a.gpu.vram_free_mb,
        resident: a.resident,
      })),
    }));

    app.get('/v1/cache/:id', { schema: { summary: 'A cache request', description: 'Each target agent\'s share and its result.', params: IdParams, response: { 200: GroupRecord } } }, async (req) =>
      view(await loadVisible(req.principal, req.params.id, 'cache request', (i) => ctx.jobs.groups.get(i), (g) => g.kind === 'cache')),
    );

    /** Cancels the request's loads not yet done on their agents; it ends `canceled` once they have. */
    app.delete(
      '/v1/cache/:id',
      {
        schema: { summary: 'Cancel a cache request', description: 'Cancels its loads (or evictions) not yet done on their agents. Admin key; one that has ended is a 409.', params: IdParams, response: { 202: GroupRecord, 409: ApiError } },
        config: { auth: 'admin' },
      },
      async (req, reply) => {
        const group = await loadVisible(req.principal, req.params.id, 'cache request', (i) => ctx.jobs.groups.get(i), (g) => g.kind === 'cache');
        if (['succeeded', 'failed', 'partially_succeeded', 'canceled'].includes(group.status)) throw new KilnError('conflict', `cache request ${group.id} already ${group.status}`);
        const asked = (await ctx.jobs.groups.requestCancel(group.id))!;
        const children = await ctx.store.getMany(group.children);
        for (const c of children) if (c && !isTerminal(c.status)) await cancelJob(ctx, c.id).catch(() => {});
        return reply.code(202).send(await view((await ctx.jobs.groups.get(group.id)) ?? asked));
      },
    );

    // loading, pinning and evicting change what every tenant's jobs run on: admins only
    const loadDoc = {
      summary: 'Load (and pin) a model suite',
      description: 'Onto all live agents, a number of replicas, or named agents; into VRAM (hot) or host RAM (warm). 202 with the cache request\'s record. Admin key.',
      body: CacheRequest,
      response: { 202: GroupRecord, 422: ApiError },
    };
    app.post('/v1/cache', { schema: loadDoc, config: { auth: 'admin' } }, async (req, reply) => {
      const body = req.body;
      await checkWebhookOf(ctx, body.webhook?.url);
      const m = body.models;
      const wanted: { name: string; field: string; kind: ModelInfo['kind'] }[] = [
        ...(m.base ? [{ name: m.base, field: 'models.base', kind: 'base' as const }] : []),
        ...(m.refiner ? [{ name: m.refiner, field: 'models.refiner', kind: 'refiner' as const }] : []),
        ...(m.vae ? [{ name: m.vae, field: 'models.vae', kind: 'vae' as const }] : []),
        ...(m.loras ?? []).map((name, i) => ({ name, field: `models.loras.${i}`, kind: 'lora' as const })),
        ...(m.controlnets ?? []).map((name, i) => ({ name, field: `models.controlnets.${i}`, kind: 'controlnet' as const })),
        ...(m.upscaler ? [{ name: m.upscaler, field: 'models.upscaler', kind: 'upscaler' as const }] : []),
      ];
      const live = (await ctx.registry.live()).filter((a): a is Agent => !!a.capabilities && a.state !== 'draining');
      if (live.length === 0) throw unschedulable('target', 'no_live_agent', 'no agent is live to load models onto');
      for (const w of wanted) {
        if (!live.some((a) => a.capabilities.models.some((x) => x.name === w.name && x.kind === w.kind)))
          throw unschedulable(w.field, 'unknown_model', `no live agent has the ${w.kind} "${w.name}"`);
      }
      const sizeOn = (a: Agent) => wanted.reduce((s, w) => s + (a.capabilities.models.find((x) => x.name === w.name)?.vram_mb ?? 0), 0);
      const capable = live.filter((a) => wanted.every((w) => a.capabilities.models.some((x) => x.name === w.name)) && (body.location === 'ram' || sizeOn(a) <= a.gpu.vram_total_mb));
      let targets: Agent[];
      if ('agents' in body.target) {
        targets = body.target.agents.map((id, i) => {
          const a = live.find((x) => x.agent_id === id);
          if (!a) throw unschedulable(`target.agents.${i}`, 'unknown_agent', `no live agent ${id}`);
          if (!capable.includes(a)) throw unschedulable(`target.agents.${i}`, 'incapable_agent', `agent ${id} cannot hold this suite`);
          return a;
        });
      } else {
        if (capable.length === 0) throw unschedulable('models', 'no_single_agent', 'no live agent can hold every model of this suite');
        // replicas: agents already holding the most of the suite first, then the most free VRAM
        const held = (a: Agent) => wanted.filter((w) => a.resident.some((r) => r.name === w.name)).length;
        const ranked = [...capable].sort((a, b) => held(b) - held(a) || b.gpu.vram_free_mb - a.gpu.vram_free_mb || a.agent_id.localeCompare(b.agent_id));
        if ('replicas' in body.target && body.target.replicas > capable.length)
          throw unschedulable('target.replicas', 'too_many_replicas', `only ${capable.length} live agent(s) can hold this suite`);
        targets = 'replicas' in body.target ? ranked.slice(0, body.target.replicas) : ranked;
      }
      const models = wanted.map((w) => w.name);
      const group = await dispatch(req.principal.tenant, targets.map((a) => ({ action: 'load', models, location: body.location, pin: body.pin, target_agent: a.agent_id })), body.webhook ?? null);
      const record = await view(group);
      return reply.code(202).header('location', record.links.self).send(record);
    });

    const evictDoc = {
      summary: 'Evict (and unpin) models',
      description: 'From the named agents, or every live agent holding them: 202 with the request\'s record, or 200 when no live agent holds them. Admin key.',
      body: EvictRequest,
      response: { 200: NothingToEvict, 202: GroupRecord, 422: ApiError },
    };
    app.delete('/v1/cache', { schema: evictDoc, config: { auth: 'admin' } }, async (req, reply) => {
      const live = await ctx.registry.live();
      const targets = req.body.agents
        ? req.body.agents.map((id, i) => {
            const a = live.find((x) => x.agent_id === id);
            if (!a) throw unschedulable(`agents.${i}`, 'unknown_agent', `no live agent ${id}`);
            return a;
          })
        : live.filter((a) => a.resident.some((r) => req.body.models.includes(r.name)));
      if (targets.length === 0) return reply.code(200).send({ evicted: [], message: 'no live agent holds these models' });
      const group = await dispatch(req.principal.tenant, targets.map((a) => ({ action: 'unload', models: req.body.models, location: 'vram', pin: false, target_agent: a.agent_id })), null);
      return reply.code(202).send(await view(group));
    });
  };
}
