import type { Attempt } from './attempt.js';

/** A place in line for the GPU, taken when an entry is taken from the queue. */
export interface Ticket {
  /** set while its attempt asks for the GPU; called in the call that hands it over */
  grant: (() => void) | null;
  attempt: Attempt | null;
}

/**
 * The GPU, as a slot one attempt holds at a time: only one request is ever on the worker.
 * Attempts get it in the order their entries were taken (the order the dispatcher placed them:
 * a later job whose bookkeeping happens to finish first does not overtake). An attempt asks for
 * it once its inputs are in hand and releases it the moment the worker's answer (result or
 * error) has been read; the next in line, if it is asking, gets it inside that call: its
 * `start` runs there and writes its request before any promise continuation, I/O callback or
 * bookkeeping of the previous job. An attempt that is stopped, or ends before its turn, leaves
 * the line.
 */
export class GpuSlot {
  private holder: Attempt | null = null;
  private readonly line: Ticket[] = [];

  /** The attempt holding the GPU, if any. */
  get current(): Attempt | null {
    return this.holder;
  }

  /** A place at the end of the line (call it before anything else awaits, to keep the order). */
  join(): Ticket {
    const t: Ticket = { grant: null, attempt: null };
    this.line.push(t);
    return t;
  }

  /**
   * Once `a` holds the GPU (its turn came), runs `start` at once, in the call that hands it over,
   * and resolves with what it returned; resolves null if `a` was stopped first. `start` must not
   * throw (return a rejected promise instead).
   */
  acquire<T>(t: Ticket, a: Attempt, start: () => T): Promise<{ started: T } | null> {
    if (a.cancel || !this.line.includes(t)) {
      this.leave(t);
      return Promise.resolve(null);
    }
    t.attempt = a;
    return new Promise((resolve) => {
      const forget = a.onStop(() => {
        t.grant = null;
        this.leave(t);
        resolve(null);
      });
      t.grant = () => {
        forget();
        resolve({ started: start() });
      };
      this.next();
    });
  }

  /** `a` is done with the GPU: the next in line gets it. */
  release(a: Attempt): void {
    if (this.holder !== a) return;
    this.holder = null;
    this.next();
  }

  /** The ticket's attempt ended (or was stopped) without its turn: it leaves the line. */
  leave(t: Ticket): void {
    const i = this.line.indexOf(t);
    if (i < 0) return;
    this.line.splice(i, 1);
    this.next();
  }

  private next(): void {
    if (this.holder) return;
    const head = this.line[0];
    if (!head?.grant) return; // its attempt is still preparing: the GPU waits for it
    this.line.shift();
    this.holder = head.attempt;
    const grant = head.grant;
    head.grant = null;
    grant();
  }
}
