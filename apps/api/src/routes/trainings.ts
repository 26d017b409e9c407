import { randomInt, randomUUID } from 'node:crypto';
import { ApiError, firstBadChar, IMAGE_LIMITS, JobRecord, LIMITS, LorasResponse, Text, MAX_SEED, ResolvedTrainingRequest, TRAINING_LIMITS, type TrainingJob, TrainedLora, TrainingRequest, trainingVramMb } from '@kiln/contracts';
import { KilnError, newJobFields, qualifiedLoraName } from '@kiln/runtime';
import type { FastifyPluginAsyncZod } from 'fastify-type-provider-zod';
import { z } from 'zod';
import type { ApiContext } from '../context.js';
import type { Principal } from '../keys.js';
import { admitJobs, releaseJobs } from '../quotas.js';
import { assertReachable, canSee, IdParams, loadVisible } from '../tenancy.js';
import { againstLiveAgents } from '../feasibility.js';
import { recordOf } from '../queue.js';
import { checkWebhookOf } from '../webhook-check.js';
import { cancelJob } from './jobs.js';

const ShareBody = z.strictObject({ name: z.string().min(1).max(200).describe('qualified name, <tenant>/<name>'), shared: z.boolean().default(true) });
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
  async function resolveDataset(who: Principal, d: { s3_prefix?: string; manifest?: string }): Promise<{ image: string; caption: string }[]> {
    if (d.manifest) {
      await assertReachable(ctx, who, d.manifest, 'dataset.manifest');
      const raw = await ctx.storage.getBuffer(d.manifest, 16 * 1024 * 1024).catch((err) => {
        throw bad('dataset.manifest', 'manifest_unreadable', err instanceof Error ? err.message : String(err));
      });
      if (!raw) throw bad('dataset.manifest', 'not_found', `no object ${d.manifest} in the bucket`);
      const Manifest = z.array(z.strictObject({ image: z.string().regex(/^[A-Za-z0-9/_.-]+$/), caption: Text.max(LIMITS.maxPromptChars) })).min(1).max(TRAINING_LIMITS.maxImages);
      let parsed;
      try {
        parsed = Manifest.safeParse(JSON.parse(raw.toString('utf8')));
      } catch {
        throw bad('dataset.manifest', 'invalid_json', 'the manifest is not JSON');
      }
      if (!parsed.success) throw bad('dataset.manifest', 'invalid_manifest', `must be a JSON array of { image, caption }: ${parsed.error.issues[0]?.message}`);
      for (const [i, item] of parsed.data.entries()) {
        await assertReachable(ctx, who, item.image, `dataset.manifest`);
        const st = await ctx.storage.stat(item.image);
        if (!st) throw bad(`dataset.manifest`, 'image_not_found', `item ${i}: no object ${item.image}`);
        if (st.size > IMAGE_LIMITS.maxBytes) throw bad('dataset.manifest', 'image_too_large', `item ${i}: ${item.image} is larger than ${IMAGE_LIMITS.maxBytes} bytes`);
      }
      return parsed.data;
    }
    const prefix = d.s3_prefix!;
    await assertReachable(ctx, who, prefix, 'dataset.s3_prefix', { prefix: true });
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
        // Windows line ends are fine in a caption file; other control characters are not
        const text = (await ctx.storage.getBuffer(e.caption!, 64 * 1024))?.toString('utf8').replace(/\r\n?/g, '\n').trim() ?? '';
        const badChar = firstBadChar(text);
        if (badChar) throw bad('dataset.s3_prefix', badChar.rule, `${e.caption} ${badChar.message}`);
        if (text.length > LIMITS.maxPromptChars) throw bad('dataset.s3_prefix', 'caption_too_long', `${e.caption} is longer than ${LIMITS.maxPromptChars} characters`);
        return { image: e.image!, caption: text };
      }),
    );
  }

  return async (app) => {
    const trainDoc = {
      summary: 'Start a LoRA fine-tune',
      description:
        'On an SDXL base model, from a dataset in the bucket: a prefix of images with same-named .txt captions, or a JSON manifest. The LoRA is registered as `<tenant>/<output.name>` (reserved now: a second training of the same name is a 409). 202 with the job record.',
      body: TrainingRequest,
      response: { 202: JobRecord, 409: ApiError, 422: ApiError },
    };
    app.post('/v1/trainings', { schema: trainDoc }, async (req, reply) => {
      const body = req.body;
      const who = req.principal;
      await checkWebhookOf(ctx, body.webhook?.url);
      await againstLiveAgents(ctx.registry, (all) => {
        const live = all.filter((a) => a.capabilities);
        if (live.length) {
          const trainers = live.filter((a) => a.capabilities!.features.includes('training'));
          if (!trainers.length) throw new KilnError('unschedulable', 'no live agent can train', { details: [{ field: '', rule: 'unsupported_feature', message: 'no live worker supports training' }] });
          const withBase = trainers.filter((a) => a.capabilities!.models.some((m) => m.name === body.base_model && m.kind === 'base'));
          if (!withBase.length) throw new KilnError('unschedulable', `no live agent has the base model "${body.base_model}"`, { details: [{ field: 'base_model', rule: 'unknown_model', message: `no live agent has the base model "${body.base_model}"` }] });
          const need = (a: (typeof live)[number]) => (a.capabilities!.models.find((m) => m.name === body.base_model)?.vram_mb ?? 0) + trainingVramMb(body);
          if (!withBase.some((a) => need(a) <= a.gpu.vram_total_mb))
            throw new KilnError('unschedulable', 'training needs more VRAM than any live GPU has', { details: [{ field: 'hyperparameters', rule: 'exceeds_vram', message: 'lower resolution or batch_size' }] });
        }
      });
      const items = await resolveDataset(who, body.dataset);
      const id = randomUUID();
      // the name is the tenant's from now on: two trainings cannot race for it
      const lora = qualifiedLoraName(who.tenant, body.output.name);
      if (!(await ctx.loras.reserve(lora, who.tenant, id)))
        throw new KilnError('conflict', `a LoRA named ${lora} already exists or is being trained; choose another output.name`, { details: [{ field: 'output.name', rule: 'exists', message: 'LoRA names are unique within a tenant' }] });
      try {
        await admitJobs(ctx, who, [id]);
      } catch (err) {
        await ctx.loras.release(lora, id);
        throw err;
      }
      try {
        const request = ResolvedTrainingRequest.parse({
          ...body,
          dataset: { items },
          hyperparameters: { ...body.hyperparameters, seed: body.hyperparameters.seed ?? randomInt(0, MAX_SEED) },
        });
        const job: TrainingJob = {
          ...newJobFields(id, who.tenant, request.priority),
          kind: 'training',
          request,
          training: { step: 0, total: request.hyperparameters.steps, loss: null, last_checkpoint: null, lora: null },
        };
        await ctx.store.create(job);
        await ctx.jobs.enqueue(job);
        const record = await recordOf(ctx, job);
        return reply.code(202).header('location', record.links.self).send(record);
      } catch (err) {
        await Promise.all([ctx.loras.release(lora, id), releaseJobs(ctx, who, [id])]);
        throw err;
      }
    });

    const load = (who: Principal, id: string) => loadVisible(who, id, 'training', (i) => ctx.store.get(i), (j) => j.kind === 'training');
    app.get('/v1/trainings/:id', { schema: { summary: 'A training', description: 'The job record, with `training` (step, total, loss, last checkpoint, the LoRA).', params: IdParams, response: { 200: JobRecord } } }, async (req) => recordOf(ctx, await load(req.principal, req.params.id)));
    app.delete('/v1/trainings/:id', { schema: { summary: 'Cancel a training', description: 'Stops it within a step and keeps the last checkpoint; like DELETE /v1/jobs/:id.', params: IdParams, response: { 200: JobRecord, 202: JobRecord, 409: ApiError } } }, async (req, reply) => {
      await load(req.principal, req.params.id);
      const { status, job } = await cancelJob(ctx, req.params.id);
      return reply.code(status).send(await recordOf(ctx, job));
    });

    /** Trained LoRAs the caller may use (its own and shared ones), and the LoRAs agents ship with. */
    app.get('/v1/loras', { schema: { summary: 'LoRAs the caller may use', response: { 200: LorasResponse } } }, async (req) => {
      const trained = (await ctx.loras.list()).filter((l) => l.shared || canSee(req.principal, l.tenant));
      const registered = new Set((await ctx.loras.list()).map((l) => l.name));
      const shipped = [
        ...new Set((await ctx.registry.live()).flatMap((a) => (a.capabilities?.models ?? []).filter((m) => m.kind === 'lora' && !registered.has(m.name)).map((m) => m.name))),
      ].sort();
      return { trained, available_on_agents: shipped };
    });

    /** An admin shares a tenant's LoRA with every tenant (or stops sharing it). */
    app.post('/v1/loras/share', { schema: { summary: "Share a tenant's LoRA with every tenant", description: '`"shared": false` stops sharing. Admin key.', body: ShareBody, response: { 200: TrainedLora, 404: ApiError } }, config: { auth: 'admin' } }, async (req) => {
      const lora = await ctx.loras.share(req.body.name, req.body.shared);
      if (!lora) throw new KilnError('not_found', `no trained LoRA ${req.body.name}`);
      return lora;
    });
  };
}
