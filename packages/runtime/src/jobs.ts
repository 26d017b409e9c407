import type { ErrorCode, Priority, StoredJob, WebhookEvent } from '@kiln/contracts';
import { faultClass, isAgentTask, isTerminal } from '@kiln/contracts';
import type { Queue } from 'bullmq';
import type { Redis } from 'ioredis';
import { KilnError } from './errors.js';
import type { GroupStore } from './groups.js';
import { announcement, type Claimed, type Guard, type JobPatch, type JobStore } from './job-store.js';
import { processLogger } from './logger.js';
import type { Keys } from './keys.js';
import { lifecycle } from './lifecycle.js';
import type { WebhookOutbox } from './webhooks.js';

/** Wake messages that name no agent: something changed (read everything again), or a job was queued (read intake). */
/**
 * Messages on the wake channel: `+` a job was queued; `1` everything changed; `@<agent>` that
 * agent's heartbeat changed what placement sees of it (the models it holds); any other text names
 * an agent whose queue changed.
 */
export const WAKE = { all: '1', queued: '+', residency: '@' } as const;

/** BullMQ priorities on the intake queue (lower runs first). */
export const PRIORITY_RANK: Record<Priority, number> = { high: 1, normal: 5, low: 10 };

export interface IntakeData {
  job_id: string;
  /** the attempt the job had when it was queued; a stale entry is discarded */
  attempt: number;
  client: string;
}

export interface AgentJobData {
  job_id: string;
  attempt: number;
  client: string;
  /** the models this job will make resident, so placement can project the agent's VRAM */
  models?: string[];
  /** working VRAM it needs on top of them */
  activation_mb?: number;
  /** how much work it is, so placement can tell how long the agent will be busy with it */
  work?: JobWork;
}

/** A job's known work: steps of `pixels` pixels (all images), and its step-time key "<kind> <base model>". */
export interface JobWork {
  key: string;
  steps: number;
  pixels: number;
}

/** A queue entry's name, as Bull Board lists it: kind, model (or what a cache task does) and tenant. */
export function entryName(job: StoredJob): string {
  const what =
    job.kind === 'generation'
      ? job.request.model.base
      : job.kind === 'training'
        ? `${job.request.base_model} → ${job.request.output.name}`
        : job.kind === 'self_test'
          ? `${job.request.checks.join(', ')} on ${job.request.target_agent}`
          : `${job.request.action} ${job.request.models.join(', ')}`;
  return `${job.kind} · ${what} · ${job.client}`;
}

/** Intake entry id: one per (job, queueing), so re-adding after a crash is a no-op. */
export const intakeJobId = (jobId: string, attempt: number) => `${jobId}-q${attempt}`;
/** Agent-queue entry id: one per attempt. */
export const agentJobId = (jobId: string, attempt: number) => `${jobId}-a${attempt}`;

/**
 * Job lifecycle operations shared by every process: guarded record updates that also fire
 * the webhooks the job subscribed to, queueing into intake, and the retry decision.
 */
export class Jobs {
  /** groups this process marked running (claimMany): a second mark is a read for nothing */
  private readonly runningGroups = new Set<string>();

  constructor(
    readonly store: JobStore,
    private readonly intake: Queue<IntakeData>,
    private readonly redis: Redis,
    private readonly keys: Keys,
    private readonly outbox: WebhookOutbox | null,
    readonly maxAttempts: number,
    readonly groups: GroupStore,
    /** how long a run of infrastructure failures may go on before the job fails (INFRA_RETRY_DEADLINE_S) */
    readonly infraDeadlineS = 900,
  ) {}

  /**
   * Guarded update. A change into a terminal status is the job's end: the store writes it,
   * its `completed` announcement and its group's count as one step, and the announcements are
   * then made at once (the dispatcher's sweep makes any a crash left). Other events fire only
   * when named. Returns null when the guard refused the write.
   */
  async update(id: string, guard: Guard, patch: JobPatch, opts: { message?: string; webhook?: WebhookEvent } = {}): Promise<StoredJob | null> {
    const job = await this.store.update(id, guard, patch, opts.message);
    if (!job) return null;
    if (patch.status && isTerminal(patch.status)) {
      lifecycle.ended(job);
      await this.announceEnd(job);
      return job;
    }
    if (opts.webhook && this.outbox) await this.outbox.emit(job, opts.webhook);
    if (job.group_id && patch.status === 'running') await this.groups.markRunning(job.group_id);
    return job;
  }

  /**
   * The dispatcher's claims of queued jobs for agents, one round trip for all: each record
   * moves to running (attempt + 1) and its intake entry leaves intake, in one step
   * (JobStore.claimMany), in the order given. Null where the job moved on meanwhile (canceled,
   * re-queued); its entry is then the caller's to drop.
   */
  async claimMany(claims: readonly { job: Pick<StoredJob, 'id' | 'attempt'>; agent: string; message: string }[]): Promise<(Claimed | null)[]> {
    const key = (name: string) => this.intake.toKey(name);
    const claimed = await this.store.claimMany(claims.map((c) => ({ id: c.job.id, attempt: c.job.attempt, agent: c.agent, message: c.message, intake: { entryId: intakeJobId(c.job.id, c.job.attempt), key } })));
    // a batch is marked running by its first placed child; this process remembers that it did
    const groups = new Set(claimed.flatMap((c) => (c?.group_id && !this.runningGroups.has(c.group_id) ? [c.group_id] : [])));
    await Promise.all([...groups].map((g) => this.groups.markRunning(g)));
    if (this.runningGroups.size > 10_000) this.runningGroups.clear();
    for (const g of groups) this.runningGroups.add(g);
    return claimed;
  }

  /** Makes the just-ended job's announcements; failures stay in the outbox for the sweep. */
  private async announceEnd(job: StoredJob): Promise<void> {
    if (!this.outbox) return;
    // what end-job put in the outbox: the job's end when its webhook listens for `completed`, its group's
    const webhook = (job.request as { webhook?: { events?: readonly string[] } | null }).webhook;
    const members = [...(webhook?.events?.includes('completed') ? [announcement.job(job.id)] : []), ...(job.group_id ? [announcement.group(job.group_id)] : [])];
    if (members.length === 0) return;
    await this.outbox.drain(members).catch((err) =>
      processLogger().warn({ job: job.id, err: err instanceof Error ? err.message : String(err) }, 'could not announce the end of a job yet; the dispatcher will'),
    );
  }

  /** Makes every announcement waiting in the outbox (the dispatcher's sweep); returns how many. */
  async drainAnnouncements(): Promise<number> {
    return this.outbox ? this.outbox.drain() : 0;
  }

  /** Adds a queued job to intake and wakes the dispatcher. Idempotent per attempt. */
  async enqueue(job: StoredJob): Promise<void> {
    await this.intake.add(
      entryName(job),
      { job_id: job.id, attempt: job.attempt, client: job.client },
      {
        jobId: intakeJobId(job.id, job.attempt),
        // a batch's children queue just behind single jobs of the same priority, so a
        // thousand-item batch never starves other clients' single jobs
        priority: PRIORITY_RANK[job.priority] + (job.group_id ? 1 : 0),
        removeOnComplete: true,
        removeOnFail: true,
      },
    );
    await this.redis.publish(this.keys.wakeChannel(), WAKE.queued);
  }

  /**
   * Tells the dispatcher to look now. An agent names itself, so only its queue is read again —
   * or, when it names the entry that just left its queue too (`<agent> <entry>`), not even
   * that: the dispatcher drops the entry from its view; with no name the dispatcher reads
   * everything again (intake, every agent's queue, the registry: a drain or resume).
   */
  async wake(agentId?: string, leftEntryId?: string): Promise<void> {
    await this.redis.publish(this.keys.wakeChannel(), agentId === undefined ? WAKE.all : leftEntryId ? `${agentId} ${leftEntryId}` : agentId);
  }

  /**
   * An agent's heartbeat now shows other resident models (a load, an eviction, a pin): the
   * dispatcher reads the registry afresh before it places again, rather than act on a snapshot
   * from before the change. Sent after that heartbeat and before the result that needed the load,
   * so a job a client submits on seeing that result meets the new residency.
   */
  async residencyChanged(agentId: string): Promise<void> {
    await this.redis.publish(this.keys.wakeChannel(), `${WAKE.residency}${agentId}`);
  }

  /**
   * An agent going away cleanly gives a job back to placement; this spends no attempt budget.
   * A cache or self-test task belongs to that agent and cannot go elsewhere: it fails, agent_lost.
   */
  async handBack(job: StoredJob, fromAttempt: number, reason: string): Promise<StoredJob | null> {
    if (job.cancel_requested) return this.retryOrFail(job, new KilnError('canceled', reason), fromAttempt);
    if (isAgentTask(job)) return this.retryOrFail(job, new KilnError('agent_lost', reason), fromAttempt);
    const queued = await this.update(
      job.id,
      { status: ['running'], attempt: fromAttempt },
      // the attempt number stays: the next placement is a new attempt (its own entry on the agent's
      // queue, its own guard), which costs nothing (only charged_attempts count against MAX_ATTEMPTS).
      // Going back one made the next placement reuse the handed-back attempt's number: on the same
      // agent BullMQ kept the old entry under that id and silently dropped the new one
      { status: 'queued', stage: 'queued', agent: null, progress: null },
      { message: `handed back: ${reason}` },
    );
    if (queued) await this.enqueue(queued);
    return queued;
  }

  /**
   * An attempt ended without a result; what it costs depends on whose fault it was
   * (`faultClass`). The job's own failure (worker crash, out of memory) spends one of
   * MAX_ATTEMPTS — counted as consecutive attempts without progress, so a training attempt that
   * advanced its checkpoint spends nothing. An infrastructure fault (storage, Redis, a lost
   * agent) spends nothing and is queued again until INFRA_RETRY_DEADLINE_S after the first of
   * its run. Anything else fails the job. Cancellation requested meanwhile wins; a cache or
   * self-test task belongs to its agent, so it is never retried elsewhere.
   */
  async retryOrFail(job: StoredJob, err: KilnError, fromAttempt: number, opts: { progressed?: boolean } = {}): Promise<StoredJob | null> {
    const guard: Guard = { status: ['running', 'queued'], attempt: fromAttempt };
    const now = new Date();
    const fail = (code: ErrorCode, message: string) =>
      this.update(job.id, guard, { status: 'failed', stage: 'done', error: { code, message, retryable: false }, finished_at: now.toISOString() });
    if (job.cancel_requested) {
      return this.update(job.id, guard, {
        status: 'canceled',
        stage: 'done',
        error: { code: 'canceled', message: 'canceled by request', retryable: false },
        finished_at: now.toISOString(),
      });
    }
    const fault = faultClass(err.code);
    if (fault === 'final' || isAgentTask(job)) return fail(err.code, err.message);

    const progressed = opts.progressed === true;
    let charged = progressed ? 0 : (job.charged_attempts ?? 0);
    let infraSince: string | null;
    let cost: string;
    if (fault === 'job') {
      if (!progressed) charged += 1;
      if (charged >= this.maxAttempts) {
        return fail('max_attempts_exceeded', `gave up after ${charged} attempts that failed on the job itself; last: ${err.code}: ${err.message}`);
      }
      infraSince = null; // a run of infrastructure trouble ends when an attempt gets as far as failing on its own
      cost = progressed ? 'it made progress, so no attempt is spent' : `${charged} of ${this.maxAttempts} attempts spent`;
    } else {
      infraSince = progressed || !job.infra_since ? now.toISOString() : job.infra_since;
      const troubledMs = now.getTime() - Date.parse(infraSince);
      if (troubledMs >= this.infraDeadlineS * 1000) {
        return fail(err.code, `gave up after ${Math.round(troubledMs / 1000)} s of infrastructure failures (INFRA_RETRY_DEADLINE_S=${this.infraDeadlineS}); last: ${err.message}`);
      }
      cost = 'infrastructure: no attempt spent';
    }
    const queued = await this.update(
      job.id,
      guard,
      { status: 'queued', stage: 'queued', agent: null, progress: null, charged_attempts: charged, infra_since: infraSince },
      { message: `attempt ${fromAttempt} ended: ${err.code}: ${err.message}; queued again (${cost})` },
    );
    if (queued) await this.enqueue(queued);
    return queued;
  }
}

/** The fields every new job starts with, whatever its kind: queued, never placed, no results. */
export function newJobFields(id: string, client: string, priority: Priority, groupId: string | null = null, now = new Date().toISOString()) {
  return {
    id,
    client,
    status: 'queued' as const,
    stage: 'queued' as const,
    attempt: 0,
    agent: null,
    priority,
    progress: null,
    outputs: [],
    error: null,
    timings: { queued_ms: null, model_load_ms: null, inference_ms: null, upload_ms: null, total_ms: null },
    cancel_requested: false,
    group_id: groupId,
    created_at: now,
    started_at: null,
    finished_at: null,
  };
}
