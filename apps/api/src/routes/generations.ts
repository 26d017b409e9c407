import { randomInt, randomUUID } from 'node:crypto';
import { activationVramMb, GenerationRequest, MAX_SEED, type ParsedGenerationRequest, type StoredJob } from '@kiln/contracts';
import { assertPublicTarget, jobRecord, KilnError } from '@kiln/runtime';
import type { FastifyPluginAsyncZod } from 'fastify-type-provider-zod';
import { z } from 'zod';
import type { ApiContext } from '../context.js';

const IdempotencyKey = z.string().min(1).max(200).regex(/^[\x21-\x7e]+$/, 'printable ASCII without spaces');

/**
 * POST /v1/generations: validate, refuse what no live agent could ever run, record, enqueue.
 * The stored request is the parsed one (defaults filled, seed chosen), and it is exactly
 * what the worker receives.
 */
export function generationRoutes(ctx: ApiContext): FastifyPluginAsyncZod {
  return async (app) => {
    app.post(
      '/v1/generations',
      {
        schema: {
          body: GenerationRequest,
          headers: z.looseObject({ 'idempotency-key': IdempotencyKey.optional() }),
        },
      },
      async (req, reply) => {
        const request = req.body;
        const idemKey = req.headers['idempotency-key'];
        const idemRedisKey = idemKey ? ctx.keys.idempotency(req.client, idemKey) : null;
        const id = randomUUID();
        if (idemRedisKey) {
          const set = await ctx.redis.set(idemRedisKey, id, 'EX', ctx.env.IDEMPOTENCY_TTL_S, 'NX');
          if (set !== 'OK') {
            const existingId = await ctx.redis.get(idemRedisKey);
            const existing = existingId ? await ctx.store.get(existingId) : null;
            if (existing) {
              reply.header('idempotent-replayed', 'true');
              return reply.code(200).send(await jobRecord(existing, ctx.store, ctx.storage, ctx.env.PUBLIC_URL));
            }
            throw new KilnError('conflict', 'a request with this Idempotency-Key is still being submitted; retry shortly');
          }
        }
        try {
          await checkWebhook(ctx, request.webhook?.url);
          await checkFeasible(ctx, request);
          const hp = { ...request.hyperparameters, seed: request.hyperparameters.seed ?? randomInt(0, MAX_SEED) };
          const now = new Date().toISOString();
          const job: StoredJob = {
            id,
            kind: 'generation',
            client: req.client,
            status: 'queued',
            stage: 'queued',
            attempt: 0,
            agent: null,
            priority: request.priority,
            request: { ...request, hyperparameters: hp },
            progress: null,
            outputs: [],
            error: null,
            timings: { queued_ms: null, model_load_ms: null, inference_ms: null, upload_ms: null, total_ms: null },
            cancel_requested: false,
            created_at: now,
            started_at: null,
            finished_at: null,
          };
          await ctx.store.create(job);
          await ctx.jobs.enqueue(job);
          const record = await jobRecord(job, ctx.store, ctx.storage, ctx.env.PUBLIC_URL);
          return reply.code(202).header('location', record.links.self).send(record);
        } catch (err) {
          if (idemRedisKey) await ctx.redis.del(idemRedisKey);
          throw err;
        }
      },
    );
  };
}

async function checkWebhook(ctx: ApiContext, url: string | undefined): Promise<void> {
  if (!url) return;
  if (!ctx.env.WEBHOOK_SECRET) {
    throw new KilnError('validation_failed', 'invalid request: webhook: webhooks are disabled on this farm (WEBHOOK_SECRET is not set)', {
      details: [{ field: 'webhook', rule: 'webhooks_disabled', message: 'the operator must set WEBHOOK_SECRET to enable webhooks' }],
    });
  }
  if (ctx.env.WEBHOOK_ALLOW_PRIVATE) return;
  try {
    await assertPublicTarget(url);
  } catch (err) {
    const message = err instanceof Error ? err.message : String(err);
    throw new KilnError('validation_failed', `invalid request: webhook.url: ${message}`, { details: [{ field: 'webhook.url', rule: 'private_address', message }] });
  }
}

/**
 * Feasibility at the door: when agents are live and none of them could ever run this request
 * (unknown model, more VRAM than any GPU has), refuse it now with 422. With no live agent at
 * all, accept it: the dispatcher fails it as unschedulable if none appears within its grace.
 */
async function checkFeasible(ctx: ApiContext, request: ParsedGenerationRequest): Promise<void> {
  const agents = (await ctx.registry.live()).filter((a) => a.capabilities);
  if (agents.length === 0) return;
  const model = request.model.base;
  const withModel = agents.flatMap((a) => {
    const m = a.capabilities!.models.find((x) => x.name === model);
    return m ? [{ agent: a, model: m }] : [];
  });
  if (withModel.length === 0) {
    const known = [...new Set(agents.flatMap((a) => a.capabilities!.models.map((m) => m.name)))].sort();
    throw new KilnError('unschedulable', `no live agent can load model "${model}"`, {
      details: [{ field: 'model.base', rule: 'unknown_model', message: `available models: ${known.join(', ')}` }],
    });
  }
  const need = activationVramMb(request.hyperparameters);
  if (!withModel.some(({ agent, model: m }) => m.vram_mb + need <= agent.gpu.vram_total_mb)) {
    const biggest = Math.max(...withModel.map(({ agent }) => agent.gpu.vram_total_mb));
    throw new KilnError('unschedulable', `this request needs about ${withModel[0]!.model.vram_mb + need} MB of VRAM; the largest GPU with this model has ${biggest} MB`, {
      details: [{ field: 'hyperparameters', rule: 'exceeds_vram', message: 'reduce width, height or num_images' }],
    });
  }
  const scheduler = request.scheduler.type;
  if (!withModel.some(({ agent }) => agent.capabilities!.schedulers.includes(scheduler))) {
    throw new KilnError('unschedulable', `no live agent with this model supports scheduler ${scheduler}`, {
      details: [{ field: 'scheduler.type', rule: 'unsupported', message: 'see GET /v1/agents for what each agent supports' }],
    });
  }
}
