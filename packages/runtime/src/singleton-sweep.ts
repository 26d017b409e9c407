import type { Redis } from 'ioredis';
import type { Logger } from './logger.js';

/**
 * A periodic task that one process of many runs at a time (the API's retention and deadline
 * sweeps): every `intervalMs` it takes or renews a lease in Redis and, while it holds it, runs
 * one `step`; a step never overlaps the one before, and `close()` waits for the one in flight.
 */
export class SingletonSweep {
  private timer: NodeJS.Timeout | null = null;
  private running: Promise<unknown> | null = null;
  private readonly holder = `${process.pid}-${Math.random().toString(36).slice(2)}`;

  constructor(
    private readonly redis: Redis,
    private readonly log: Logger,
    private readonly opts: { name: string; leaseKey: string; intervalMs: number; leaseTtlMs: number; step: () => Promise<number> },
  ) {}

  start(): void {
    this.timer ??= setInterval(() => {
      this.running ??= this.tick()
        .catch((err) => this.log.warn({ err: err instanceof Error ? err.message : String(err) }, `${this.opts.name} failed`))
        .finally(() => (this.running = null));
    }, this.opts.intervalMs);
    this.timer.unref();
  }

  async close(): Promise<void> {
    if (this.timer) clearInterval(this.timer);
    this.timer = null;
    await this.running;
  }

  /** One step, if this process holds the lease (else 0): what the step returns. */
  async tick(): Promise<number> {
    return (await this.lease()) ? this.opts.step() : 0;
  }

  private async lease(): Promise<boolean> {
    const { leaseKey, leaseTtlMs } = this.opts;
    if ((await this.redis.set(leaseKey, this.holder, 'PX', leaseTtlMs, 'NX')) === 'OK') return true;
    if ((await this.redis.get(leaseKey)) !== this.holder) return false;
    await this.redis.pexpire(leaseKey, leaseTtlMs);
    return true;
  }
}
