import { randomBytes } from 'node:crypto';
import { mkdir, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { isTerminal, type ProgressMessage, type StoredJob } from '@kiln/contracts';
import { type AgentJobData, coerceError, contextOf, type Jobs, KilnError, lifecycle, type Logger, QUEUES, redisHealth, tracer, tracingOn } from '@kiln/runtime';
import { type ConnectionOptions, type Job, Worker } from 'bullmq';
import { Attempt, type StopReason } from './attempt.js';
import type { AgentEnv } from './env.js';
import { GpuSlot, type Ticket } from './gpu-slot.js';
import { agentMetrics } from './metrics.js';
import type { JobKind, Run, Runner, Runners } from './runners/index.js';
import type { WorkerRequest } from './worker-process.js';
import type { WorkerSupervisor } from './worker-supervisor.js';

/** How often progress is mirrored onto the queue entry (besides each stage's first and last step). */
const ENTRY_PROGRESS_MS = 500;

const timeoutOf = (job: StoredJob) => ('timeout_s' in job.request ? job.request.timeout_s : 600);

/** A queue entry's failure as Bull Board shows it: the job's code and message, no agent stack trace. */
function failure(message: string): Error {
  const err = new Error(message);
  err.stack = message;
  return err;
}

/** What the pipeline needs of the agent that owns it. */
export interface PipelineHost {
  readonly id: string;
  /** the agent is shutting down: entries not yet started go back to placement */
  readonly draining: boolean;
  heartbeat(): Promise<void>;
}

/**
 * The agent's job pipeline. It takes up to PIPELINE_DEPTH entries from this agent's queue at
 * once (late binding gives an agent its running job and the next one), and runs each through:
 *  1. checks: the record still names this attempt on this agent; a drain hands it back, a
 *     cancel that came first ends it;
 *  2. `started` (a guarded write), then the runner's prepare: inputs, LoRAs, a dataset —
 *     while the previous job is still on the GPU;
 *  3. the GPU slot (gpu-slot.ts): one request on the worker at a time, released the moment
 *     the worker's answer is read, and the next job's request written inside that same call;
 *  4. the runner's finish: uploads and the guarded result write, alongside the next inference;
 *  5. clean-up, heartbeat, and once BullMQ has recorded the entry's outcome, a wake naming
 *     this agent, so the dispatcher's re-read of its queue sees the slot free.
 * An attempt that produced no result ends as canceled, failed, retried or handed back. Every
 * write to a job record names the attempt it holds, so if the dispatcher has given the job to
 * someone else, this agent's late writes are refused and it stops. Stops (cancel, timeout,
 * hand-back) address one attempt, in whatever stage it is.
 */
export class JobPipeline {
  private consumer: Worker<AgentJobData> | null = null;
  /** the attempts this agent holds now, by job id, oldest first */
  private readonly attempts = new Map<string, Attempt>();
  private readonly gpu = new GpuSlot();

  constructor(
    private readonly host: PipelineHost,
    private readonly env: AgentEnv,
    private readonly connection: ConnectionOptions,
    private readonly jobs: Jobs,
    private readonly supervisor: WorkerSupervisor,
    private readonly runners: Runners,
    private readonly log: Logger,
  ) {}

  /** The heartbeat's current_job: the job on the GPU, else the oldest one held. */
  get current(): Attempt | null {
    return this.gpu.current ?? this.attempts.values().next().value ?? null;
  }

  /** Starts consuming this agent's queue. */
  start(): void {
    this.consumer = new Worker<AgentJobData>(QUEUES.agent(this.host.id), (j) => this.process(j).then(() => this.entryOutcome(j)), {
      connection: this.connection,
      prefix: this.env.KILN_PREFIX,
      concurrency: this.env.PIPELINE_DEPTH,
      lockDuration: 60_000,
    });
    // once BullMQ has moved the entry out of `active`, the wake names it: the dispatcher drops
    // it from its view of this agent and sees the slot free without reading the queue
    const wake = (entryId?: string) => void this.jobs.wake(this.host.id, entryId).catch((err) => this.log.warn({ err: coerceError(err).message }, 'wake failed'));
    this.consumer.on('completed', (entry) => wake(entry.id));
    this.consumer.on('failed', (entry) => wake(entry?.id));
    this.consumer.on('error', (err) => {
      // the dispatcher removed our queue while we ran a job it had taken back (we were cut off
      // past AGENT_TTL_MS): BullMQ cannot finish the entry. The job's record already refused
      // our result; there is nothing else to do.
      if (/Missing (key|lock) for job/.test(err.message)) this.log.info({ err: err.message }, 'a queue entry was removed while this agent held it');
      else redisHealth.error(err, 'agent queue consumer'); // quiet while Redis is away; one line otherwise
    });
  }

  /** Stops taking entries; resolves when the ones running have ended. */
  async close(): Promise<void> {
    await this.consumer?.close();
  }

  /** Stops a job this agent runs, if it runs it: cooperative cancel first, then kill the worker. */
  stop(jobId: string, reason: StopReason): void {
    const a = this.attempts.get(jobId);
    if (a) this.stopAttempt(a, reason);
  }

  /** Stops every job this agent runs (a drain past its deadline). */
  stopAll(reason: StopReason): void {
    for (const a of [...this.attempts.values()]) this.stopAttempt(a, reason);
  }

  /** Hands back the jobs that have not reached the GPU yet (a drain starts: they can run elsewhere now). */
  handBackWaiting(): void {
    for (const a of [...this.attempts.values()]) if (a.phase === 'preparing' || a.phase === 'waiting') this.stopAttempt(a, 'handback');
  }

  private stopAttempt(a: Attempt, reason: StopReason): void {
    if (a.cancel) return;
    a.cancel = reason;
    a.wake(); // a transfer waiting to retry sees the flag now
    const worker = this.supervisor.worker;
    if (!a.requestId || !worker) return; // not on the worker: the run sees the flag at its next stage
    this.log.info({ job: a.id, reason }, 'stopping the running request');
    worker.cancel(a.requestId);
    const requestId = a.requestId;
    setTimeout(() => {
      if (a.requestId === requestId && this.supervisor.worker === worker) {
        this.log.warn({ job: a.id }, 'worker did not stop in time; killing it');
        worker.kill('SIGTERM', 'kill');
        setTimeout(() => worker.kill('SIGKILL', 'kill'), 2_000).unref();
      }
    }, this.env.CANCEL_GRACE_MS).unref();
  }

  private async process(entry: Job<AgentJobData>): Promise<void> {
    // its place in line for the GPU is the order it was taken in, whatever its bookkeeping costs
    const ticket = this.gpu.join();
    try {
      await this.runEntry(entry, ticket);
    } finally {
      this.gpu.leave(ticket);
    }
  }

  private async runEntry(entry: Job<AgentJobData>, ticket: Ticket): Promise<void> {
    const { job_id, attempt } = entry.data;
    const job = await this.jobs.store.get(job_id);
    if (!job || job.status !== 'running' || job.attempt !== attempt || job.agent !== this.host.id) {
      this.log.info({ job: job_id, attempt }, 'skipping a job this agent no longer holds');
      return;
    }
    if (this.host.draining && job.kind !== 'cache') {
      await this.jobs.handBack(job, attempt, `agent ${this.host.id} is shutting down`);
      return;
    }
    if (job.cancel_requested) {
      await this.endAttempt(job, attempt, new KilnError('canceled', 'canceled by request'));
      return;
    }
    const span = tracingOn()
      ? tracer().startSpan('agent run', { attributes: { 'kiln.job': job.id, 'kiln.agent': this.host.id, 'kiln.attempt': attempt, 'kiln.kind': job.kind } }, contextOf(await this.jobs.store.traceOf(job.id)))
      : null;
    const jobDir = join(this.env.WORK_DIR, this.host.id, `${job.id}-a${attempt}`);
    const a = new Attempt(job, attempt, `a${attempt}-${randomBytes(3).toString('hex')}`, jobDir, entry, span);
    this.attempts.set(job.id, a);
    void this.host.heartbeat().catch(() => {});
    try {
      const begun = await this.jobs.update(
        job.id,
        { status: ['running'], attempt },
        { stage: 'running', started_at: job.started_at ?? new Date().toISOString(), timings: { ...job.timings, queued_ms: Date.now() - Date.parse(job.created_at) } },
        { webhook: 'started', message: `attempt ${attempt} started on ${this.host.id}` },
      );
      if (!begun) return this.log.warn({ job: job.id }, 'job was taken back before it started');
      a.begun = begun;
      lifecycle.started(begun, this.host.id, attempt);
      await mkdir(jobDir, { recursive: true });
      const runner = this.runners[job.kind] as Runner<JobKind>;
      const run = this.runOf(a, begun);
      const prepared = await runner.prepare(run);
      a.phase = 'waiting';
      let held = 0;
      // runs in the call that hands this attempt the GPU, which (after the first job) is the
      // worker's reading of the previous answer: the request is written in that tick, before
      // any continuation, I/O callback or bookkeeping of the job that just ended
      const start = (): Promise<unknown> => {
        held = Date.now();
        a.phase = 'inferring';
        try {
          if (a.cancel) throw new KilnError('canceled', `stopped (${a.cancel}) before it reached the GPU`);
          const w = this.supervisor.worker;
          return w?.state === 'ready' ? runner.infer(run, w, prepared) : this.supervisor.ready().then((ready) => runner.infer(run, ready, prepared));
        } catch (err) {
          return Promise.reject(err);
        }
      };
      const granted = await this.gpu.acquire(ticket, a, start);
      if (!granted) throw new KilnError('canceled', `stopped (${a.cancel}) before it reached the GPU`);
      let result: unknown;
      try {
        result = await granted.started;
      } finally {
        a.gpuMs = Date.now() - held;
        // the worker's answer released it already (request(), below); this covers a request
        // that never went out or a worker that died under it
        this.gpu.release(a);
      }
      // our bookkeeping waits for the next turn of the event loop, behind whatever the next
      // job's request set going
      await new Promise((r) => setImmediate(r));
      a.phase = 'finishing';
      // the residency the worker reported with its answer is in the registry before the result
      // is on the record: a client that submits on seeing it is placed knowing what is loaded
      await this.host.heartbeat().catch(() => {});
      await runner.finish(run, result, prepared);
    } catch (err) {
      const reason = a.cancel;
      if (reason === 'handback') {
        const now = await this.jobs.store.get(job.id);
        if (now) await this.jobs.handBack(now, attempt, `agent ${this.host.id} stopped it`);
      } else if (reason === 'timeout') {
        await this.endAttempt(job, attempt, new KilnError('timeout', `ran longer than timeout_s=${timeoutOf(job)}`));
      } else if (reason === 'user') {
        await this.endAttempt(job, attempt, new KilnError('canceled', 'canceled by request'));
      } else {
        await this.endAttempt(job, attempt, coerceError(err), { progressed: a.progressed });
      }
    } finally {
      span?.end();
      this.attempts.delete(job.id);
      await rm(jobDir, { recursive: true, force: true }).catch(() => {});
      await this.host.heartbeat().catch(() => {});
    }
  }

  private runOf(a: Attempt, begun: StoredJob): Run<never> {
    return {
      job: a.job as never,
      attempt: a.attempt,
      run: a.run,
      jobDir: a.jobDir,
      begun: begun as never,
      state: a,
      request: (r) => this.request(a, r),
      onProgress: this.progressHandler(a),
    };
  }

  /**
   * What the queue entry of one attempt records for Bull Board, once its run is over: a
   * summary when the attempt ended the job successfully; otherwise a failure carrying the
   * job's error code and message, or why the attempt did not end it (retried, handed back,
   * taken over) — so the board's failed list is the farm's failed attempts.
   */
  private async entryOutcome(entry: Job<AgentJobData>): Promise<{ status: 'succeeded'; outputs: number; total_ms: number | null }> {
    const { job_id, attempt } = entry.data;
    const job = await this.jobs.store.get(job_id);
    if (!job) throw failure(`not_found: job ${job_id} is gone`);
    const ours = job.attempt === attempt && job.agent === this.host.id;
    if (ours && job.status === 'succeeded') return { status: 'succeeded', outputs: job.kind === 'generation' ? job.outputs.length : 0, total_ms: job.timings.total_ms };
    if (ours && job.error) throw failure(`${job.error.code}: ${job.error.message}`);
    const last = (await this.jobs.store.history(job_id)).events.filter((e) => e.message && e.attempt >= attempt - 1).at(-1);
    throw failure(`attempt ${attempt} did not end the job here (now ${job.status}, attempt ${job.attempt})${last?.message ? `: ${last.message}` : ''}`);
  }

  /**
   * Sends a request to the worker as the attempt's current one; a cancel that came early
   * applies now. The job's timeout_s runs while the worker works on it, not while storage is
   * retried.
   */
  private request<T>(a: Attempt, run: WorkerRequest<T>): Promise<T> {
    a.requestId = run.id;
    // one request per run holds the GPU: its answer frees it for the next job, in the same call
    // (the busy clock stops first: the next request starts it again)
    let answered = false;
    run.onAnswer(() => {
      answered = true;
      agentMetrics.idle();
      this.gpu.release(a);
    });
    const early = a.cancel;
    if (early) {
      a.cancel = null;
      this.stopAttempt(a, early);
    }
    const timeout = setTimeout(() => this.stopAttempt(a, 'timeout'), timeoutOf(a.job) * 1000);
    agentMetrics.busy();
    const span = a.childSpan('worker request', { 'kiln.request': run.id });
    return run.done.finally(() => {
      span?.end();
      if (!answered) agentMetrics.idle(); // the worker died under it
      clearTimeout(timeout);
      if (a.requestId === run.id) a.requestId = null; // nothing left for a stop to kill
    });
  }

  /**
   * Progress from the worker onto the record (one guarded write per step), a stage event when
   * the stage changes, throttled progress webhooks, and a stop when the job was canceled or
   * taken back under us.
   */
  private progressHandler(a: Attempt) {
    const { job, attempt, entry } = a;
    let lastHook = 0;
    let lastStage = '';
    let lastMirror = 0;
    const wantsHook = 'webhook' in job.request && !!job.request.webhook?.events.includes('progress');
    return (p: ProgressMessage) => {
      const stage = p.stage === 'loading_model' ? 'loading_model' : 'running';
      void this.jobs.store
        .setProgress(job.id, attempt, { stage, progress: { stage: p.stage, step: p.step, total: p.total, ...(p.loss === undefined ? {} : { loss: p.loss }) } })
        .then(async ({ ok, cancelRequested }) => {
          if (!ok) return this.stopAttempt(a, 'handback');
          if (cancelRequested) return this.stopAttempt(a, 'user');
          const now = Date.now();
          if (p.stage !== lastStage || p.step === p.total || now - lastMirror >= ENTRY_PROGRESS_MS) {
            lastMirror = now; // Bull Board's Progress tab shows the entry's progress
            const percent = p.total > 0 ? Math.round((100 * p.step) / p.total) : 0;
            void entry.updateProgress({ stage: p.stage, step: p.step, total: p.total, percent, ...(p.loss === undefined ? {} : { loss: p.loss }) }).catch(() => {});
          }
          if (p.stage !== lastStage) {
            lastStage = p.stage; // each stage (loading, base, refiner, upscale, safety, train) is an event
            lifecycle.stage(job, this.host.id, p.stage, p.total);
            await this.jobs.update(job.id, { status: ['running'], attempt }, {}, { message: `stage ${p.stage}: ${p.total} step${p.total === 1 ? '' : 's'}` });
          }
          if (wantsHook && (now - lastHook >= this.env.PROGRESS_WEBHOOK_MS || p.step === p.total)) {
            lastHook = now;
            await this.jobs.update(job.id, { status: ['running'], attempt }, {}, { webhook: 'progress' });
          }
        })
        .catch((err) => this.log.warn({ job: job.id, err: coerceError(err).message }, 'progress update failed'));
    };
  }

  /** Ends an attempt that produced no result: canceled, failed, or back to placement. */
  private async endAttempt(job: StoredJob, attempt: number, err: KilnError, opts: { progressed?: boolean } = {}): Promise<void> {
    const now = (await this.jobs.store.get(job.id)) ?? job;
    if (isTerminal(now.status)) return;
    if (!err.retryable) {
      await this.jobs.update(job.id, { status: ['running'], attempt }, {
        status: err.code === 'canceled' ? 'canceled' : 'failed',
        stage: 'done',
        progress: null,
        error: err.toJobError(),
        finished_at: new Date().toISOString(),
      });
      this.log.debug({ job: job.id, attempt, code: err.code }, err.message); // the lifecycle line reports the end
    } else {
      this.log.warn({ job: job.id, attempt, code: err.code, err: err.message }, 'attempt failed; retrying');
      await this.jobs.retryOrFail(now, err, attempt, opts);
    }
  }
}
