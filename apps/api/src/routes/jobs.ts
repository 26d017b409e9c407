import { ApiError, isTerminal, JobRecord, type StoredJob } from '@kiln/contracts';
import { KilnError, intakeJobId } from '@kiln/runtime';
import type { FastifyPluginAsyncZod } from 'fastify-type-provider-zod';
import type { ApiContext } from '../context.js';
import { recordOf } from '../queue.js';
import { retryJob } from '../retry.js';
import { IdParams, loadVisible } from '../tenancy.js';

/** GET /v1/jobs/:id, DELETE /v1/jobs/:id (cancel) and POST /v1/jobs/:id/retry. */
export function jobRoutes(ctx: ApiContext): FastifyPluginAsyncZod {
  const view = (job: StoredJob) => recordOf(ctx, job);

  return async (app) => {
    app.get('/v1/jobs/:id', { schema: { summary: 'A job', description: 'Any kind of job (generation, training, cache task): status, stage, progress, outputs with fresh presigned URLs, events, webhook deliveries, links.', params: IdParams, response: { 200: JobRecord } } }, async (req) => view(await loadVisible(req.principal, req.params.id, 'job', (id) => ctx.store.get(id))));

    app.delete(
      '/v1/jobs/:id',
      {
        schema: {
          summary: 'Cancel a job',
          description: 'A queued job is canceled at once (200); a running one is asked to stop (202, `cancel_requested: true`) and ends `canceled` within about a second; canceling again is harmless; a job that succeeded or failed is a 409.',
          params: IdParams,
          response: { 200: JobRecord, 202: JobRecord, 409: ApiError },
        },
      },
      async (req, reply) => {
        await loadVisible(req.principal, req.params.id, 'job', (id) => ctx.store.get(id));
        const { status, job } = await cancelJob(ctx, req.params.id);
        return reply.code(status).send(await view(job));
      },
    );

    app.post(
      '/v1/jobs/:id/retry',
      {
        schema: {
          summary: 'Retry a job',
          description:
            'A new job with the same request as one that has ended (failed, canceled, or succeeded: the same seed makes the same images), in the same tenant: 202 with its record. The new record has `retry_of` and a link to the old one; the old one lists it in `retried_as`. A job still queued or running, a cache task, or a training whose LoRA now exists is a 409.',
          params: IdParams,
          response: { 202: JobRecord, 409: ApiError, 429: ApiError },
        },
      },
      async (req, reply) => {
        const old = await loadVisible(req.principal, req.params.id, 'job', (id) => ctx.store.get(id));
        const record = await view(await retryJob(ctx, req.principal, old));
        return reply.code(202).header('location', record.links.self).send(record);
      },
    );
  };
}

/**
 * A queued job is canceled at once (200). A running one is asked to stop (202): the agent
 * stops its worker between steps and marks it canceled. Canceling again is harmless; a job
 * that already succeeded or failed is a 409.
 */
export async function cancelJob(ctx: ApiContext, id: string, reason = 'canceled by request'): Promise<{ status: 200 | 202; job: StoredJob }> {
  for (let i = 0; i < 3; i++) {
    const job = await ctx.store.get(id);
    if (!job) throw new KilnError('not_found', `no job ${id}`);
    if (job.status === 'canceled') return { status: 200, job };
    if (isTerminal(job.status)) throw new KilnError('conflict', `job ${job.id} already ${job.status}`);
    if (job.status === 'queued') {
      const canceled = await ctx.jobs.update(job.id, { status: ['queued'], attempt: job.attempt }, {
        status: 'canceled',
        stage: 'done',
        cancel_requested: true,
        error: { code: 'canceled', message: reason, retryable: false },
        finished_at: new Date().toISOString(),
      });
      if (canceled) {
        await (await ctx.intake.getJob(intakeJobId(job.id, job.attempt)))?.remove().catch(() => {});
        return { status: 200, job: canceled };
      }
      continue; // it was placed meanwhile: cancel it as running
    }
    const asked = await ctx.jobs.update(job.id, { status: ['running'] }, { cancel_requested: true }, { message: `cancellation requested${reason === 'canceled by request' ? '' : `: ${reason}`}` });
    if (asked) {
      await ctx.redis.publish(ctx.keys.cancelChannel(), job.id);
      return { status: 202, job: asked };
    }
  }
  throw new KilnError('conflict', 'the job changed state while canceling; try again');
}
