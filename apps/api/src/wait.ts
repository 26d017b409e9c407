import { isTerminal, type StoredJob } from '@kiln/contracts';
import { KilnError } from '@kiln/runtime';
import type { ChangeFeed } from './change-feed.js';
import type { ApiContext } from './context.js';

/** The longest a request may wait for its job (Replicate's limit too). */
export const MAX_WAIT_S = 60;

/**
 * `Prefer: wait` (RFC 7240 style, Replicate's convention): how many seconds the caller will wait
 * for its job to end — `wait` alone is the most, MAX_WAIT_S; `wait=<n>` at most that. 0 when it
 * did not ask. Other preferences in the header are ignored.
 */
export function preferredWait(header: string | undefined): number {
  if (!header) return 0;
  for (const pref of header.split(',')) {
    const [name, value] = pref.split('=').map((s) => s.trim());
    if (name?.toLowerCase() !== 'wait') continue;
    if (value === undefined) return MAX_WAIT_S;
    const n = /^\d{1,6}$/.test(value) ? Number(value) : NaN;
    if (!Number.isInteger(n)) {
      const message = `wait must be a whole number of seconds (at most ${MAX_WAIT_S}), as in "Prefer: wait=10"`;
      throw new KilnError('validation_failed', `invalid request: Prefer: ${message}`, { details: [{ field: 'Prefer', rule: 'invalid_wait', message }] });
    }
    return Math.min(n, MAX_WAIT_S);
  }
  return 0;
}

/**
 * Waits up to `seconds` for the job to end, woken by the job's change hints (the same feed the
 * SSE streams follow) and looking every second at the latest; returns the job as it is then.
 * Stops early when `signal` aborts (the client went away).
 */
export async function waitForEnd(ctx: ApiContext, feed: ChangeFeed, id: string, seconds: number, signal?: AbortSignal): Promise<StoredJob | null> {
  const deadline = Date.now() + seconds * 1000;
  const channel = ctx.keys.jobChanged(id);
  const unfollow = await feed.follow(channel);
  try {
    for (;;) {
      const left = deadline - Date.now();
      const woken = left > 0 && !signal?.aborted ? feed.next(channel, Math.min(left, 1_000), signal) : null;
      const job = await ctx.store.get(id);
      if (!job || isTerminal(job.status) || !woken) return job;
      await woken;
    }
  } finally {
    await unfollow();
  }
}
