import { KilnError } from '@kiln/runtime';
import type { Redis } from 'ioredis';

/**
 * Pages through a list of records, newest first. A list is a sorted set of ids scored by
 * creation time (written with the record, see Keys.recordIndex); a page is read from a cursor —
 * the score and id of the last entry looked at — so records added meanwhile never shift what
 * comes next, and ties (records created in the same millisecond) are ordered by id.
 *
 * Filters the index cannot answer (status, which changes) are applied to the records as they
 * are read; a page stops after `scanLimit` entries even if it found fewer than `limit`, and its
 * cursor still moves on, so a rare match costs several short pages, never an unbounded scan.
 * Entries whose record has expired are skipped (the retention sweep removes them).
 */

interface Entry {
  score: number;
  id: string;
}

const bad = (message: string) => new KilnError('validation_failed', `invalid request: cursor: ${message}`, { details: [{ field: 'cursor', rule: 'invalid_cursor', message }] });

export const cursorOf = (e: Entry) => Buffer.from(`${e.score}:${e.id}`).toString('base64url');

function parseCursor(cursor: string): Entry {
  const m = /^(\d{1,16}):([0-9a-f-]{36})$/.exec(Buffer.from(cursor, 'base64url').toString('utf8'));
  if (!m) throw bad('not a cursor this API issued; pass next_cursor from the previous page as it is');
  return { score: Number(m[1]), id: m[2]! };
}

/** Index entries from `from` (exclusive) downwards, between `after` and `before` (exclusive, ms). */
async function* walk(redis: Redis, key: string, from: Entry | null, before?: number, after?: number): AsyncGenerator<Entry> {
  let pos = from;
  let max = before === undefined ? '+inf' : `(${before}`;
  const min = after === undefined ? '-inf' : `(${after}`;
  for (;;) {
    if (pos) {
      // the rest of pos's millisecond: ties come in descending id order
      const same = (await redis.zrangebyscore(key, pos.score, pos.score)).filter((id) => id < pos!.id).sort().reverse();
      for (const id of same) yield { score: pos.score, id };
      max = `(${pos.score}`;
    }
    const raw = await redis.zrevrangebyscore(key, max, min, 'WITHSCORES', 'LIMIT', 0, 100);
    if (raw.length === 0) return;
    for (let i = 0; i < raw.length; i += 2) yield (pos = { id: raw[i]!, score: Number(raw[i + 1]) });
  }
}

export interface PageOptions<T> {
  cursor?: string;
  /** creation time bounds, ms, exclusive */
  before?: number;
  after?: number;
  limit: number;
  load: (ids: string[]) => Promise<(T | null)[]>;
  accept?: (record: T) => boolean;
  scanLimit?: number;
}

export async function pageIndex<T>(redis: Redis, key: string, o: PageOptions<T>): Promise<{ items: T[]; next_cursor: string | null }> {
  const it = walk(redis, key, o.cursor ? parseCursor(o.cursor) : null, o.before, o.after);
  const scanLimit = o.scanLimit ?? Math.max(500, o.limit * 10);
  const items: T[] = [];
  let scanned = 0;
  let last: Entry | null = null;
  for (;;) {
    const batch: Entry[] = [];
    while (batch.length < Math.min(50, scanLimit - scanned)) {
      const n = await it.next();
      if (n.done) break;
      batch.push(n.value);
    }
    if (batch.length === 0) return { items, next_cursor: null }; // the list is exhausted
    const records = await o.load(batch.map((e) => e.id));
    for (const [i, e] of batch.entries()) {
      last = e;
      scanned++;
      const r = records[i];
      if (r && (o.accept?.(r) ?? true)) items.push(r);
      if (items.length === o.limit) {
        const more = i < batch.length - 1 || !(await it.next()).done;
        return { items, next_cursor: more ? cursorOf(e) : null };
      }
    }
    if (scanned >= scanLimit) return { items, next_cursor: cursorOf(last!) };
  }
}

/** A page of an ordered list held in memory (a batch's children, in their order): the cursor is a position. */
export function pageArray<T>(all: T[], cursor: string | undefined, limit: number): { items: T[]; next_cursor: string | null } {
  let start = 0;
  if (cursor) {
    const m = /^i:(\d{1,6})$/.exec(Buffer.from(cursor, 'base64url').toString('utf8'));
    if (!m) throw bad('not a cursor this API issued; pass next_cursor from the previous page as it is');
    start = Number(m[1]);
  }
  const items = all.slice(start, start + limit);
  const end = start + items.length;
  return { items, next_cursor: end < all.length ? Buffer.from(`i:${end}`).toString('base64url') : null };
}
