import { randomUUID } from 'node:crypto';
import { isTerminal, type GenerationJob, type StoredJob, type TrainingJob } from '@kiln/contracts';
import { KilnError, newJobFields, qualifiedLoraName } from '@kiln/runtime';
import type { ApiContext } from './context.js';
import type { Principal } from './keys.js';
import { admitJobs, releaseJobs } from './quotas.js';

const conflict = (message: string) => new KilnError('conflict', message, { details: [{ field: '', rule: 'not_retryable', message }] });

/**
 * POST /v1/jobs/:id/retry: a new job with the same request as an ended one (the seed included,
 * so a retry of a succeeded job makes the same images), in the same tenant, standalone (a batch
 * child's retry is not in the batch). The new job says `retry_of`; the old one lists it in
 * `retried_as`. Its inputs are copied under the new job, so they live as long as it does; a
 * training reserves its LoRA name again (a 409 once that LoRA exists). A cache or self-test task
 * is not retried on its own: it belongs to its request.
 */
export async function retryJob(ctx: ApiContext, who: Principal, old: StoredJob): Promise<StoredJob> {
  if (!isTerminal(old.status)) throw conflict(`job ${old.id} is still ${old.status}: it can be retried once it has ended`);
  if (old.kind === 'cache') throw conflict('a cache task belongs to its cache request: load the models again with POST /v1/cache');
  if (old.kind === 'self_test') throw conflict('a self-test task belongs to its self-test request: start another with POST /v1/admin/self-tests');
  const id = randomUUID();
  const owner: Principal = { ...who, tenant: old.client }; // an admin's retry stays in the job's tenant
  const common = { ...newJobFields(id, old.client, old.priority), retry_of: old.id };
  let lora: string | null = null;
  await admitJobs(ctx, owner, [id]);
  try {
    let job: StoredJob;
    if (old.kind === 'generation') {
      job = { ...common, kind: 'generation', request: await copyInputs(ctx, old, id) } satisfies GenerationJob;
    } else {
      lora = qualifiedLoraName(old.client, old.request.output.name);
      if (!(await ctx.loras.reserve(lora, old.client, id))) {
        lora = null;
        throw new KilnError('conflict', `a LoRA named ${qualifiedLoraName(old.client, old.request.output.name)} already exists or is being trained`, {
          details: [{ field: 'output.name', rule: 'exists', message: 'LoRA names are unique within a tenant; submit a training with another output.name' }],
        });
      }
      const training = { step: 0, total: old.request.hyperparameters.steps, loss: null, last_checkpoint: null, lora: null };
      job = { ...common, kind: 'training', request: old.request, training } satisfies TrainingJob;
    }
    await ctx.store.create(job);
    await ctx.jobs.enqueue(job);
    await ctx.store.addRetry(old.id, id);
    return job;
  } catch (err) {
    await Promise.all([releaseJobs(ctx, owner, [id]), lora ? ctx.loras.release(lora, id) : undefined]);
    throw err;
  }
}

/** The request with each input the API stored for the old job (inputs/<old id>/…) copied under the new one. */
async function copyInputs(ctx: ApiContext, old: GenerationJob, id: string): Promise<GenerationJob['request']> {
  const request = structuredClone(old.request);
  const refs = [request.image?.init, request.image?.mask, ...(request.controlnets ?? []).map((c) => c.image)].filter((r) => r !== undefined);
  for (const ref of refs) {
    if (!ref.s3_key.startsWith(`inputs/${old.id}/`)) continue;
    const bytes = await ctx.storage.getBuffer(ref.s3_key, 64 * 1024 * 1024);
    if (!bytes) throw conflict(`the inputs of job ${old.id} are gone (${ref.s3_key}): submit it again`);
    const key = `inputs/${id}/${ref.s3_key.slice(`inputs/${old.id}/`.length)}`;
    await ctx.storage.putBuffer(key, bytes, `image/${key.split('.').pop() === 'jpg' ? 'jpeg' : key.split('.').pop()}`);
    ref.s3_key = key;
  }
  return request;
}
