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
 * and a follower re-reads the record whenever it wakes. A follower may also take each message
 * itself (`onMessage`): live previews arrive that way, the image in the message.
 */
export class ChangeFeed {
  private sub: Redis | null = null;
  private readonly waiters = new Map<string, Set<() => void>>();
  private readonly followers = new Map<string, number>();
  private readonly listeners = new Map<string, Set<(message: string) => void>>();

  constructor(private readonly redis: Redis) {}

  private connection(): Redis {
    if (!this.sub) {
      this.sub = this.redis.duplicate();
      this.sub.on('error', () => {}); // reconnects (and resubscribes) on its own; followers poll meanwhile
      this.sub.on('message', (channel: string, message: string) => {
        for (const listener of this.listeners.get(channel) ?? []) listener(message);
        const waiting = this.waiters.get(channel);
        if (!waiting) return;
        this.waiters.delete(channel);
        for (const wake of waiting) wake();
      });
    }
    return this.sub;
  }

  /** Subscribes (once per channel); `onMessage` gets each message while it follows. Returns how to stop following. */
  async follow(channel: string, onMessage?: (message: string) => void): Promise<() => Promise<void>> {
    if (onMessage) {
      const set = this.listeners.get(channel) ?? new Set();
      this.listeners.set(channel, set.add(onMessage));
    }
    const n = (this.followers.get(channel) ?? 0) + 1;
    this.followers.set(channel, n);
    if (n === 1) await this.connection().subscribe(channel).catch(() => {});
    let stopped = false;
    return async () => {
      if (stopped) return;
      stopped = true;
      if (onMessage) {
        const set = this.listeners.get(channel);
        set?.delete(onMessage);
        if (set?.size === 0) this.listeners.delete(channel);
      }
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
