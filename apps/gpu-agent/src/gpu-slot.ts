import type { Attempt } from './attempt.js';

/**
 * The GPU, as a slot one attempt holds at a time: only one request is ever on the worker. An
 * attempt acquires it once its inputs are in hand and releases it the moment the worker's
 * answer (result or error) arrives; the next in line, in arrival order, gets it in the same
 * tick, so its request reaches the worker before any bookkeeping of the previous job. An
 * attempt stopped while in line leaves the line.
 */
export class GpuSlot {
  private holder: Attempt | null = null;
  private readonly line: Array<{ a: Attempt; grant: (ok: boolean) => void }> = [];

  /** The attempt holding the GPU, if any. */
  get current(): Attempt | null {
    return this.holder;
  }

  /** Resolves true once `a` holds the GPU, or false if `a` was stopped first. */
  acquire(a: Attempt): Promise<boolean> {
    if (a.cancel) return Promise.resolve(false);
    if (!this.holder) {
      this.holder = a;
      return Promise.resolve(true);
    }
    return new Promise((resolve) => {
      const waiter = {
        a,
        grant: (ok: boolean) => {
          forget();
          resolve(ok);
        },
      };
      const forget = a.onStop(() => {
        const i = this.line.indexOf(waiter);
        if (i >= 0) this.line.splice(i, 1);
        waiter.grant(false);
      });
      this.line.push(waiter);
    });
  }

  /** `a` is done with the GPU: the next in line gets it. */
  release(a: Attempt): void {
    if (this.holder !== a) return;
    const next = this.line.shift();
    this.holder = next?.a ?? null;
    next?.grant(true);
  }
}
