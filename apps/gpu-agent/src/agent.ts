import { createHash, randomBytes } from 'node:crypto';
import { createReadStream } from 'node:fs';
import { access, mkdir, rename, rm } from 'node:fs/promises';
import { hostname } from 'node:os';
import { join } from 'node:path';
import {
  type AgentHeartbeat,
  type AgentState,
  type CacheJob,
  type CheckpointMessage,
  type GenerationJob,
  isTerminal,
  type ProgressMessage,
  type StoredJob,
  type StoredOutput,
  type TrainedMessage,
  type TrainingJob,
} from '@kiln/contracts';
import {
  type AgentJobData,
  type AgentRegistry,
  coerceError,
  type Jobs,
  KilnError,
  contextOf,
  lifecycle,
  type Span,
  trace,
  tracer,
  tracingOn,
  type Logger,
  type LoraRegistry,
  loraFileName,
  qualifiedLoraName,
  QUEUES,
  quietErrors,
  redisHealth,
  Storage,
} from '@kiln/runtime';
import { type ConnectionOptions, type Job, Queue, Worker } from 'bullmq';
import type { AgentEnv } from './env.js';
import { agentMetrics } from './metrics.js';
import { type WorkerCommand, WorkerProcess } from './worker-process.js';

const RESTART_BACKOFF_MS = [0, 1_000, 2_000, 5_000, 10_000, 30_000];

interface RunContext {
  worker: WorkerProcess;
  attempt: number;
  /** names this run's objects in S3: `a<attempt>-<random>`, never reused (see Storage.outputKey) */
  run: string;
  jobDir: string;
  begun: StoredJob;
}

/** What the agent is running now, and why it is being stopped, if it is. */
interface Current {
  job: StoredJob;
  requestId: string | null;
  cancel: 'user' | 'timeout' | 'handback' | null;
  /** a training attempt advanced its checkpoint: a failure now spends no attempt */
  progressed: boolean;
  /** its entry on this agent's queue, where progress is mirrored for Bull Board */
  entry: Job<AgentJobData>;
  /** its run's span, under the job's trace, when tracing is on (tracing.ts) */
  span: Span | null;
}

/** A queue entry's failure as Bull Board shows it: the job's code and message, no agent stack trace. */
function failure(message: string): Error {
  const err = new Error(message);
  err.stack = message;
  return err;
}

/** How often progress is mirrored onto the queue entry (besides each stage's first and last step). */
const ENTRY_PROGRESS_MS = 500;

/** Waits between in-place retries of a transfer: doubling, capped, with full jitter. */
const TRANSFER_BACKOFF_MS = { first: 250, max: 4_000 };

const timeoutOf = (job: StoredJob) => ('timeout_s' in job.request ? job.request.timeout_s : 600);

async function sha256File(path: string): Promise<string> {
  const hash = createHash('sha256');
  for await (const chunk of createReadStream(path)) hash.update(chunk as Buffer);
  return hash.digest('hex');
}

const exists = (path: string) => access(path).then(
  () => true,
  () => false,
);

/**
 * One agent per GPU: supervises its worker, consumes its own queue (concurrency 1), runs each
 * job through the worker, uploads outputs, and keeps the job record and its heartbeat current.
 * Every write to a job record is guarded by the attempt it holds, so if the dispatcher has
 * already given the job to someone else, this agent's late writes are refused and it stops.
 */
export class Agent {
  private worker: WorkerProcess | null = null;
  private workerReady: Promise<void> | null = null;
  private restarts = 0;
  private consecutiveFailures = 0;
  private state: AgentState = 'starting';
  private current: Current | null = null;
  private consumer: Worker<AgentJobData> | null = null;
  private heartbeatTimer: NodeJS.Timeout | null = null;
  private jobsDone = 0;
  private avgJobMs: number | null = null;
  /** ms per step per megapixel by "<kind> <base model>" (heartbeat step_ms) */
  private readonly stepMs = new Map<string, number>();
  private readonly startedAt = new Date().toISOString();
  private draining = false;
  /** ends the wait between in-place transfer retries when the running job is stopped */
  private readonly pauses = new Set<() => void>();
  /** an operator took this agent out of rotation (registry): it finishes what it holds, gets nothing new */
  private maintenance = false;
  /** LoRA files in KILN_LORA_DIR whose bytes were checked, with the sha256 they had */
  private readonly verifiedLoras = new Map<string, string>();

  constructor(
    private readonly env: AgentEnv,
    private readonly log: Logger,
    private readonly connection: ConnectionOptions,
    private readonly jobs: Jobs,
    private readonly registry: AgentRegistry,
    private readonly storage: Storage,
    private readonly command: WorkerCommand,
    private readonly loras: LoraRegistry,
  ) {}

  /** Where trained LoRAs are fetched to; the worker scans it (KILN_LORA_DIR). */
  get loraDir(): string {
    return this.command.env.KILN_LORA_DIR!;
  }

  get id(): string {
    return this.env.AGENT_ID;
  }

  async start(): Promise<void> {
    await this.heartbeat();
    this.heartbeatTimer = setInterval(() => void this.heartbeat().catch((err) => this.log.warn({ err: coerceError(err).message }, 'heartbeat failed')), this.env.HEARTBEAT_MS);
    await this.reclaim();
    this.ensureWorker();
    await this.workerReady;
    this.consumer = new Worker<AgentJobData>(QUEUES.agent(this.id), (j) => this.process(j).then(() => this.entryOutcome(j)), {
      connection: this.connection,
      prefix: this.env.KILN_PREFIX,
      concurrency: 1,
      lockDuration: 60_000,
    });
    this.consumer.on('error', (err) => {
      // the dispatcher removed our queue while we ran a job it had taken back (we were cut off
      // past AGENT_TTL_MS): BullMQ cannot finish the entry. The job's record already refused
      // our result; there is nothing else to do.
      if (/Missing (key|lock) for job/.test(err.message)) this.log.info({ err: err.message }, 'a queue entry was removed while this agent held it');
      else redisHealth.error(err, 'agent queue consumer'); // quiet while Redis is away; one line otherwise
    });
  }

  /**
   * An agent restarting under the same id hands back what its previous incarnation held, so
   * nothing waits for that one's queue lock (60 s) to expire: a job it had started goes back
   * to placement as a lost agent (infrastructure: no attempt spent), one it had not started is
   * handed back. Its queue is emptied first, so no entry of the old incarnation runs again.
   */
  private async reclaim(): Promise<void> {
    const queue = quietErrors(new Queue<AgentJobData>(QUEUES.agent(this.id), { connection: this.connection, prefix: this.env.KILN_PREFIX }), 'agent queue');
    try {
      await queue.obliterate({ force: true });
    } finally {
      await queue.close();
    }
    const ids = await this.jobs.store.activeIds();
    const held = (await this.jobs.store.getMany(ids)).filter((j): j is StoredJob => j?.status === 'running' && j.agent === this.id);
    for (const job of held) {
      if (job.stage === 'dispatched') {
        await this.jobs.handBack(job, job.attempt, `agent ${this.id} restarted before starting it`);
      } else {
        await this.jobs.retryOrFail(job, new KilnError('agent_lost', `agent ${this.id} restarted while running it`), job.attempt);
      }
    }
    if (held.length) this.log.warn({ jobs: held.map((j) => j.id) }, 'restarted: handed back what the previous run of this agent held');
    await this.jobs.wake(this.id);
  }

  /**
   * Redis came back (any reconnect): heartbeat at once rather than at the next tick, so the
   * dispatcher sees this agent alive as soon as it can.
   */
  announce(): void {
    if (this.heartbeatTimer) void this.heartbeat().catch(() => {});
  }

  /** Cancellation requested for a job (pub/sub from the API). */
  onCancel(jobId: string): void {
    if (this.current?.job.id === jobId) void this.stopCurrent('user');
  }

  // ---- worker supervision -------------------------------------------------------------

  private ensureWorker(): void {
    if (this.workerReady) return;
    const delay = RESTART_BACKOFF_MS[Math.min(this.consecutiveFailures, RESTART_BACKOFF_MS.length - 1)]!;
    this.workerReady = (async () => {
      if (delay) await new Promise((r) => setTimeout(r, delay));
      const w = new WorkerProcess(this.command, this.log.child({ component: 'worker' }));
      this.worker = w;
      agentMetrics.watch(w);
      w.on('exit', (err) => {
        if (this.worker !== w) return;
        if (err && err.code !== 'canceled') this.log.error({ err: err.message }, 'worker exited');
        this.worker = null;
        this.workerReady = null;
        if (!this.draining) {
          this.restarts += 1;
          this.ensureWorker();
        }
      });
      try {
        const ready = await w.start(this.id, this.env.GPU_ID, this.env.WORKER_START_TIMEOUT_MS);
        this.consecutiveFailures = 0;
        this.state = this.current ? 'busy' : 'ready';
        this.log.info({ pid: w.pid, backend: ready.capabilities.backend, models: ready.capabilities.models.length, device: ready.device.name }, 'worker ready');
      } catch (err) {
        this.consecutiveFailures += 1;
        this.state = 'defunct';
        this.log.error({ err: coerceError(err).message, retryInMs: RESTART_BACKOFF_MS[Math.min(this.consecutiveFailures, RESTART_BACKOFF_MS.length - 1)] }, 'worker failed to start');
        throw err;
      }
    })();
    this.workerReady.catch(() => {}); // the exit handler schedules the next try
    void this.heartbeat().catch(() => {});
  }

  private async readyWorker(): Promise<WorkerProcess> {
    for (;;) {
      this.ensureWorker();
      try {
        await this.workerReady;
      } catch {
        await new Promise((r) => setTimeout(r, 200));
        continue;
      }
      if (this.worker?.state === 'ready') return this.worker;
      await new Promise((r) => setTimeout(r, 50));
    }
  }

  // ---- jobs ---------------------------------------------------------------------------

  private async process(entry: Job<AgentJobData>): Promise<void> {
    const { job_id, attempt } = entry.data;
    const job = await this.jobs.store.get(job_id);
    if (!job || job.status !== 'running' || job.attempt !== attempt || job.agent !== this.id) {
      this.log.info({ job: job_id, attempt }, 'skipping a job this agent no longer holds');
      return;
    }
    if (this.draining && job.kind !== 'cache') {
      await this.jobs.handBack(job, attempt, `agent ${this.id} is shutting down`);
      return;
    }
    if (job.cancel_requested) {
      await this.finish(job, attempt, new KilnError('canceled', 'canceled by request'));
      return;
    }
    const span = tracingOn()
      ? tracer().startSpan('agent run', { attributes: { 'kiln.job': job.id, 'kiln.agent': this.id, 'kiln.attempt': attempt, 'kiln.kind': job.kind } }, contextOf(await this.jobs.store.traceOf(job.id)))
      : null;
    this.current = { job, requestId: null, cancel: null, progressed: false, entry, span };
    this.state = 'busy';
    void this.heartbeat().catch(() => {});
    const jobDir = join(this.env.WORK_DIR, this.id, `${job.id}-a${attempt}`);
    const run = `a${attempt}-${randomBytes(3).toString('hex')}`;
    try {
      const worker = await this.readyWorker();
      const begun = await this.jobs.update(
        job.id,
        { status: ['running'], attempt },
        { stage: 'running', started_at: job.started_at ?? new Date().toISOString(), timings: { ...job.timings, queued_ms: Date.now() - Date.parse(job.created_at) } },
        { webhook: 'started', message: `attempt ${attempt} started on ${this.id}` },
      );
      if (!begun) return this.log.warn({ job: job.id }, 'job was taken back before it started');
      lifecycle.started(begun, this.id, attempt);
      await mkdir(jobDir, { recursive: true });
      const ctx: RunContext = { worker, attempt, run, jobDir, begun };
      switch (job.kind) {
        case 'generation':
          await this.runGeneration(job, ctx);
          break;
        case 'training':
          await this.runTraining(job, ctx);
          break;
        case 'cache':
          await this.runCache(job, ctx);
          break;
      }
    } catch (err) {
      const reason = this.current?.cancel;
      if (reason === 'handback') {
        const now = await this.jobs.store.get(job.id);
        if (now) await this.jobs.handBack(now, attempt, `agent ${this.id} stopped it`);
      } else if (reason === 'timeout') {
        await this.finish(job, attempt, new KilnError('timeout', `ran longer than timeout_s=${timeoutOf(job)}`));
      } else if (reason === 'user') {
        await this.finish(job, attempt, new KilnError('canceled', 'canceled by request'));
      } else {
        await this.finish(job, attempt, coerceError(err), { progressed: this.current?.progressed });
      }
    } finally {
      span?.end();
      this.current = null;
      this.state = this.worker?.state === 'ready' || this.worker?.state === 'busy' ? 'ready' : this.state === 'busy' ? 'starting' : this.state;
      await rm(jobDir, { recursive: true, force: true }).catch(() => {});
      await this.heartbeat().catch(() => {});
      await this.jobs.wake(this.id); // names this agent: the dispatcher re-reads its queue
    }
  }

  /** A span under the running job's (null when tracing is off or nothing runs). */
  private childSpan(name: string, attributes: Record<string, string | number>): Span | null {
    const parent = this.current?.span;
    return parent ? tracer().startSpan(name, { attributes }, trace.setSpan(contextOf(null), parent)) : null;
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
    const ours = job.attempt === attempt && job.agent === this.id;
    if (ours && job.status === 'succeeded') return { status: 'succeeded', outputs: job.kind === 'generation' ? job.outputs.length : 0, total_ms: job.timings.total_ms };
    if (ours && job.error) throw failure(`${job.error.code}: ${job.error.message}`);
    const last = (await this.jobs.store.history(job_id)).events.filter((e) => e.message && e.attempt >= attempt - 1).at(-1);
    throw failure(`attempt ${attempt} did not end the job here (now ${job.status}, attempt ${job.attempt})${last?.message ? `: ${last.message}` : ''}`);
  }

  /**
   * Sends a request to the worker as the current one; a cancel that came early applies now.
   * The job's timeout_s runs while the worker works on it, not while storage is retried.
   */
  private startRequest<T>(run: { id: string; done: Promise<T> }): Promise<T> {
    const cur = this.current;
    if (!cur) return run.done;
    cur.requestId = run.id;
    const early = cur.cancel;
    if (early) {
      cur.cancel = null;
      void this.stopCurrent(early);
    }
    const timeout = setTimeout(() => void this.stopCurrent('timeout'), timeoutOf(cur.job) * 1000);
    agentMetrics.busy();
    const span = this.childSpan('worker request', { 'kiln.request': run.id });
    return run.done.finally(() => {
      span?.end();
      agentMetrics.idle();
      clearTimeout(timeout);
      if (cur.requestId === run.id) cur.requestId = null; // nothing left for a stop to kill
    });
  }

  /**
   * Progress from the worker onto the record (one guarded write per step), a stage event when
   * the stage changes, throttled progress webhooks, and a stop when the job was canceled or
   * taken back under us.
   */
  private progressHandler(job: StoredJob, attempt: number) {
    let lastHook = 0;
    let lastStage = '';
    let lastMirror = 0;
    const entry = this.current?.entry;
    const wantsHook = 'webhook' in job.request && !!job.request.webhook?.events.includes('progress');
    return (p: ProgressMessage) => {
      const stage = p.stage === 'loading_model' ? 'loading_model' : 'running';
      void this.jobs.store
        .setProgress(job.id, attempt, { stage, progress: { stage: p.stage, step: p.step, total: p.total, ...(p.loss === undefined ? {} : { loss: p.loss }) } })
        .then(async ({ ok, cancelRequested }) => {
          if (!ok) return this.stopCurrent('handback');
          if (cancelRequested) return this.stopCurrent('user');
          const now = Date.now();
          if (entry && (p.stage !== lastStage || p.step === p.total || now - lastMirror >= ENTRY_PROGRESS_MS)) {
            lastMirror = now; // Bull Board's Progress tab shows the entry's progress
            const percent = p.total > 0 ? Math.round((100 * p.step) / p.total) : 0;
            void entry.updateProgress({ stage: p.stage, step: p.step, total: p.total, percent, ...(p.loss === undefined ? {} : { loss: p.loss }) }).catch(() => {});
          }
          if (p.stage !== lastStage) {
            lastStage = p.stage; // each stage (loading, base, refiner, upscale, safety, train) is an event
            lifecycle.stage(job, this.id, p.stage, p.total);
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

  /**
   * One upload or download, retried in place while storage is unreachable: backoff with
   * jitter for up to TRANSFER_RETRY_MS (an upload goes again from the file still on disk).
   * Then it fails as `storage_failed`, an infrastructure fault: the job is re-placed without
   * spending an attempt. A stop of the running job (cancel, timeout, hand-back) ends the wait.
   */
  private async transfer(what: string, op: () => Promise<void>): Promise<void> {
    const started = Date.now();
    let delay = TRANSFER_BACKOFF_MS.first;
    for (let tries = 1; ; tries++) {
      const stopping = this.current?.cancel;
      if (stopping) throw new KilnError('canceled', `${what} abandoned: the job is being stopped (${stopping})`);
      try {
        await op();
        if (tries > 1) this.log.info({ what, tries, ms: Date.now() - started }, 'storage reachable again; transfer done');
        return;
      } catch (err) {
        const message = coerceError(err).message;
        const left = this.env.TRANSFER_RETRY_MS - (Date.now() - started);
        if (Storage.isNotFound(err) || left <= 0) {
          throw new KilnError('storage_failed', `${what} failed after ${tries} ${tries === 1 ? 'try' : 'tries'}: ${message}`, { cause: err });
        }
        if (tries === 1) this.log.warn({ what, err: message, retryForMs: this.env.TRANSFER_RETRY_MS }, 'storage unreachable; retrying in place');
        // the last wait is cut to the window, so the final try comes at its end
        await this.pause(Math.min(left, delay * (0.5 + Math.random() / 2)));
        delay = Math.min(delay * 2, TRANSFER_BACKOFF_MS.max);
      }
    }
  }

  /** A wait that a stop of the running job (stopCurrent) cuts short. */
  private pause(ms: number): Promise<void> {
    return new Promise((resolve) => {
      const done = () => {
        clearTimeout(timer);
        this.pauses.delete(done);
        resolve();
      };
      const timer = setTimeout(done, ms);
      this.pauses.add(done);
    });
  }

  private upload(key: string, path: string, contentType: string, meta: Record<string, string> = {}): Promise<void> {
    return this.transfer(`upload of ${key}`, () => this.storage.putFile(key, path, contentType, meta));
  }

  private download(key: string, path: string, what: string): Promise<void> {
    return this.transfer(`download of ${what} ${key}`, () => this.storage.getFile(key, path));
  }

  private async runGeneration(job: GenerationJob, { worker, attempt, run, jobDir, begun }: RunContext): Promise<void> {
    const started = Date.now();
    const [files] = await Promise.all([this.downloadInputs(job, jobDir), this.fetchTrainedLoras(job)]);
    const result = await this.startRequest(worker.generate({ job_id: job.id, attempt, job_dir: jobDir, files, request: job.request }, this.progressHandler(job, attempt)));

    // this run's objects become the job's outputs only through the guarded write below, so an
    // attempt that lost the job meanwhile never replaces what the record describes
    const still = await this.jobs.store.setProgress(job.id, attempt, { stage: 'uploading', progress: { stage: 'uploading', step: 0, total: result.outputs.length } });
    if (!still.ok) return this.log.info({ job: job.id, attempt }, 'the job was taken back while it ran here; its result is dropped');
    const uploadStart = Date.now();
    const outputs: StoredOutput[] = [];
    const uploadSpan = this.childSpan('upload outputs', { 'kiln.outputs': result.outputs.length });
    try {
      for (const o of result.outputs) {
        const key = Storage.outputKey(job.id, run, o.index, o.content_type.split('/')[1] ?? 'bin');
        await this.upload(key, o.path, o.content_type, { 'x-amz-meta-seed': String(o.seed), 'x-amz-meta-sha256': o.sha256, 'x-amz-meta-attempt': String(attempt), 'x-amz-meta-agent': this.id });
        const { path: _path, ...rest } = o;
        outputs.push({ ...rest, key });
      }
    } catch (err) {
      await this.discard(outputs.map((o) => o.key)); // a run that ends here leaves no objects behind
      throw err;
    } finally {
      uploadSpan?.end();
    }
    const finishedAt = new Date();
    const done = await this.jobs.update(job.id, { status: ['running'], attempt }, {
      status: 'succeeded',
      stage: 'done',
      outputs,
      progress: null,
      error: null,
      finished_at: finishedAt.toISOString(),
      timings: {
        queued_ms: Date.parse(begun.started_at!) - Date.parse(job.created_at),
        model_load_ms: Math.round(result.timings.model_load_ms),
        inference_ms: Math.round(result.timings.inference_ms),
        upload_ms: Date.now() - uploadStart,
        total_ms: finishedAt.getTime() - Date.parse(job.created_at),
      },
    });
    if (!done) {
      this.log.info({ job: job.id, attempt }, 'the job was taken back while it ran here; its result is dropped');
      await this.discard(outputs.map((o) => o.key));
      return;
    }
    this.log.debug({ job: job.id, attempt, ms: Date.now() - started, loaded: result.loaded_models }, 'generation uploaded'); // its end is the lifecycle line
    if (attempt > 1) await this.discardLeftovers(`outputs/${job.id}/`, new Set(outputs.map((o) => o.key)));
    // placement's estimate of how long a job holds this GPU. Model loads are left out: placement
    // charges them separately, and counting them here would make a thrashing agent look slow,
    // which sends more jobs elsewhere and makes it thrash more.
    this.recordDuration(Date.now() - started - result.timings.model_load_ms);
    const h = job.request.hyperparameters;
    const steps = job.request.scheduler.steps + (job.request.model.refiner ? (job.request.refiner?.steps ?? job.request.scheduler.steps) : 0);
    this.recordSteps(`generation ${job.request.model.base}`, result.timings.inference_ms, steps, h.width * h.height * h.num_images);
  }

  /**
   * A LoRA fine-tune: fetch the dataset, resume from the last checkpoint of an earlier attempt
   * if there is one, upload every checkpoint as it is written, then upload the LoRA and
   * register it under its name so any agent can use it at once.
   */
  private async runTraining(job: TrainingJob, { worker, attempt, run, jobDir, begun }: RunContext): Promise<void> {
    const datasetDir = join(jobDir, 'dataset');
    await mkdir(datasetDir, { recursive: true });
    for (const [i, item] of job.request.dataset.items.entries()) {
      const ext = item.image.split('.').at(-1) ?? 'png';
      await this.download(item.image, join(datasetDir, `${i}.${ext}`), 'dataset image');
    }
    let resume: { path: string; step: number } | null = null;
    const last = job.training.last_checkpoint;
    if (last) {
      const path = join(jobDir, `resume-step-${last.step}.safetensors`);
      await this.download(last.key, path, 'checkpoint');
      resume = { path, step: last.step };
      await this.jobs.update(job.id, { status: ['running'], attempt }, {}, { message: `resuming from the checkpoint at step ${last.step}` });
    }
    // checkpoints upload in order while training goes on, each retried in place; one that still
    // fails is skipped (the next one tries again) and never ends the training. Every link has
    // its handler, so the chain cannot reject; it is awaited before the end.
    let uploads = Promise.resolve();
    const onCheckpoint = (c: CheckpointMessage) => {
      uploads = uploads
        .then(() => this.saveCheckpoint(job, attempt, run, c, last?.step ?? 0))
        .catch((err) => this.log.warn({ job: job.id, step: c.step, err: coerceError(err).message }, 'checkpoint not saved; training goes on'));
    };
    const total = job.request.hyperparameters.steps;
    let trained: TrainedMessage;
    try {
      trained = await this.startRequest(
        worker.train(
          { job_id: job.id, attempt, job_dir: jobDir, dataset_dir: datasetDir, resume, request: job.request },
          this.progressHandler(job, attempt),
          onCheckpoint,
        ),
      );
    } finally {
      await uploads;
    }
    // under this run's own key, so an attempt that lost the job cannot replace the registered file
    const key = `loras/${job.id}/${run}/${loraFileName(job.request.output.name)}`;
    await this.upload(key, trained.path, 'application/octet-stream', { 'x-amz-meta-sha256': trained.sha256 });
    const now = (await this.jobs.store.get(job.id)) as TrainingJob | null;
    const name = qualifiedLoraName(job.client, job.request.output.name);
    const lora = { name, key, sha256: trained.sha256, bytes: trained.bytes, base_model: job.request.base_model, rank: job.request.hyperparameters.rank };
    if (!(await this.loras.register({ ...lora, tenant: job.client, job_id: job.id, created_at: new Date().toISOString() }, attempt)))
      throw new KilnError('conflict', `the LoRA ${name} was not registered: this attempt no longer holds the job, or another training holds the name`);
    const finishedAt = new Date();
    await this.jobs.update(job.id, { status: ['running'], attempt }, {
      status: 'succeeded',
      stage: 'done',
      progress: null,
      error: null,
      training: { step: trained.steps, total, loss: trained.final_loss, last_checkpoint: now?.training.last_checkpoint ?? null, lora },
      finished_at: finishedAt.toISOString(),
      timings: { ...begun.timings, model_load_ms: Math.round(trained.timings.model_load_ms), inference_ms: Math.round(trained.timings.train_ms), upload_ms: null, total_ms: finishedAt.getTime() - Date.parse(job.created_at) },
    });
    this.log.info({ job: job.id, tenant: job.client, agent: this.id, lora: lora.name, steps: trained.steps, loss: trained.final_loss }, 'LoRA registered');
    const hp = job.request.hyperparameters;
    this.recordSteps(`training ${job.request.base_model}`, trained.timings.train_ms, trained.steps - (resume?.step ?? 0), hp.resolution * hp.resolution * hp.batch_size);
  }

  /** Best effort: objects of a run that did not become the job's result. */
  private async discard(keys: string[]): Promise<void> {
    await this.storage.remove(keys).catch((err) => this.log.warn({ keys, err: coerceError(err).message }, 'could not delete the objects of a dropped result'));
  }

  /** Best effort, after a retried job succeeded: what earlier runs left under its prefix. */
  private async discardLeftovers(prefix: string, keep: Set<string>): Promise<void> {
    const left = await this.storage.list(prefix).catch(() => []);
    await this.discard(left.map((o) => o.key).filter((k) => !keep.has(k)));
  }

  /**
   * Uploads a checkpoint under this run's keys and makes it the job's last one (a guarded
   * write). One past the step this attempt resumed from is progress: if the attempt fails
   * later, it spends no attempt.
   */
  private async saveCheckpoint(job: TrainingJob, attempt: number, run: string, c: CheckpointMessage, resumedFrom: number): Promise<void> {
    const key = `trainings/${job.id}/checkpoints/${run}/step-${String(c.step).padStart(6, '0')}.safetensors`;
    await this.upload(key, c.path, 'application/octet-stream', { 'x-amz-meta-sha256': c.sha256, 'x-amz-meta-attempt': String(attempt) });
    const now = await this.jobs.store.get(job.id);
    if (now?.kind !== 'training') return;
    const progress = c.step > resumedFrom;
    const saved = await this.jobs.update(
      job.id,
      { status: ['running'], attempt },
      // progress also ends any run of failures on the record, so a later one — reported by the
      // dispatcher as well as by us — is counted afresh
      { training: { ...now.training, last_checkpoint: { step: c.step, key, sha256: c.sha256, bytes: c.bytes } }, ...(progress ? { charged_attempts: 0, infra_since: null } : {}) },
      { message: `checkpoint at step ${c.step}` },
    );
    if (saved && progress && this.current?.job.id === job.id) this.current.progressed = true;
  }

  /** Loads (or unloads) models on this agent's worker for a cache request. */
  private async runCache(job: CacheJob, { worker, attempt }: RunContext): Promise<void> {
    const t = job.request;
    const loaded = await this.startRequest(t.action === 'load' ? worker.load(t.models, t.location, t.pin) : worker.unload(t.models));
    await this.heartbeat().catch(() => {});
    await this.jobs.update(job.id, { status: ['running'], attempt }, {
      status: 'succeeded',
      stage: 'done',
      progress: null,
      cache: t.action === 'load' ? { loaded: loaded.models, unloaded: [] } : { loaded: [], unloaded: loaded.models },
      finished_at: new Date().toISOString(),
      timings: { ...job.timings, model_load_ms: Math.round(loaded.timings.load_ms), total_ms: Date.now() - Date.parse(job.created_at) },
    });
  }

  /**
   * Trained LoRAs the request names are fetched from S3 into KILN_LORA_DIR before it runs, and
   * used only if their bytes have the sha256 the registry recorded: a file replaced in the bucket
   * (or on this disk) is refused, never silently used. A file already here is hashed once per
   * content and reused while the registry still names that content.
   */
  private async fetchTrainedLoras(job: GenerationJob): Promise<void> {
    const registered = await this.loras.getMany((job.request.loras ?? []).map((l) => l.name));
    if (!registered.size) return;
    await mkdir(this.loraDir, { recursive: true });
    for (const [name, l] of registered) {
      const path = join(this.loraDir, loraFileName(name));
      if (this.verifiedLoras.get(path) === l.sha256) continue;
      if ((await exists(path)) && (await sha256File(path)) === l.sha256) {
        this.verifiedLoras.set(path, l.sha256);
        continue;
      }
      try {
        await this.storage.getFile(l.key, `${path}.part`);
      } catch (err) {
        throw new KilnError('storage_failed', `download of LoRA ${name} failed: ${coerceError(err).message}`, { cause: err });
      }
      const got = await sha256File(`${path}.part`);
      if (got !== l.sha256) {
        await rm(`${path}.part`, { force: true });
        throw new KilnError('integrity_failed', `LoRA ${name} in storage does not match its registered sha256 (expected ${l.sha256.slice(0, 12)}…, got ${got.slice(0, 12)}…); refusing to use it`);
      }
      await rename(`${path}.part`, path);
      this.verifiedLoras.set(path, l.sha256);
    }
  }

  /** Fetches the request's input images (stored by the API) into the job directory. */
  private async downloadInputs(job: GenerationJob, jobDir: string): Promise<Record<string, string>> {
    const r = (job as GenerationJob).request;
    const keys = [r.image?.init.s3_key, r.image?.mask?.s3_key, ...(r.controlnets ?? []).map((c) => c.image.s3_key)].filter((k): k is string => !!k);
    const files: Record<string, string> = {};
    if (keys.length) await mkdir(join(jobDir, 'inputs'), { recursive: true });
    for (const [i, key] of keys.entries()) {
      const path = join(jobDir, 'inputs', `${i}-${key.split('/').at(-1)}`);
      await this.download(key, path, 'input');
      files[key] = path;
    }
    return files;
  }

  /** Ends an attempt that produced no result: canceled, failed, or back to placement. */
  private async finish(job: StoredJob, attempt: number, err: KilnError, opts: { progressed?: boolean } = {}): Promise<void> {
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

  /** Stops the running request: cooperative cancel first, then kill the worker. */
  private async stopCurrent(reason: 'user' | 'timeout' | 'handback'): Promise<void> {
    const cur = this.current;
    if (!cur || cur.cancel) return;
    cur.cancel = reason;
    for (const wake of [...this.pauses]) wake(); // a transfer waiting to retry sees the flag now
    const worker = this.worker;
    if (!cur.requestId || !worker) return; // not started yet: process() sees the flag
    this.log.info({ job: cur.job.id, reason }, 'stopping the running request');
    worker.cancel(cur.requestId);
    const requestId = cur.requestId;
    setTimeout(() => {
      if (this.current?.requestId === requestId && this.worker === worker) {
        this.log.warn({ job: cur.job.id }, 'worker did not stop in time; killing it');
        worker.kill('SIGTERM', 'kill');
        setTimeout(() => worker.kill('SIGKILL', 'kill'), 2_000).unref();
      }
    }, this.env.CANCEL_GRACE_MS).unref();
  }

  private recordDuration(ms: number): void {
    this.jobsDone += 1;
    this.avgJobMs = this.avgJobMs === null ? ms : Math.round(this.avgJobMs * 0.8 + ms * 0.2);
  }

  /** Placement's step time: `ms` spent on `steps` steps of `pixels` pixels, per megapixel-step. */
  private recordSteps(key: string, ms: number, steps: number, pixels: number): void {
    if (!(steps > 0 && pixels > 0 && ms >= 0)) return;
    const v = ms / steps / (pixels / 1_000_000);
    const before = this.stepMs.get(key);
    this.stepMs.set(key, Math.round((before === undefined ? v : before * 0.8 + v * 0.2) * 1000) / 1000);
  }

  async heartbeat(): Promise<void> {
    const w = this.worker;
    const st = w?.lastState;
    const caps = w?.ready?.capabilities ?? null;
    const maintenance = await this.registry.inMaintenance(this.id).catch(() => this.maintenance);
    if (maintenance !== this.maintenance) {
      this.maintenance = maintenance;
      this.log.info({ agent: this.id, job: this.current?.job.id }, maintenance ? 'in maintenance: finishing what it holds, taking nothing new' : 'back in rotation');
    }
    const state: AgentState = this.draining || maintenance ? 'draining' : this.current ? 'busy' : w?.state === 'ready' ? 'ready' : this.state === 'defunct' ? 'defunct' : 'starting';
    agentMetrics.state(state);
    const hb: AgentHeartbeat = {
      agent_id: this.id,
      host: hostname(),
      gpu_id: this.env.GPU_ID,
      gpu: {
        name: w?.ready?.device.name ?? 'unknown',
        vram_total_mb: st?.vram_total_mb ?? 0,
        vram_free_mb: st ? st.vram_total_mb - st.vram_used_mb : 0,
      },
      state,
      maintenance,
      resident: st?.resident ?? [],
      current_job: this.current?.job.id ?? null,
      capabilities: w?.state === 'ready' || w?.state === 'busy' ? caps : null,
      worker: { pid: w?.pid ?? null, restarts: this.restarts },
      jobs_done: this.jobsDone,
      avg_job_ms: this.avgJobMs,
      step_ms: Object.fromEntries(this.stepMs),
      started_at: this.startedAt,
      heartbeat_at: new Date().toISOString(),
    };
    await this.registry.publish(hb, this.env.AGENT_TTL_MS);
  }

  /**
   * Clean stop: advertise `draining` so nothing new is placed here, let the running job
   * finish until the deadline (then hand it back), hand back what waits in our queue, stop
   * the worker, and leave the registry.
   */
  async drain(deadlineMs: number): Promise<void> {
    this.draining = true;
    await this.heartbeat().catch(() => {});
    const handBackAfter = setTimeout(() => void this.stopCurrent('handback'), Math.max(0, deadlineMs - 3_000));
    await this.consumer?.close();
    clearTimeout(handBackAfter);
    const queue = quietErrors(new Queue<AgentJobData>(QUEUES.agent(this.id), { connection: this.connection, prefix: this.env.KILN_PREFIX }), 'agent queue');
    for (const entry of await queue.getJobs(['waiting', 'prioritized', 'delayed'])) {
      if (!entry?.data) continue;
      const job = await this.jobs.store.get(entry.data.job_id);
      if (job?.status === 'running' && job.agent === this.id && job.attempt === entry.data.attempt) {
        // a cache task belongs to this agent: it ends here; anything else goes back to placement
        if (job.kind === 'cache') await this.jobs.retryOrFail(job, new KilnError('agent_lost', `agent ${this.id} shut down before loading`), entry.data.attempt);
        else await this.jobs.handBack(job, entry.data.attempt, `agent ${this.id} is shutting down`);
      }
    }
    await queue.obliterate({ force: true }).catch(() => {});
    await queue.close();
    if (this.heartbeatTimer) clearInterval(this.heartbeatTimer);
    this.heartbeatTimer = null;
    await this.worker?.stop();
    await this.registry.remove(this.id);
  }
}
