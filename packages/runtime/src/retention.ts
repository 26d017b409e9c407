import type { Redis } from 'ioredis';
import type { Keys } from './keys.js';
import type { Logger } from './logger.js';
import { SingletonSweep } from './singleton-sweep.js';
import type { Storage } from './storage.js';

/**
 * Retention: a job's record expires JOB_RETENTION_S (or its kind's JOB_RETENTION_S_<KIND>) after
 * it ended (the end-job script sets the TTL), and with it must go what it stored — its outputs, its fetched inputs and a training's
 * checkpoints (a trained LoRA stays: it is registered and outlives its job). Redis says nothing
 * when a key expires, so a sweep walks the farm-wide lists (oldest first, a chunk per tick, a
 * cursor kept in Redis so any API instance picks up where another stopped) and, for each id
 * whose record is gone, deletes its objects, then drops it from every list. One API instance
 * sweeps at a time (a lease). Uploads are kept UPLOAD_RETENTION_S from their last request, then
 * deleted the same way.
 */
export class RetentionSweeper {
  private readonly loop: SingletonSweep;

  constructor(
    private readonly redis: Redis,
    private readonly keys: Keys,
    private readonly storage: Storage,
    private readonly log: Logger,
    private readonly opts: { intervalMs: number; chunk?: number },
  ) {
    this.loop = new SingletonSweep(redis, log, {
      name: 'retention sweep',
      leaseKey: keys.retentionLease(),
      intervalMs: opts.intervalMs,
      leaseTtlMs: Math.max(5_000, opts.intervalMs * 3),
      step: async () => (await this.sweep('jobs')) + (await this.sweep('groups')) + (await this.sweepUploads()),
    });
  }

  start(): void {
    this.loop.start();
  }

  close(): Promise<void> {
    return this.loop.close();
  }

  /** One step of the sweep, if this instance holds the lease: returns how many expired things it cleared. */
  tick(): Promise<number> {
    return this.loop.tick();
  }

  /** Uploads past their retention (POST /v1/uploads says when): the objects go, then their entries. */
  private async sweepUploads(): Promise<number> {
    const due = await this.redis.zrangebyscore(this.keys.uploads(), '-inf', Date.now(), 'LIMIT', 0, this.opts.chunk ?? 500);
    if (!due.length) return 0;
    await this.storage.remove(due);
    // an upload renewed meanwhile (asked for again) has a later score: keep its entry
    for (const key of due) await this.redis.eval("if tonumber(redis.call('ZSCORE', KEYS[1], ARGV[1]) or '0') <= tonumber(ARGV[2]) then return redis.call('ZREM', KEYS[1], ARGV[1]) end return 0", 1, this.keys.uploads(), key, String(Date.now()));
    this.log.info({ cleared: due.length }, 'expired uploads removed');
    return due.length;
  }

  private async sweep(family: 'jobs' | 'groups'): Promise<number> {
    const k = this.keys;
    const all = k.recordIndex(family, null, 'all');
    const chunk = this.opts.chunk ?? 500;
    const offset = Number((await this.redis.get(k.retentionCursor(family))) ?? 0);
    const ids = await this.redis.zrange(all, offset, offset + chunk - 1);
    const pipe = this.redis.pipeline();
    for (const id of ids) pipe.exists(family === 'jobs' ? k.job(id) : k.group(id));
    const exists = ((await pipe.exec()) ?? []).map(([, n]) => n === 1);
    const gone = ids.filter((_, i) => !exists[i]);
    for (const id of gone) {
      if (family === 'jobs') {
        // objects first: an id leaves the lists only once nothing of it is left behind
        for (const prefix of [`outputs/${id}/`, `inputs/${id}/`, `trainings/${id}/`]) {
          const objects = await this.storage.list(prefix);
          if (objects.length) await this.storage.remove(objects.map((o) => o.key));
        }
      }
      const owner = await this.redis.hget(k.recordOwners(family), id);
      const split = owner?.lastIndexOf(' ') ?? -1;
      const tx = this.redis.multi();
      if (owner && split > 0) for (const key of k.recordIndexes(family, owner.slice(0, split), owner.slice(split + 1))) tx.zrem(key, id);
      else tx.zrem(all, id);
      await tx.hdel(k.recordOwners(family), id).exec();
    }
    // removals shift later ranks down; at the end, start over
    const next = ids.length < chunk ? 0 : offset + ids.length - gone.length;
    await this.redis.set(k.retentionCursor(family), String(next));
    if (gone.length) this.log.info({ family, cleared: gone.length }, 'expired records and their objects removed');
    return gone.length;
  }
}
