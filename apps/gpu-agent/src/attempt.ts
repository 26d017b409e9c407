import type { StoredJob } from '@kiln/contracts';
import { type AgentJobData, contextOf, type Span, trace, tracer } from '@kiln/runtime';
import type { Job } from 'bullmq';

/** Why a job's run is being stopped: a cancel by request, its timeout, or a hand-back. */
export type StopReason = 'user' | 'timeout' | 'handback';

/**
 * Where an attempt is in the agent's pipeline: fetching what it needs, waiting for the GPU,
 * on the worker, or uploading and writing its result while the next job runs.
 */
export type Phase = 'preparing' | 'waiting' | 'inferring' | 'finishing';

/**
 * One attempt of one job on this agent, from taking its queue entry to the end of its run:
 * what it is, where its files go, and whether it is being stopped. Everything a stop must
 * reach (the worker request in flight, a transfer waiting to retry) is found here, so a
 * cancel, a timeout or a hand-back addresses this job and no other.
 */
export class Attempt {
  /** the worker request running for it now, if any (a stop cancels it) */
  requestId: string | null = null;
  /** why it is being stopped, if it is */
  cancel: StopReason | null = null;
  phase: Phase = 'preparing';
  /** ms it held the GPU (acquire to the worker's answer), once it has */
  gpuMs: number | null = null;
  /** a training attempt advanced its checkpoint: a failure now spends no attempt */
  progressed = false;
  /** its record after the `started` write */
  begun: StoredJob | null = null;
  /** what a stop must interrupt: transfer waits, the wait for the GPU */
  private readonly stopListeners = new Set<() => void>();

  constructor(
    readonly job: StoredJob,
    readonly attempt: number,
    /** names this run's objects in S3: `a<attempt>-<random>`, never reused (see Storage.outputKey) */
    readonly run: string,
    readonly jobDir: string,
    /** its entry on this agent's queue, where progress is mirrored for Bull Board */
    readonly entry: Job<AgentJobData>,
    /** its run's span, under the job's trace, when tracing is on (tracing.ts) */
    readonly span: Span | null,
  ) {}

  get id(): string {
    return this.job.id;
  }

  /** Calls `fn` when this attempt is stopped; returns a function that forgets it. */
  onStop(fn: () => void): () => void {
    this.stopListeners.add(fn);
    return () => this.stopListeners.delete(fn);
  }

  /** A wait that a stop of this attempt cuts short. */
  pause(ms: number): Promise<void> {
    return new Promise((resolve) => {
      const done = () => {
        clearTimeout(timer);
        forget();
        resolve();
      };
      const timer = setTimeout(done, ms);
      const forget = this.onStop(done);
    });
  }

  /** Ends every wait of this attempt (it is being stopped). */
  wake(): void {
    for (const fn of [...this.stopListeners]) fn();
  }

  /** A span under this run's (null when tracing is off). */
  childSpan(name: string, attributes: Record<string, string | number>): Span | null {
    return this.span ? tracer().startSpan(name, { attributes }, trace.setSpan(contextOf(null), this.span)) : null;
  }
}
