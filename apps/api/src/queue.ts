import type { AgentHeartbeat, JobRecord, QueueInfo, QueueSummary, StoredJob } from '@kiln/contracts';
import { intakeJobId, type IntakeData, jobRecord, type KnownHistory, REGISTRY_MAX_AGE_MS, runMsOf as estimateRunMs, workOf } from '@kiln/runtime';
import type { ApiContext } from './context.js';
import type { Principal } from './keys.js';

/**
 * Where a job stands and when it should end: its place in intake and an estimate, from what the
 * agents report (their average job time, and — where an agent measured it — the time of one
 * step per megapixel for that kind and model, the same measure placement costs jobs with).
 * Estimates, not promises: placement is not first-come first-served (model affinity, aging and
 * per-tenant fairness reorder waiting jobs), and model loads are not counted.
 */

/** Agents that take jobs now. */
const usable = (live: AgentHeartbeat[]) => live.filter((a) => a.capabilities && (a.state === 'ready' || a.state === 'busy'));

/** ms of one step per megapixel for "<kind> <base model>", averaged over the agents that measured it. */
function stepMsFor(live: AgentHeartbeat[], key: string): number | null {
  const seen = live.map((a) => (a as { step_ms?: Record<string, number> }).step_ms?.[key]).filter((v): v is number => typeof v === 'number' && v > 0);
  return seen.length ? seen.reduce((s, v) => s + v, 0) / seen.length : null;
}

/** The farm's average job, ms: what a job whose steps were never timed is assumed to take. */
function fleetJobMs(live: AgentHeartbeat[]): number | null {
  const known = live.map((a) => a.avg_job_ms).filter((v): v is number => v !== null && v > 0);
  return known.length ? known.reduce((s, v) => s + v, 0) / known.length : null;
}

type Generation = { model: { base: string; refiner?: string }; scheduler: { steps: number }; refiner?: { steps?: number }; hyperparameters: { width: number; height: number; num_images: number } };

/** How long a generation should run on an agent of this farm, ms (null: nothing to go on yet). */
export function generationRunMs(r: Generation, live: AgentHeartbeat[]): number | null {
  return runMsOf({ kind: 'generation', request: r } as StoredJob, live);
}

/**
 * How long a job should run on an agent of this farm, ms (null: nothing to go on yet): its work
 * at the fleet's mean measured step time for it (the estimate placement makes per agent), else
 * the fleet's average job.
 */
export function runMsOf(job: StoredJob, live: AgentHeartbeat[]): number | null {
  const work = workOf(job);
  const perStep = work ? stepMsFor(live, work.key) : null;
  return estimateRunMs(work, work && perStep !== null ? { [work.key]: perStep } : {}, fleetJobMs(live));
}

/** A job's place in intake: how many entries come before it (0: next), or null when it is not there. */
async function positionOf(ctx: ApiContext, job: StoredJob): Promise<number | null> {
  // intake entries all carry a priority, so they are BullMQ's prioritized set, in placement's base order
  const rank = await ctx.redis.zrank(ctx.intake.toKey('prioritized'), intakeJobId(job.id, job.attempt));
  return rank === null ? null : rank;
}

/** `queue` for a record: position and ETA while queued, ETA while running, null once it ended. */
export async function queueInfo(ctx: ApiContext, job: StoredJob, live: AgentHeartbeat[]): Promise<QueueInfo | null> {
  const now = Date.now();
  const own = runMsOf(job, live);
  if (job.status === 'queued') {
    const position = await positionOf(ctx, job);
    const agents = usable(live).length;
    const avg = fleetJobMs(live) ?? own;
    const eta = position === null || own === null || avg === null || agents === 0 ? null : (position * avg) / agents + own;
    return { position, eta_s: eta === null ? null : Math.ceil(eta / 1000) };
  }
  if (job.status === 'running') {
    const p = job.progress;
    const started = job.started_at ? Date.parse(job.started_at) : null;
    let left: number | null = own !== null && started !== null ? Math.max(0, own - (now - started)) : null;
    // a stage part-done says more than an average: the rest of it at the pace so far
    if (p && p.step > 0 && p.total > 0 && started !== null && (left === null || p.step < p.total)) left = ((now - started) / p.step) * (p.total - p.step);
    return { position: null, eta_s: left === null ? null : Math.ceil(left / 1000) };
  }
  return null;
}

/**
 * Adds `queue` to records. The estimates come from the registry as this API last read it (at
 * most REGISTRY_MAX_AGE_MS ago, like feasibility), not a read per answer: with a hundred agents
 * a fresh read is every heartbeat over the wire on every submit and every poll.
 */
export async function withQueue<R extends JobRecord>(ctx: ApiContext, records: R[]): Promise<R[]> {
  if (!records.some((r) => r.status === 'queued' || r.status === 'running')) return records.map((r) => ({ ...r, queue: null }));
  const live = await ctx.registry.live({ maxAgeMs: REGISTRY_MAX_AGE_MS });
  return Promise.all(records.map(async (r) => ({ ...r, queue: await queueInfo(ctx, r as unknown as StoredJob, live) })));
}

/** A job's record as the API shows it: with `queue`. */
export async function recordOf(ctx: ApiContext, job: StoredJob, known?: KnownHistory): Promise<JobRecord> {
  return (await withQueue(ctx, [await jobRecord(job, ctx.store, ctx.storage, ctx.env.PUBLIC_URL, known)]))[0]!;
}

/** How many waiting entries GET /v1/queue reads at most (their records, for models and estimates). */
const SUMMARY_LIMIT = 2_000;

/**
 * GET /v1/queue: what waits, by priority, model and tenant (a client key sees its own tenant
 * only, beside the totals), the agents busy and idle, and how long the farm needs to drain
 * what it holds at the current estimates.
 */
export async function queueSummary(ctx: ApiContext, who: Principal): Promise<QueueSummary> {
  const [ids, live, counts] = await Promise.all([
    ctx.intake.getRanges(['prioritized', 'waiting'], 0, SUMMARY_LIMIT - 1, true),
    ctx.registry.live(),
    ctx.intake.getJobCounts('prioritized', 'waiting'),
  ]);
  const pipe = ctx.redis.pipeline();
  for (const id of ids) pipe.hget(ctx.intake.toKey(id), 'data');
  const entries = ((await pipe.exec()) ?? []).map(([, raw]) => (typeof raw === 'string' ? (JSON.parse(raw) as IntakeData) : null)).filter((d) => d !== null);
  const jobs = (await ctx.store.getMany(entries.map((e) => e.job_id))).filter((j): j is StoredJob => j !== null && j.status === 'queued');
  const by = <K extends string>(key: (j: StoredJob) => K) => {
    const out: Record<string, number> = {};
    for (const j of jobs) out[key(j)] = (out[key(j)] ?? 0) + 1;
    return out;
  };
  const model = (j: StoredJob) => (j.kind === 'generation' ? j.request.model.base : j.kind === 'training' ? j.request.base_model : `agent ${j.request.target_agent}`);
  const tenants = by((j) => j.client);
  const agents = usable(live);
  const waitingMs = jobs.reduce((s, j) => s + (runMsOf(j, live) ?? 0), 0);
  // what the agents run now ends first: the longest of those, then the waiting work shared out
  const running = await ctx.store.getMany(live.map((a) => a.current_job).filter((id): id is string => !!id));
  const busyMs = Math.max(0, ...(await Promise.all(running.map(async (j) => (j ? ((await queueInfo(ctx, j, live))?.eta_s ?? 0) * 1000 : 0)))));
  return {
    waiting: (counts.prioritized ?? 0) + (counts.waiting ?? 0),
    counted: jobs.length,
    by_priority: { high: jobs.filter((j) => j.priority === 'high').length, normal: jobs.filter((j) => j.priority === 'normal').length, low: jobs.filter((j) => j.priority === 'low').length },
    by_model: by(model),
    by_tenant: who.role === 'admin' ? tenants : { [who.tenant]: tenants[who.tenant] ?? 0 },
    agents: {
      total: live.length,
      busy: agents.filter((a) => a.state === 'busy' || a.current_job).length,
      idle: agents.filter((a) => a.state === 'ready' && !a.current_job).length,
      unavailable: live.length - agents.length,
    },
    drain_s: agents.length === 0 ? null : Math.ceil((busyMs + waitingMs / agents.length) / 1000),
  };
}
