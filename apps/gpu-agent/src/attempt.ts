import type { StoredJob } from '@kiln/contracts';
import { type AgentJobData, contextOf, type Span, trace, tracer } from '@kiln/runtime';
import type { Job } from 'bullmq';

/** Why a job's run is being stopped: a cancel by request, its timeout, or a hand-back. */
export type StopReason = 'user' | 'timeout' | 'handback';

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
  /** a training attempt advanced its checkpoint: a failure now spends no attempt */
  progressed = false;
  /** its record after the `started` write */
  begun: StoredJob | null = null;
  /** waits between in-place transfer retries, which a stop ends at once */
  private readonly pauses = new Set<() => void>();

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

  /** A wait that a stop of this attempt cuts short. */
  pause(ms: number): Promise<void> {
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

  /** Ends every wait of this attempt (it is being stopped). */
  wake(): void {
    for (const done of [...this.pauses]) done();
  }

  /** A span under this run's (null when tracing is off). */
  childSpan(name: string, attributes: Record<string, string | number>): Span | null {
    return this.span ? tracer().startSpan(name, { attributes }, trace.setSpan(contextOf(null), this.span)) : null;
  }
}
