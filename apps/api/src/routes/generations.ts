import { createHash, randomInt, randomUUID } from 'node:crypto';
import { ApiError, GenerationRequest, isTerminal, JobRecord, MAX_SEED, type JobEvent, type ParsedGenerationRequest, ResolvedGenerationRequest, resolveScheduler, type StoredJob, ValidateResponse } from '@kiln/contracts';
import { freshHistory, KilnError, type KnownHistory, newJobFields } from '@kiln/runtime';
import type { FastifyPluginAsyncZod } from 'fastify-type-provider-zod';
import { z } from 'zod';
import type { ApiContext } from '../context.js';
import { againstLiveAgents, checkFeasible, resolveLoras, suiteVramMb } from '../feasibility.js';
import { ingestImages } from '../images.js';
import type { Principal } from '../keys.js';
import { admitJobs, releaseJobs } from '../quotas.js';
import { assertImageKeysReachable } from '../tenancy.js';
import { cancelAfterMs } from '../deadlines.js';
import { generationRunMs, recordOf } from '../queue.js';
import { checkWebhookOf } from '../webhook-check.js';
import { MAX_WAIT_S, preferredWait, waitForEnd } from '../wait.js';

const IdempotencyKey = z.string().min(1).max(200).regex(/^[\x21-\x7e]+$/, 'printable ASCII without spaces');

/**
 * POST /v1/generations: validate, resolve (scheduler aliases, default models), refuse what no
 * live agent could ever run, fetch and check input images, record, enqueue. The stored
 * request is exactly what the worker receives.
 *
 * POST /v1/validate: the same checks, nothing stored or queued; says which agents could run it.
 */
export function generationRoutes(ctx: ApiContext): FastifyPluginAsyncZod {
  const sources = { storage: ctx.storage, allowPrivate: ctx.env.INPUT_ALLOW_PRIVATE, fetchTimeoutMs: ctx.env.INPUT_FETCH_TIMEOUT_MS };

  /** Every check short of storing; returns the resolved request (images still as given). */
  async function prepare(who: Principal, body: ParsedGenerationRequest, id: string, store: boolean) {
    await checkWebhookOf(ctx, body.webhook?.url);
    await assertImageKeysReachable(ctx, who, body);
    const { request: named, registered } = await resolveLoras(ctx, who, { ...body, scheduler: resolveScheduler(body.scheduler) });
    const { request, agents } = await againstLiveAgents(ctx.registry, (live) => checkFeasible(named, live, registered));
    const withImages = await ingestImages(request, id, sources, store);
    return { request: withImages, agents };
  }

  return async (app) => {
    app.post(
      '/v1/validate',
      {
        schema: {
          summary: 'Check a generation without queuing it',
          description: 'The same checks as POST /v1/generations — including whether a live agent can run it and fetching the input images — with nothing stored or queued.',
          body: GenerationRequest,
          response: { 200: ValidateResponse, 422: ApiError },
        },
      },
      async (req) => {
        const { request, agents } = await prepare(req.principal, req.body, 'validate', false);
        // what running it would take, on the agents that could
        const capable = (await ctx.registry.live()).filter((a) => agents.includes(a.agent_id));
        const run = generationRunMs(request, capable);
        const vram = capable.length ? Math.min(...capable.map((a) => suiteVramMb(request, a as Parameters<typeof suiteVramMb>[1]))) : null;
        return { valid: true as const, request, agents, estimate: { run_s: run === null ? null : Math.round(run / 100) / 10, vram_mb: vram } };
      },
    );

    app.post(
      '/v1/generations',
      {
        schema: {
          summary: 'Submit a generation',
          description:
            'Validates, resolves (scheduler aliases, default models, LoRA names), refuses what no live agent could ever run (422), fetches and checks input images, records and queues the job: 202 with the job record and a `Location` header. A repeat with the same `Idempotency-Key` returns the same job (200, `idempotent-replayed: true`). With `Prefer: wait` (or `wait=<seconds>`, at most 60) the answer waits for the job: 200 with the finished record if it ends in time, else 202 with the current one (`Preference-Applied` says the wait).',
          body: GenerationRequest,
          headers: z.looseObject({
            'idempotency-key': IdempotencyKey.optional().describe('a repeat with the same key (and body) returns the same job'),
            'cancel-after': z.string().max(40).optional().describe('a deadline from submission ("30s", "5m", "1h"; at most 24h): a job not started by then is canceled without running, a running one is stopped'),
            prefer: z.string().max(200).optional().describe(`"wait" or "wait=<seconds>" (at most ${MAX_WAIT_S}): answer when the job has ended (200 with the finished record), or after that long with the current one (202)`),
          }),
          response: { 200: JobRecord, 202: JobRecord, 409: ApiError, 422: ApiError },
        },
      },
      async (req, reply) => {
        const who = req.principal;
        const wait = preferredWait(req.headers.prefer); // a bad value is a 400 before anything is queued
        const cancelAfter = cancelAfterMs(req.headers['cancel-after']);
        /** The answer: the record as it is now, or (Prefer: wait) once it has ended or the wait is over. */
        const answer = async (job: StoredJob, status: 200 | 202, known?: KnownHistory) => {
          if (wait > 0) {
            known = undefined;
            reply.header('preference-applied', `wait=${wait}`);
            const gone = new AbortController();
            reply.raw.once('close', () => gone.abort()); // the client hung up: stop waiting
            const now = await waitForEnd(ctx, req.server.changes, job.id, wait, gone.signal);
            if (now) job = now;
            if (isTerminal(job.status)) status = 200;
          }
          const record = await recordOf(ctx, job, known);
          return reply.code(status).header('location', record.links.self).send(record);
        };
        const idemKey = req.headers['idempotency-key'];
        const idemRedisKey = idemKey ? ctx.keys.idempotency(who.tenant, idemKey) : null;
        const id = randomUUID();
        if (idemRedisKey) {
          // the key remembers the body it came with: a replay must be the same request
          const bodyHash = createHash('sha256').update(JSON.stringify(req.body)).digest('hex');
          const set = await ctx.redis.set(idemRedisKey, `${id} ${bodyHash}`, 'EX', ctx.env.IDEMPOTENCY_TTL_S, 'NX');
          if (set !== 'OK') {
            const [existingId, existingHash] = ((await ctx.redis.get(idemRedisKey)) ?? '').split(' ');
            if (existingHash && existingHash !== bodyHash) {
              const message = 'this Idempotency-Key was used with a different request body; use a new key for a new request';
              throw new KilnError('idempotency_mismatch', message, { details: [{ field: 'Idempotency-Key', rule: 'different_body', message }] });
            }
            const existing = existingId ? await ctx.store.get(existingId) : null;
            if (existing) {
              reply.header('idempotent-replayed', 'true');
              return answer(existing, 200);
            }
            throw new KilnError('conflict', 'a request with this Idempotency-Key is still being submitted; retry shortly');
          }
        }
        let admitted = false;
        let job: StoredJob;
        let submitted: JobEvent;
        try {
          await admitJobs(ctx, who, [id]);
          admitted = true;
          const { request } = await prepare(who, req.body, id, true);
          const hp = { ...request.hyperparameters, seed: request.hyperparameters.seed ?? randomInt(0, MAX_SEED) };
          const stored = ResolvedGenerationRequest.parse({ ...request, hyperparameters: hp });
          const now = new Date().toISOString();
          const deadline = cancelAfter === null ? null : Date.parse(now) + cancelAfter;
          job = {
            ...newJobFields(id, who.tenant, stored.priority, null, now),
            kind: 'generation',
            request: stored,
            ...(deadline === null ? {} : { deadline_at: new Date(deadline).toISOString() }),
          };
          submitted = await ctx.store.create(job);
          if (deadline !== null) await ctx.redis.zadd(ctx.keys.deadlines(), deadline, id);
          await ctx.jobs.enqueue(job);
        } catch (err) {
          if (idemRedisKey) await ctx.redis.del(idemRedisKey);
          if (admitted) await releaseJobs(ctx, who, [id]);
          throw err;
        }
        // the record as this request wrote it: its history is the one event it wrote
        return answer(job, 202, freshHistory(submitted));
      },
    );
  };
}
