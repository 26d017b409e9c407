import { randomInt, randomUUID } from 'node:crypto';
import { IMAGE_LIMITS, LIMITS, MAX_SEED, ResolvedTrainingRequest, TRAINING_LIMITS, type TrainingJob, TrainingRequest, trainingVramMb } from '@kiln/contracts';
import { jobRecord, KilnError, newJobFields } from '@kiln/runtime';
import type { FastifyPluginAsyncZod } from 'fastify-type-provider-zod';
import { z } from 'zod';
import type { ApiContext } from '../context.js';
import { checkWebhookOf } from '../webhook-check.js';
import { cancelJob } from './jobs.js';

const Params = z.object({ id: z.string().min(1).max(100) });
const IMAGE_EXT = /\.(png|jpe?g|webp)$/i;
const bad = (field: string, rule: string, message: string) => new KilnError('validation_failed', `invalid request: ${field}: ${message}`, { details: [{ field, rule, message }] });

/**
 * POST /v1/trainings: a LoRA fine-tune of an SDXL base model on a dataset in S3 — a prefix of
 * images with same-named .txt captions, or a JSON manifest of { image, caption }. The API
 * resolves the dataset to a list of pairs (so every attempt trains on the same data), checks a
 * live agent can train on the base model, and queues it like any job. The result is a LoRA
 * registered under `output.name`, usable at once by generations on any agent.
 */
export function trainingRoutes(ctx: ApiContext): FastifyPluginAsyncZod {
  async function resolveDataset(d: { s3_prefix?: string; manifest?: string }): Promise<{ image: string; caption: string }[]> {
    if (d.manifest) {
      const raw = await ctx.storage.getBuffer(d.manifest, 16 * 1024 * 1024).catch((err) => {
        throw bad('dataset.manifest', 'manifest_unreadable', err instanceof Error ? err.message : String(err));
      });
      if (!raw) throw bad('dataset.manifest', 'not_found', `no object ${d.manifest} in the bucket`);
      const Manifest = z.array(z.strictObject({ image: z.string().regex(/^[A-Za-z0-9/_.-]+$/), caption: z.string().max(LIMITS.maxPromptChars) })).min(1).max(TRAINING_LIMITS.maxImages);
      let parsed;
      try {
        parsed = Manifest.safeParse(JSON.parse(raw.toString('utf8')));
      } catch {
        throw bad('dataset.manifest', 'invalid_json', 'the manifest is not JSON');
      }
      if (!parsed.success) throw bad('dataset.manifest', 'invalid_manifest', `must be a JSON array of { image, caption }: ${parsed.error.issues[0]?.message}`);
      for (const [i, item] of parsed.data.entries()) {
        const st = await ctx.storage.stat(item.image);
        if (!st) throw bad(`dataset.manifest`, 'image_not_found', `item ${i}: no object ${item.image}`);
        if (st.size > IMAGE_LIMITS.maxBytes) throw bad('dataset.manifest', 'image_too_large', `item ${i}: ${item.image} is larger than ${IMAGE_LIMITS.maxBytes} bytes`);
      }
      return parsed.data;
    }
    const prefix = d.s3_prefix!;
    const objects = await ctx.storage.list(prefix, TRAINING_LIMITS.maxImages * 2 + 10);
    const byStem = new Map<string, { image?: string; caption?: string; size?: number }>();
    for (const o of objects) {
      const stem = o.key.replace(/\.[^./]+$/, '');
      const entry = byStem.get(stem) ?? {};
      if (IMAGE_EXT.test(o.key)) Object.assign(entry, { image: o.key, size: o.size });
      else if (o.key.endsWith('.txt')) entry.caption = o.key;
      byStem.set(stem, entry);
    }
    const images = [...byStem.entries()].filter(([, e]) => e.image).sort(([a], [b]) => a.localeCompare(b));
    if (images.length === 0) throw bad('dataset.s3_prefix', 'empty_dataset', `no PNG, JPEG or WebP images under ${prefix}`);
    if (images.length > TRAINING_LIMITS.maxImages) throw bad('dataset.s3_prefix', 'too_many_images', `more than ${TRAINING_LIMITS.maxImages} images`);
    const missing = images.filter(([, e]) => !e.caption).map(([, e]) => e.image!);
    if (missing.length) throw bad('dataset.s3_prefix', 'missing_caption', `every image needs a same-named .txt caption; missing for ${missing.slice(0, 5).join(', ')}${missing.length > 5 ? ` and ${missing.length - 5} more` : ''}`);
    const big = images.find(([, e]) => (e.size ?? 0) > IMAGE_LIMITS.maxBytes);
    if (big) throw bad('dataset.s3_prefix', 'image_too_large', `${big[1].image} is larger than ${IMAGE_LIMITS.maxBytes} bytes`);
    return Promise.all(
      images.map(async ([, e]) => {
        const text = (await ctx.storage.getBuffer(e.caption!, 64 * 1024))?.toString('utf8').trim() ?? '';
        if (text.length > LIMITS.maxPromptChars) throw bad('dataset.s3_prefix', 'caption_too_long', `${e.caption} is longer than ${LIMITS.maxPromptChars} characters`);
        return { image: e.image!, caption: text };
      }),
    );
  }

  return async (app) => {
    app.post('/v1/trainings', { schema: { body: TrainingRequest } }, async (req, reply) => {
      const body = req.body;
      await checkWebhookOf(ctx, body.webhook?.url);
      if (await ctx.loras.get(body.output.name)) throw new KilnError('conflict', `a LoRA named ${body.output.name} already exists; choose another output.name`, { details: [{ field: 'output.name', rule: 'exists', message: 'LoRA names are unique' }] });
      const live = (await ctx.registry.live()).filter((a) => a.capabilities);
      if (live.length) {
        const trainers = live.filter((a) => a.capabilities!.features.includes('training'));
        if (!trainers.length) throw new KilnError('unschedulable', 'no live agent can train', { details: [{ field: '', rule: 'unsupported_feature', message: 'no live worker supports training' }] });
        const withBase = trainers.filter((a) => a.capabilities!.models.some((m) => m.name === body.base_model && m.kind === 'base'));
        if (!withBase.length) throw new KilnError('unschedulable', `no live agent has the base model "${body.base_model}"`, { details: [{ field: 'base_model', rule: 'unknown_model', message: `no live agent has the base model "${body.base_model}"` }] });
        const need = (a: (typeof live)[number]) => (a.capabilities!.models.find((m) => m.name === body.base_model)?.vram_mb ?? 0) + trainingVramMb(body);
        if (!withBase.some((a) => need(a) <= a.gpu.vram_total_mb))
          throw new KilnError('unschedulable', 'training needs more VRAM than any live GPU has', { details: [{ field: 'hyperparameters', rule: 'exceeds_vram', message: 'lower resolution or batch_size' }] });
      }
      const items = await resolveDataset(body.dataset);
      const id = randomUUID();
      const request = ResolvedTrainingRequest.parse({
        ...body,
        dataset: { items },
        hyperparameters: { ...body.hyperparameters, seed: body.hyperparameters.seed ?? randomInt(0, MAX_SEED) },
      });
      const job: TrainingJob = {
        ...newJobFields(id, req.client, request.priority),
        kind: 'training',
        request,
        training: { step: 0, total: request.hyperparameters.steps, loss: null, last_checkpoint: null, lora: null },
      };
      await ctx.store.create(job);
      await ctx.jobs.enqueue(job);
      const record = await jobRecord(job, ctx.store, ctx.storage, ctx.env.PUBLIC_URL);
      return reply.code(202).header('location', record.links.self).send(record);
    });

    const load = async (id: string) => {
      const job = await ctx.store.get(id);
      if (!job || job.kind !== 'training') throw new KilnError('not_found', `no training ${id}`);
      return job;
    };
    app.get('/v1/trainings/:id', { schema: { params: Params } }, async (req) => jobRecord(await load(req.params.id), ctx.store, ctx.storage, ctx.env.PUBLIC_URL));
    app.delete('/v1/trainings/:id', { schema: { params: Params } }, async (req, reply) => {
      await load(req.params.id);
      const { status, job } = await cancelJob(ctx, req.params.id);
      return reply.code(status).send(await jobRecord(job, ctx.store, ctx.storage, ctx.env.PUBLIC_URL));
    });

    /** Trained LoRAs (registry) and the LoRAs agents ship with. */
    app.get('/v1/loras', async () => {
      const trained = await ctx.loras.list();
      const shipped = [...new Set((await ctx.registry.live()).flatMap((a) => (a.capabilities?.models ?? []).filter((m) => m.kind === 'lora').map((m) => m.name)))].sort();
      return { trained, available_on_agents: shipped };
    });
  };
}
