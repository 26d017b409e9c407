/**
 * Runs the dispatcher's ticks one at a time: a wake during a tick schedules exactly one more.
 * Under load that one waits as long as the tick took (at most `coalesceMaxMs`), so the wakes of
 * many job ends gather into one tick that places them all, rather than a tick per wake each
 * paying for the whole fleet's view: the dispatcher ticks at most about half the time. A wake
 * that finds no tick running is served at once, so an idle farm's first job waits for nothing.
 */
export class TickLoop {
  private running: Promise<void> | null = null;
  private again = false;
  private stopped = false;

  constructor(
    private readonly tick: () => Promise<void>,
    private readonly coalesceMaxMs: number,
    private readonly onError: (err: unknown) => void,
  ) {}

  /** Something changed: tick now, or once more after the running tick. */
  wake(): void {
    if (this.stopped) return;
    if (this.running) {
      this.again = true;
      return;
    }
    this.running = this.run().finally(() => {
      this.running = null;
    });
  }

  /** No tick starts after this; resolves when the running one has ended. */
  async stop(): Promise<void> {
    this.stopped = true;
    await this.running;
  }

  private async run(): Promise<void> {
    try {
      do {
        this.again = false;
        const began = performance.now();
        await this.tick();
        const gap = Math.min(performance.now() - began, this.coalesceMaxMs);
        if (this.again && gap >= 1 && !this.stopped) await new Promise((r) => setTimeout(r, gap));
      } while (this.again && !this.stopped);
    } catch (err) {
      this.onError(err);
    }
  }
}
