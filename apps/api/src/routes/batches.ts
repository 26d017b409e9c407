import { randomInt, randomUUID } from 'node:crypto';
import {
  ApiError,
  BatchRequest,
  type GenerationJob,
  GenerationRequest,
  GroupRecord,
  isTerminal,
  issuesToDetails,
  MAX_SEED,
  ResolvedGenerationRequest,
  resolveScheduler,
  type StoredGroup,
} from '@kiln/contracts';
import { groupRecord, KilnError, newJobFields, trackGroup } from '@kiln/runtime';
import type { FastifyPluginAsyncZod } from 'fastify-type-provider-zod';
import type { ApiContext } from '../context.js';
import type { Principal } from '../keys.js';
import { againstLiveAgents, checkFeasible, resolveLoras } from '../feasibility.js';
import { ingestImages } from '../images.js';
import { checkWebhookOf } from '../webhook-check.js';
import { admitJobs, releaseJobs } from '../quotas.js';
import { assertImageKeysReachable, IdParams, loadVisible } from '../tenancy.js';
import { cancelJob } from './jobs.js';

/** Objects merge key by key; arrays and plain values from the item replace the default. */
export function mergeDefaults(defaults: unknown, item: unknown): unknown {
  if (isPlainObject(defaults) && isPlainObject(item)) {
    const out: Record<string, unknown> = { ...defaults };
    for (const [k, v] of Object.entries(item)) out[k] = k in defaults ? mergeDefaults(defaults[k], v) : v;
    return out;
  }
  return item === undefined ? defaults : item;
}
const isPlainObject = (v: unknown): v is Record<string, unknown> => typeof v === 'object' && v !== null && !Array.isArray(v);

/**
 * POST /v1/batches: many generation requests as one unit. Every item (merged over `defaults`)
 * is validated like a single request, and one bad item rejects the batch naming
 * `items.<index>.<field>`. Children fan out through intake like single jobs (late binding,
 * model affinity) just behind single jobs of the same priority; the batch ends when every
 * child has ended, with its webhook fired once.
 */
export function batchRoutes(ctx: ApiContext): FastifyPluginAsyncZod {
  const sources = { storage: ctx.storage, allowPrivate: ctx.env.INPUT_ALLOW_PRIVATE, fetchTimeoutMs: ctx.env.INPUT_FETCH_TIMEOUT_MS };
  const view = (g: StoredGroup) => groupRecord(g, ctx.jobs.groups, ctx.store, ctx.storage, ctx.env.PUBLIC_URL);
  const load = (who: Principal, id: string) => loadVisible(who, id, 'batch', (i) => ctx.jobs.groups.get(i), (g) => g.kind === 'batch');

  return async (app) => {
    const batchDoc = {
      summary: 'Submit a batch',
      description:
        'Up to 1000 generation requests as `items`, each merged over `defaults` and validated like a single request (one bad item rejects the batch naming `items.<index>.<field>`). 202 with the batch record; it ends when every child has ended.',
      body: BatchRequest,
      response: { 202: GroupRecord, 422: ApiError },
    };
    app.post('/v1/batches', { schema: batchDoc }, async (req, reply) => {
      const body = req.body;
      const who = req.principal;
      if (body.webhook) await checkWebhookOf(ctx, body.webhook.url, 'webhook');
      const batchId = randomUUID();
      const items = body.items.map((item, i) => {
        const merged = mergeDefaults(body.defaults, { priority: body.priority, ...item });
        const r = GenerationRequest.safeParse(merged);
        if (!r.success) {
          const details = issuesToDetails(r.error.issues, ['items', i]);
          throw new KilnError('validation_failed', `invalid request: items.${i}: ${details.map((d) => `${d.field}: ${d.message}`).join('; ')}`, { details });
        }
        return r.data;
      });
      const parsed: ReturnType<typeof checkFeasible>['request'][] = [];
      for (const [i, item] of items.entries()) {
        try {
          await assertImageKeysReachable(ctx, who, item);
          const { request, registered } = await resolveLoras(ctx, who, { ...item, scheduler: resolveScheduler(item.scheduler) });
          parsed.push((await againstLiveAgents(ctx.registry, (live) => checkFeasible(request, live, registered))).request);
        } catch (err) {
          if (err instanceof KilnError && err.details) {
            throw new KilnError(err.code, `items.${i}: ${err.message}`, { details: err.details.map((d) => ({ ...d, field: `items.${i}.${d.field}` })) });
          }
          throw err;
        }
      }
      for (const [i, r] of parsed.entries()) if (r.webhook) await checkWebhookOf(ctx, r.webhook.url, `items.${i}.webhook`);

      const now = new Date().toISOString();
      const ids = parsed.map(() => randomUUID());
      await admitJobs(ctx, who, ids);
      try {
        return await submit();
      } catch (err) {
        await releaseJobs(ctx, who, ids);
        throw err;
      }

      async function submit() {
      const children: GenerationJob[] = [];
      for (const [i, r] of parsed.entries()) {
        const id = ids[i]!;
        let withImages;
        try {
          withImages = await ingestImages(r, id, sources, true);
        } catch (err) {
          if (err instanceof KilnError && err.details) throw new KilnError(err.code, `items.${i}: ${err.message}`, { details: err.details.map((d) => ({ ...d, field: `items.${i}.${d.field}` })) });
          throw err;
        }
        const hp = { ...withImages.hyperparameters, seed: withImages.hyperparameters.seed ?? randomInt(0, MAX_SEED) };
        const request = ResolvedGenerationRequest.parse({ ...withImages, hyperparameters: hp });
        children.push({
          ...newJobFields(id, who.tenant, request.priority, batchId, now),
          kind: 'generation',
          request,
        });
      }
      const group: StoredGroup = {
        id: batchId,
        kind: 'batch',
        client: who.tenant,
        status: 'queued',
        priority: body.priority,
        children: children.map((c) => c.id),
        webhook: body.webhook ?? null,
        cancel_requested: false,
        created_at: now,
        finished_at: null,
      };
      // the group first: a child that ends fast must find it
      await ctx.jobs.groups.create(group);
      await trackGroup(ctx.groupsQueue, group);
      for (const c of children) await ctx.store.create(c);
      for (const c of children) await ctx.jobs.enqueue(c);
      const record = await view(group);
      return reply.code(202).header('location', record.links.self).send(record);
      }
    });

    app.get('/v1/batches/:id', { schema: { summary: 'A batch', description: 'Counts per state and each child\'s status, agent, outputs and error.', params: IdParams, response: { 200: GroupRecord } } }, async (req) => view(await load(req.principal, req.params.id)));

    /** Cancels every unfinished child; the batch ends `canceled` once they have. */
    app.delete('/v1/batches/:id', { schema: { summary: 'Cancel a batch', description: 'Cancels every unfinished child; the batch ends `canceled` once they have. A batch that already ended is a 409.', params: IdParams, response: { 202: GroupRecord, 409: ApiError } } }, async (req, reply) => {
      const group = await load(req.principal, req.params.id);
      if (['succeeded', 'failed', 'partially_succeeded'].includes(group.status)) throw new KilnError('conflict', `batch ${group.id} already ${group.status}`);
      const asked = (await ctx.jobs.groups.requestCancel(group.id))!;
      const children = await ctx.store.getMany(group.children);
      for (const c of children) if (c && !isTerminal(c.status)) await cancelJob(ctx, c.id).catch(() => {});
      return reply.code(202).send(await view((await ctx.jobs.groups.get(group.id)) ?? asked));
    });
  };
}
