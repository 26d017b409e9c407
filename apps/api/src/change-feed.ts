import type { Redis } from 'ioredis';

declare module 'fastify' {
  interface FastifyInstance {
    /** the process's feed of job and group change hints (see ChangeFeed) */
    changes: ChangeFeed;
  }
}

/**
 * Wake-ups for live followers (SSE streams): one subscriber connection per API process,
 * subscribed to the channels someone follows (counted, so two followers of one job share a
 * subscription). `next` resolves on the channel's next message or after `ms`, whichever comes
 * first, so a message lost to a reconnect costs a follower at most `ms`: messages are hints,
 * and a follower re-reads the record whenever it wakes.
 */
export class ChangeFeed {
  private sub: Redis | null = null;
  private readonly waiters = new Map<string, Set<() => void>>();
  private readonly followers = new Map<string, number>();

  constructor(private readonly redis: Redis) {}

  private connection(): Redis {
    if (!this.sub) {
      this.sub = this.redis.duplicate();
      this.sub.on('error', () => {}); // reconnects (and resubscribes) on its own; followers poll meanwhile
      this.sub.on('message', (channel: string) => {
        const waiting = this.waiters.get(channel);
        if (!waiting) return;
        this.waiters.delete(channel);
        for (const wake of waiting) wake();
      });
    }
    return this.sub;
  }

  /** Subscribes (once per channel); returns how to stop following. */
  async follow(channel: string): Promise<() => Promise<void>> {
    const n = (this.followers.get(channel) ?? 0) + 1;
    this.followers.set(channel, n);
    if (n === 1) await this.connection().subscribe(channel).catch(() => {});
    let stopped = false;
    return async () => {
      if (stopped) return;
      stopped = true;
      const left = (this.followers.get(channel) ?? 1) - 1;
      if (left > 0) return void this.followers.set(channel, left);
      this.followers.delete(channel);
      await this.sub?.unsubscribe(channel).catch(() => {});
    };
  }

  /** Resolves on the next message on `channel`, after `ms`, or when `signal` aborts. */
  next(channel: string, ms: number, signal?: AbortSignal): Promise<void> {
    return new Promise((resolve) => {
      const set = this.waiters.get(channel) ?? new Set();
      this.waiters.set(channel, set);
      const timer = setTimeout(done, ms);
      signal?.addEventListener('abort', done, { once: true });
      set.add(done);
      function done() {
        clearTimeout(timer);
        set.delete(done);
        signal?.removeEventListener('abort', done);
        resolve();
      }
    });
  }

  async close(): Promise<void> {
    const sub = this.sub;
    this.sub = null;
    for (const waiting of this.waiters.values()) for (const wake of waiting) wake();
    await sub?.quit().catch(() => sub.disconnect());
  }
}
