import type { ProgressMessage, StoredJob } from '@kiln/contracts';
import type { Jobs, Logger, LoraRegistry } from '@kiln/runtime';
import type { Attempt } from '../attempt.js';
import type { JobStats } from '../stats.js';
import type { TrainedLoras } from '../trained-loras.js';
import type { Transfers } from '../transfers.js';
import type { WorkerProcess, WorkerRequest } from '../worker-process.js';

export type JobKind = StoredJob['kind'];
export type JobOf<K extends JobKind> = Extract<StoredJob, { kind: K }>;

/** What the pipeline lends a runner for one attempt. */
export interface Run<J extends StoredJob> {
  job: J;
  attempt: number;
  /** names this run's objects in S3: `a<attempt>-<random>`, never reused */
  run: string;
  /** the job's own directory, removed when the run ends */
  jobDir: string;
  /** the record after the `started` write */
  begun: J;
  /** the per-job state a stop reaches (cancel flag, transfer waits, span) */
  state: Attempt;
  /**
   * Sends a request to the worker as this job's current one: a cancel that came early applies
   * now, the job's timeout runs while the worker works on it, and the GPU goes to the next job
   * the moment the worker answers it.
   */
  request<T>(run: WorkerRequest<T>): Promise<T>;
  /** Progress from the worker onto the record, the queue entry and webhooks. */
  onProgress: (p: ProgressMessage) => void;
}

/** Services every runner may use, shared by the agent. */
export interface RunnerDeps {
  agentId: string;
  jobs: Jobs;
  loras: LoraRegistry;
  trainedLoras: TrainedLoras;
  transfers: Transfers;
  stats: JobStats;
  log: Logger;
  /** publishes the agent's heartbeat now (residency changed) */
  heartbeat(): Promise<void>;
}

/**
 * How one kind of job runs on this agent, in three stages the pipeline schedules:
 *  1. `prepare` — before the GPU: fetch what the request needs (inputs, LoRAs, a dataset);
 *  2. `infer` — the worker request itself, the only stage that holds the GPU;
 *  3. `finish` — after the GPU: upload the outputs and write the result (a guarded write).
 * A stage throws to end the attempt: a KilnError says what it costs (see Jobs.retryOrFail).
 */
export interface Runner<K extends JobKind, Prepared = unknown, Result = unknown> {
  readonly kind: K;
  prepare(run: Run<JobOf<K>>): Promise<Prepared>;
  infer(run: Run<JobOf<K>>, worker: WorkerProcess, prepared: Prepared): Promise<Result>;
  finish(run: Run<JobOf<K>>, result: Result, prepared: Prepared): Promise<void>;
}
