import { isTerminal } from '@kiln/contracts';
import { KilnError, type Logger, SingletonSweep } from '@kiln/runtime';
import type { ApiContext } from './context.js';
import { cancelJob } from './routes/jobs.js';

/** The longest Cancel-After Kiln takes: a day (a training runs without one). */
export const MAX_CANCEL_AFTER_MS = 24 * 3600 * 1000;

/**
 * `Cancel-After` (Replicate's convention): how long from submission a job may take before it is
 * canceled — `30s`, `5m`, `1h`, `1500ms`, or plain seconds. Null when absent.
 */
export function cancelAfterMs(header: string | undefined): number | null {
  if (header === undefined) return null;
  const m = /^\s*(\d{1,9})\s*(ms|s|m|h)?\s*$/.exec(header);
  const ms = m ? Number(m[1]) * { ms: 1, s: 1000, m: 60_000, h: 3_600_000 }[(m[2] ?? 's') as 'ms' | 's' | 'm' | 'h'] : NaN;
  if (!Number.isFinite(ms) || ms < 1000 || ms > MAX_CANCEL_AFTER_MS) {
    const message = 'a duration from 1s to 24h: "30s", "5m", "1h", "1500ms" or seconds';
    throw new KilnError('validation_failed', `invalid request: Cancel-After: ${message}`, { details: [{ field: 'Cancel-After', rule: 'invalid_duration', message }] });
  }
  return ms;
}

/**
 * Cancels jobs whose Cancel-After deadline passed: a job still queued ends `canceled` without
 * ever running; a running one is stopped like a cancel by request (between steps). Deadlines
 * are a sorted set written at submission; one API instance sweeps it at a time (a lease), every
 * `intervalMs`, so a deadline is kept to within about that.
 */
export class DeadlineSweeper {
  private readonly loop: SingletonSweep;

  constructor(
    private readonly ctx: ApiContext,
    private readonly log: Logger,
    intervalMs = 500,
  ) {
    this.loop = new SingletonSweep(ctx.redis, log, {
      name: 'deadline sweep',
      leaseKey: ctx.keys.deadlineLease(),
      intervalMs,
      leaseTtlMs: Math.max(2_000, intervalMs * 4),
      step: () => this.cancelDue(),
    });
  }

  start(): void {
    this.loop.start();
  }

  close(): Promise<void> {
    return this.loop.close();
  }

  tick(): Promise<number> {
    return this.loop.tick();
  }

  /** Cancels the jobs whose deadline passed (a chunk a step); returns how many it looked at. */
  private async cancelDue(): Promise<number> {
    const { redis, keys } = this.ctx;
    const due = await redis.zrangebyscore(keys.deadlines(), '-inf', Date.now(), 'LIMIT', 0, 200);
    for (const id of due) {
      const job = await this.ctx.store.get(id);
      if (job && !isTerminal(job.status)) {
        const when = job.deadline_at ?? 'its deadline';
        const canceled = await cancelJob(this.ctx, id, job.status === 'queued' ? `Cancel-After: not started by ${when}` : `Cancel-After: not done by ${when}`).then(
          () => true,
          (err) => {
            this.log.warn({ job: id, err: err instanceof Error ? err.message : String(err) }, 'deadline cancel failed; trying again');
            return false;
          },
        );
        if (!canceled) continue; // it moved meanwhile: the next sweep tries again
        this.log.info({ job: id, status: job.status }, 'deadline passed: canceled');
      }
      await redis.zrem(keys.deadlines(), id);
    }
    return due.length;
  }
}
