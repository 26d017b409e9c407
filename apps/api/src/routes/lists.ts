import { ApiError, BatchList, GroupStatus, type GroupSummary, JobKind, JobList, JobStatus, type StoredGroup, type StoredJob } from '@kiln/contracts';
import { expiresAt, groupLinks, jobRecord, KilnError } from '@kiln/runtime';
import type { FastifyPluginAsyncZod } from 'fastify-type-provider-zod';
import { z } from 'zod';
import type { ApiContext } from '../context.js';
import type { Principal } from '../keys.js';
import { pageArray, pageIndex } from '../listing.js';
import { withQueue } from '../queue.js';
import { loadVisible } from '../tenancy.js';

/** `a,b,c` of an enum's values: what `?status=` takes. */
const csvOf = <T extends Readonly<Record<string, string>>>(values: z.ZodEnum<T>) =>
  z
    .string()
    .max(200)
    .transform((s) => s.split(',').map((v) => v.trim()))
    .pipe(z.array(values).min(1))
    .describe(`one or more of ${values.options.join(', ')}, comma-separated`);

const common = {
  created_after: z.iso.datetime({ offset: true }).optional().describe('only records created after this instant (ISO 8601)'),
  created_before: z.iso.datetime({ offset: true }).optional().describe('only records created before this instant (ISO 8601)'),
  tenant: z.string().min(1).max(200).optional().describe("admin keys: one tenant's records (default: every tenant's); a client key sees only its own"),
  limit: z.coerce.number().int().min(1).max(100).default(20).describe('records per page'),
  cursor: z.string().max(200).optional().describe('next_cursor of the previous page'),
};
const JobsQuery = z.strictObject({
  status: csvOf(JobStatus).optional(),
  kind: JobKind.optional(),
  batch: z.string().max(100).optional().describe("a batch's id: its children, in their order"),
  ...common,
});
const TrainingsQuery = z.strictObject({ status: csvOf(JobStatus).optional(), ...common });
const BatchesQuery = z.strictObject({ status: csvOf(GroupStatus).optional(), ...common });

const ms = (iso: string | undefined) => (iso === undefined ? undefined : Date.parse(iso));

/**
 * GET /v1/jobs, /v1/trainings, /v1/batches: what a tenant submitted, newest first, with cursor
 * pagination and filters. A client key lists its own tenant's records; an admin key everyone's
 * (or one tenant's). Records leave the lists when they expire (JOB_RETENTION_S after they end).
 */
export function listRoutes(ctx: ApiContext): FastifyPluginAsyncZod {
  /** Whose records a list shows: the caller's tenant, or (admins) one tenant or all (null). */
  const scope = (p: Principal, tenant: string | undefined): string | null => {
    if (tenant !== undefined && tenant !== p.tenant && p.role !== 'admin') throw new KilnError('forbidden', "only an admin key may list another tenant's records");
    return tenant ?? (p.role === 'admin' ? null : p.tenant);
  };
  const view = (j: StoredJob) => jobRecord(j, ctx.store, ctx.storage, ctx.env.PUBLIC_URL);
  /** The page's records, with `queue` (one registry read for the page). */
  const records = async (jobs: StoredJob[]) => withQueue(ctx, await Promise.all(jobs.map(view)));
  const inRange = (created: string, after?: number, before?: number) => {
    const t = Date.parse(created);
    return (after === undefined || t > after) && (before === undefined || t < before);
  };

  async function summary(g: StoredGroup): Promise<GroupSummary> {
    const counts = { total: g.children.length, queued: 0, running: 0, succeeded: 0, failed: 0, canceled: 0 };
    for (const s of await ctx.store.statuses(g.children)) if (s) counts[s] += 1;
    const { children: _children, ...rest } = g;
    return { ...rest, counts, expires_at: expiresAt(g.finished_at, ctx.jobs.groups.retentionS), links: groupLinks(g, ctx.env.PUBLIC_URL) };
  }

  return async (app) => {
    app.get(
      '/v1/jobs',
      {
        schema: {
          summary: 'List jobs',
          description:
            'Every kind (generations, trainings, cache and self-test tasks, batch children), newest first. Filters: `status` (comma-separated), `kind`, `batch` (its children, in their order), `created_after`, `created_before`. A page may hold fewer than `limit` records when a filter matches rarely; keep following `next_cursor` until it is null.',
          querystring: JobsQuery,
          response: { 200: JobList, 403: ApiError, 404: ApiError },
        },
      },
      async (req) => {
        const q = req.query;
        const [after, before] = [ms(q.created_after), ms(q.created_before)];
        const accept = (j: StoredJob) => (!q.status || q.status.includes(j.status)) && (!q.kind || j.kind === q.kind);
        if (q.batch !== undefined) {
          const group = await loadVisible(req.principal, q.batch, 'batch', (id) => ctx.jobs.groups.get(id), (g) => g.kind === 'batch');
          const children = (await ctx.store.getMany(group.children)).filter((j): j is StoredJob => !!j && accept(j) && inRange(j.created_at, after, before));
          const page = pageArray(children, q.cursor, q.limit);
          return { data: await records(page.items), next_cursor: page.next_cursor };
        }
        const key = ctx.keys.recordIndex('jobs', scope(req.principal, q.tenant), q.kind ?? 'all');
        const page = await pageIndex(ctx.redis, key, { cursor: q.cursor, after, before, limit: q.limit, load: (ids) => ctx.store.getMany(ids), accept });
        return { data: await records(page.items), next_cursor: page.next_cursor };
      },
    );

    app.get(
      '/v1/trainings',
      {
        schema: {
          summary: 'List trainings',
          description: 'LoRA fine-tunes, newest first: the history of what was trained, with each one\'s `training` (steps, loss, checkpoint, the LoRA).',
          querystring: TrainingsQuery,
          response: { 200: JobList, 403: ApiError },
        },
      },
      async (req) => {
        const q = req.query;
        const key = ctx.keys.recordIndex('jobs', scope(req.principal, q.tenant), 'training');
        const page = await pageIndex(ctx.redis, key, {
          cursor: q.cursor,
          after: ms(q.created_after),
          before: ms(q.created_before),
          limit: q.limit,
          load: (ids) => ctx.store.getMany(ids),
          accept: (j) => !q.status || q.status.includes(j.status),
        });
        return { data: await records(page.items), next_cursor: page.next_cursor };
      },
    );

    app.get(
      '/v1/batches',
      {
        schema: {
          summary: 'List batches',
          description: 'Newest first, each with its counts per state (GET /v1/batches/:id, or GET /v1/jobs?batch=<id>, has the children).',
          querystring: BatchesQuery,
          response: { 200: BatchList, 403: ApiError },
        },
      },
      async (req) => {
        const q = req.query;
        const key = ctx.keys.recordIndex('groups', scope(req.principal, q.tenant), 'batch');
        const page = await pageIndex(ctx.redis, key, {
          cursor: q.cursor,
          after: ms(q.created_after),
          before: ms(q.created_before),
          limit: q.limit,
          load: (ids) => Promise.all(ids.map((id) => ctx.jobs.groups.get(id))),
          accept: (g) => !q.status || q.status.includes(g.status),
        });
        return { data: await Promise.all(page.items.map(summary)), next_cursor: page.next_cursor };
      },
    );
  };
}
