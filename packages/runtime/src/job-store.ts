import {
  type CacheJob,
  type GenerationJob,
  JobEvent,
  type TrainingJob,
  type JobStatus,
  StoredJob,
  WebhookDelivery,
  isTerminal,
} from '@kiln/contracts';
import type { Redis } from 'ioredis';
import type { Keys } from './keys.js';

/**
 * Job records in Redis: one hash per job (each field JSON-encoded, so writers touching
 * different fields never clobber each other), plus append-only lists of lifecycle events
 * and webhook deliveries.
 *
 * Every write goes through one Lua script that checks a guard first — the statuses the job
 * may be in and, for agents, the attempt they hold — so a late write from a stale attempt
 * or after cancellation is refused instead of corrupting the record.
 */

const UPDATE_SCRIPT = `
local cur = redis.call('HMGET', KEYS[1], 'status', 'attempt')
if not cur[1] then return -1 end
local n = tonumber(ARGV[1])
local ok = (n == 0)
for i = 1, n do if cur[1] == ARGV[1 + i] then ok = true end end
if not ok then return 0 end
local i = n + 2
if ARGV[i] ~= '' and cur[2] ~= ARGV[i] then return 0 end
local event = ARGV[i + 1]
local ttl = tonumber(ARGV[i + 2])
for j = i + 4, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[j], ARGV[j + 1]) end
if event ~= '' then redis.call('RPUSH', KEYS[2], event) end
if ttl > 0 then
  redis.call('ZREM', KEYS[4], ARGV[i + 3])
  redis.call('EXPIRE', KEYS[1], ttl)
  redis.call('EXPIRE', KEYS[2], ttl)
  redis.call('EXPIRE', KEYS[3], ttl)
end
return 1
`;

export interface Guard {
  /** the update applies only while the job is in one of these statuses */
  status?: readonly JobStatus[];
  /** …and only while this is still the current attempt */
  attempt?: number;
}

export type JobPatch = Partial<Omit<GenerationJob, 'id' | 'kind' | 'created_at' | 'request' | 'client'>> &
  Partial<Pick<TrainingJob, 'training'>> &
  Partial<Pick<CacheJob, 'cache'>>;

export class JobStore {
  constructor(
    private readonly redis: Redis,
    private readonly keys: Keys,
    private readonly retentionS: number,
  ) {}

  async create(job: StoredJob): Promise<void> {
    const event = this.event(job, 'submitted');
    await this.redis
      .multi()
      .hset(this.keys.job(job.id), encode(job))
      .rpush(this.keys.jobEvents(job.id), JSON.stringify(event))
      .zadd(this.keys.activeJobs(), Date.parse(job.created_at), job.id)
      .exec();
  }

  /** Ids of every job not yet finished, oldest first. */
  async activeIds(limit = 10_000): Promise<string[]> {
    return this.redis.zrange(this.keys.activeJobs(), 0, limit - 1);
  }

  async get(id: string): Promise<StoredJob | null> {
    const raw = await this.redis.hgetall(this.keys.job(id));
    if (!raw.status) return null;
    return StoredJob.parse(decode(raw));
  }

  async getMany(ids: string[]): Promise<(StoredJob | null)[]> {
    const pipe = this.redis.pipeline();
    for (const id of ids) pipe.hgetall(this.keys.job(id));
    const res = (await pipe.exec()) ?? [];
    return res.map(([, raw]) => {
      const r = raw as Record<string, string>;
      return r?.status ? StoredJob.parse(decode(r)) : null;
    });
  }

  async history(id: string): Promise<{ events: JobEvent[]; deliveries: WebhookDelivery[] }> {
    const [events, deliveries] = await Promise.all([
      this.redis.lrange(this.keys.jobEvents(id), 0, -1),
      this.redis.lrange(this.keys.jobDeliveries(id), 0, -1),
    ]);
    return {
      events: events.map((e) => JobEvent.parse(JSON.parse(e))),
      deliveries: deliveries.map((d) => WebhookDelivery.parse(JSON.parse(d))),
    };
  }

  /**
   * Applies `patch` if `guard` holds; records a lifecycle event when status, stage, attempt
   * or agent change. Returns the updated job, or null when the guard refused the write.
   */
  async update(id: string, guard: Guard, patch: JobPatch, message?: string): Promise<StoredJob | null> {
    const before = await this.get(id);
    if (!before) return null;
    const after = { ...before, ...patch } as StoredJob;
    const changed =
      before.status !== after.status || before.stage !== after.stage || before.attempt !== after.attempt || before.agent !== after.agent;
    const event = changed || message ? JSON.stringify(this.event(after, message)) : '';
    const statuses = guard.status ?? [];
    const ttl = isTerminal(after.status) ? this.retentionS : 0;
    const fields = Object.entries(encode(patch)).flat();
    const res = (await this.redis.eval(
      UPDATE_SCRIPT,
      4,
      this.keys.job(id),
      this.keys.jobEvents(id),
      this.keys.jobDeliveries(id),
      this.keys.activeJobs(),
      String(statuses.length),
      ...statuses.map((s) => JSON.stringify(s)),
      guard.attempt === undefined ? '' : JSON.stringify(guard.attempt),
      event,
      String(ttl),
      id,
      ...fields,
    )) as number;
    if (res !== 1) return null;
    return this.get(id);
  }

  /**
   * The hot path for per-step progress: one guarded write, no event, no read back. Also
   * reports whether cancellation was requested, so an agent notices it even if it missed the
   * pub/sub message.
   */
  async setProgress(id: string, attempt: number, patch: Pick<JobPatch, 'progress' | 'stage' | 'training'>): Promise<{ ok: boolean; cancelRequested: boolean }> {
    const fields = Object.entries(encode(patch)).flat();
    const res = await this.redis
      .multi()
      .eval(
        UPDATE_SCRIPT,
        4,
        this.keys.job(id),
        this.keys.jobEvents(id),
        this.keys.jobDeliveries(id),
        this.keys.activeJobs(),
        '1',
        JSON.stringify('running'),
        JSON.stringify(attempt),
        '',
        '0',
        id,
        ...fields,
      )
      .hget(this.keys.job(id), 'cancel_requested')
      .exec();
    return { ok: res?.[0]?.[1] === 1, cancelRequested: res?.[1]?.[1] === 'true' };
  }

  async addDelivery(id: string, delivery: WebhookDelivery): Promise<void> {
    await this.redis.rpush(this.keys.jobDeliveries(id), JSON.stringify(delivery));
  }

  private event(job: StoredJob, message?: string): JobEvent {
    return {
      at: new Date().toISOString(),
      status: job.status,
      stage: job.stage,
      attempt: job.attempt,
      agent: job.agent,
      ...(message ? { message } : {}),
    };
  }
}

function encode(obj: object): Record<string, string> {
  const out: Record<string, string> = {};
  for (const [k, v] of Object.entries(obj)) if (v !== undefined) out[k] = JSON.stringify(v);
  return out;
}

function decode(raw: Record<string, string>): Record<string, unknown> {
  const out: Record<string, unknown> = {};
  for (const [k, v] of Object.entries(raw)) out[k] = JSON.parse(v);
  return out;
}
