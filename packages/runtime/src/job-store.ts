import {
  type CacheJob,
  type GenerationJob,
  JobEvent,
  type PreviewEvent,
  type SelfTestJob,
  type TrainingJob,
  type JobStatus,
  StoredJob,
  WebhookDelivery,
  isTerminal,
} from '@kiln/contracts';
import type { Redis } from 'ioredis';
import type { Keys } from './keys.js';
import { lifecycle } from './lifecycle.js';
import { publishPreview } from './previews.js';
import { LuaScript } from './scripts.js';
import { currentTraceparent } from './tracing.js';

/**
 * Job records in Redis: one hash per job (each field JSON-encoded, so writers touching
 * different fields never clobber each other), plus append-only lists of lifecycle events
 * and webhook deliveries.
 *
 * Every write goes through a Lua script that checks a guard first — the statuses the job
 * may be in and, for agents, the attempt they hold — so a late write from a stale attempt
 * or after cancellation is refused instead of corrupting the record. One script per
 * transition (update-job, end-job); `scriptKeys` is the one place their keys are assembled.
 */

// The guard every job script opens with: the job exists (-1 if not), is in one of the
// allowed statuses and still on the expected attempt (0 if not). Sets `i` to the first
// argument after the guard.
const GUARD = `
local cur = redis.call('HMGET', KEYS[1], 'status', 'attempt', 'stage', 'agent')
if not cur[1] then return -1 end
local n = tonumber(ARGV[1])
local ok = (n == 0)
for i = 1, n do if cur[1] == ARGV[1 + i] then ok = true end end
if not ok then return 0 end
local i = n + 2
if ARGV[i] ~= '' and cur[2] ~= ARGV[i] then return 0 end
`;

// Sets the fields (ARGV from `first` on, field/value pairs) in one HSET and, when `at` is given,
// appends a lifecycle event if status, stage, attempt or agent changed or there is a message —
// built from the guard's read and the fields written, so neither the caller nor the script reads
// the record again. Values in the hash are JSON, so the event is their concatenation.
const WRITE = `
local TRACKED = { status = 1, attempt = 2, stage = 3, agent = 4 }
local function write(first, at, message)
  if #ARGV >= first then redis.call('HSET', KEYS[1], unpack(ARGV, first, #ARGV)) end
  if at == '' then return end
  local now = { cur[1], cur[2], cur[3], cur[4] }
  for j = first, #ARGV, 2 do
    local k = TRACKED[ARGV[j]]
    if k then now[k] = ARGV[j + 1] end
  end
  local changed = false
  for k = 1, 4 do if now[k] ~= cur[k] then changed = true end end
  if not changed and message == '' then return end
  local ev = '{"at":' .. at .. ',"status":' .. now[1] .. ',"stage":' .. (now[3] or 'null') .. ',"attempt":' .. (now[2] or 'null') .. ',"agent":' .. (now[4] or 'null')
  if message ~= '' then ev = ev .. ',"message":' .. message end
  redis.call('RPUSH', KEYS[2], ev .. '}')
end
`;

// Wakes whoever follows the job (and its group) live (SSE) from inside the script, so a write is
// one command: PUBLISH on the job's channel, and on its group's (the record's group_id, read from
// the record the script replies with) unless the group channel prefix is ''.
const NOTIFY = `
local function notify(rec, job_channel, group_channel_prefix)
  redis.call('PUBLISH', job_channel, '1')
  if group_channel_prefix == '' then return end
  for j = 1, #rec, 2 do
    if rec[j] == 'group_id' then
      if rec[j + 1] ~= 'null' then redis.call('PUBLISH', group_channel_prefix .. cjson.decode(rec[j + 1]), '1') end
      return
    end
  end
end
`;

// A succeeded job's history, compacted as it ends (END_JOB, before its TTL is set): of its last
// attempt, the events that changed neither the status nor the attempt and say nothing the record
// does not keep are blanked — its start ("attempt <n> started on <agent>": started_at,
// timings.queued_ms and the placement event say when and where) and any event without a message
// (a bare stage step). Everything else stays: the first and the last event, every change of
// status or attempt (placements, hand-backs, retries, the end), every event of an earlier
// attempt, and every other message (stage reports — which stages ran, how many steps, when —,
// a training's resumption, a cancellation asked too late). A blanked event stays in the list as ''
// so that every event keeps its position: positions are the events' numbers (`seq`), the ids of
// the SSE state events that Last-Event-ID resumes after. Rewritten (DEL, RPUSH) rather than LSET
// in place, so the list is allocated to its new size.
const COMPACT = `
local function compact(final)
  local evs = redis.call('LRANGE', KEYS[2], 0, -1)
  local prev, blanked = nil, false
  for k, e in ipairs(evs) do
    local ok, ev = pcall(cjson.decode, e)
    if ok and type(ev) == 'table' then
      local routine = type(ev.message) ~= 'string' or string.match(ev.message, '^attempt %d+ started on ') ~= nil
      if prev and k < #evs and routine and ev.attempt == final and ev.status == prev.status and ev.attempt == prev.attempt then
        evs[k] = ''
        blanked = true
      end
      prev = ev
    end
  end
  if not blanked then return end
  redis.call('DEL', KEYS[2])
  for k = 1, #evs, 1000 do redis.call('RPUSH', KEYS[2], unpack(evs, k, math.min(k + 999, #evs))) end
end
`;

const TERMINAL = `cur[1] == '"succeeded"' or cur[1] == '"failed"' or cur[1] == '"canceled"'`;

/**
 * update-job (KEYS: job, events) — a guarded write that does not end the job: sets the fields,
 * appends the lifecycle event if any. A job that ended takes no write that leaves its status as
 * it is (a late write after the end). Replies with the record as written (`reply` 'record'),
 * with {1, cancel_requested} ('cancel': the progress path), or 1.
 * ARGV: guard…, at (JSON; '' = no event), message (JSON or ''), reply, job channel, group channel
 * prefix, field, value, …
 */
const UPDATE_JOB = new LuaScript('kilnUpdateJob', `${GUARD}${WRITE}${NOTIFY}
local sets_status = false
for j = i + 4, #ARGV, 2 do if ARGV[j] == 'status' then sets_status = true end end
if not sets_status and (${TERMINAL}) then return 0 end
write(i + 6, ARGV[i + 1], ARGV[i + 2])
if ARGV[i + 3] == 'record' then
  local rec = redis.call('HGETALL', KEYS[1])
  notify(rec, ARGV[i + 4], ARGV[i + 5])
  return rec
end
notify({}, ARGV[i + 4], '')
if ARGV[i + 3] == 'cancel' then return {1, redis.call('HGET', KEYS[1], 'cancel_requested') or ''} end
return 1
`);

/**
 * claim-job (KEYS: job, events, intake prioritized, intake wait, intake entry, its logs) — the
 * dispatcher's claim of a queued job for an agent and the removal of its intake entry, as one
 * step: sets the fields, appends the event, takes the entry out of intake (Kiln's intake has no
 * worker, so an entry is only ever waiting or prioritized: BullMQ's general removal checks every
 * state, lock and parent, about 17 commands, for nothing). Replies with what the dispatcher does
 * not already know — the attempt and the group as written — not the whole record: the
 * dispatcher read the placement fields when the job entered its view, and a 2–3 KB reply
 * decoded and validated per placement was most of a placement's cost.
 * ARGV: guard…, at (JSON), message (JSON or ''), entry id, job channel, group channel prefix, field, value, …
 */
const CLAIM_JOB = new LuaScript('kilnClaimJob', `${GUARD}${WRITE}${NOTIFY}
write(i + 6, ARGV[i + 1], ARGV[i + 2])
redis.call('ZREM', KEYS[3], ARGV[i + 3])
redis.call('LREM', KEYS[4], 0, ARGV[i + 3])
redis.call('DEL', KEYS[5], KEYS[6])
local rec = redis.call('HMGET', KEYS[1], 'attempt', 'group_id')
notify({'group_id', rec[2] or 'null'}, ARGV[i + 4], ARGV[i + 5])
return rec
`);

/**
 * end-job (KEYS: job, events, deliveries, active, outbox) — the job's terminal transition, its
 * announcement and its group's count as one step, so no crash between them can lose a
 * `completed` webhook or leave a batch open: sets the fields, appends the event, compacts a
 * succeeded job's events (COMPACT), starts retention (the TTL for the record's kind: ttls is
 * JSON, kind → seconds, '*' for any other), and puts `job:<id>` (when its webhook listens for `completed`) and, for the child
 * that ends its group, `group:<id>` in the outbox a drainer empties (WebhookOutbox). The
 * webhook and the group come from the record itself (both fixed at submission); the group's key
 * is the group key prefix and its id. A job ends once: a second end is refused like a failed
 * guard. Returns the record as written.
 * ARGV: guard…, at (JSON), message (JSON or ''), ttls (JSON), job id, group key prefix, job channel,
 * group channel prefix, field, value, …
 */
const END_JOB = new LuaScript('kilnEndJob', `${GUARD}${WRITE}${NOTIFY}${COMPACT}
if ${TERMINAL} then return 0 end
local ttls, id, group_prefix = cjson.decode(ARGV[i + 3]), ARGV[i + 4], ARGV[i + 5]
write(i + 8, ARGV[i + 1], ARGV[i + 2])
local meta = redis.call('HMGET', KEYS[1], 'request', 'group_id', 'kind', 'status', 'attempt')
if meta[4] == '"succeeded"' then compact(tonumber(meta[5])) end
redis.call('ZREM', KEYS[4], id)
local okk, kind = pcall(cjson.decode, meta[3] or 'null')
local ttl = tonumber((okk and ttls[kind]) or ttls['*'])
for k = 1, 3 do redis.call('EXPIRE', KEYS[k], ttl) end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local announce = false
local ok, req = pcall(cjson.decode, meta[1] or 'null')
if ok and type(req) == 'table' and type(req.webhook) == 'table' and type(req.webhook.events) == 'table' then
  for _, e in ipairs(req.webhook.events) do if e == 'completed' then announce = true end end
end
if announce then redis.call('ZADD', KEYS[5], now, 'job:' .. id) end
local gid = meta[2]
if gid and gid ~= 'null' then
  gid = cjson.decode(gid)
  local gkey = group_prefix .. gid
  if redis.call('EXISTS', gkey) == 1 then
    local done = redis.call('HINCRBY', gkey, 'done', 1)
    local total = tonumber(redis.call('HGET', gkey, 'total') or '')
    if not total then
      local rec = redis.call('HGET', gkey, 'record')
      total = rec and #cjson.decode(rec).children or -1
    end
    if done == total then redis.call('ZADD', KEYS[5], now, 'group:' .. gid) end
  end
end
local rec = redis.call('HGETALL', KEYS[1])
notify(rec, ARGV[i + 6], ARGV[i + 7])
return rec
`);

/**
 * claim-announcements (KEYS: outbox) — hands a drainer the announcements due now (or those
 * of `members` that are due), hiding each for the lease: a drainer that dies mid-way leaves
 * it to the next one once the lease runs out, and two drainers never work on one at a time.
 * ARGV: lease ms, limit, member…
 */
const CLAIM_ANNOUNCEMENTS = new LuaScript('kilnClaimAnnouncements', `
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local due = {}
if #ARGV > 2 then
  for k = 3, #ARGV do
    local s = redis.call('ZSCORE', KEYS[1], ARGV[k])
    if s and tonumber(s) <= now then table.insert(due, ARGV[k]) end
  end
else
  due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[2]))
end
for _, m in ipairs(due) do redis.call('ZADD', KEYS[1], 'XX', now + tonumber(ARGV[1]), m) end
return due
`);

/** Outbox members: the announcement of a job's end, or of a group's (its last child ended). */
export const announcement = {
  job: (id: string) => `job:${id}`,
  group: (id: string) => `group:${id}`,
  parse: (member: string): { kind: 'job' | 'group'; id: string } | null => {
    const m = /^(job|group):(.+)$/.exec(member);
    return m ? { kind: m[1] as 'job' | 'group', id: m[2]! } : null;
  },
};

export interface Guard {
  /** the update applies only while the job is in one of these statuses */
  status?: readonly JobStatus[];
  /** …and only while this is still the current attempt */
  attempt?: number;
}

export type JobPatch = Partial<Omit<GenerationJob, 'id' | 'kind' | 'created_at' | 'request' | 'client'>> &
  Partial<Pick<TrainingJob, 'training'>> &
  Partial<Pick<CacheJob, 'cache'>> &
  Partial<Pick<SelfTestJob, 'self_test'>>;

/** Where a job stands (JobStore.standings). */
export interface JobStanding {
  id: string;
  status: JobStatus;
  attempt: number;
  agent: string | null;
}

/** A claim of a queued job (its attempt as read) for an agent, and its intake entry. */
export interface Claim {
  id: string;
  attempt: number;
  agent: string;
  /** the event's message */
  message: string;
  intake: { entryId: string; key: (name: string) => string };
}

/** What a claim wrote that the claimer did not know. */
export interface Claimed {
  attempt: number;
  group_id: string | null;
}

export class JobStore {
  private readonly ttls: string;

  constructor(
    private readonly redis: Redis,
    private readonly keys: Keys,
    /** how long a record is kept after it ends (JOB_RETENTION_S) */
    readonly retentionS: number,
    /** …for the kinds that have their own (JOB_RETENTION_S_<KIND>) */
    readonly retentionByKind: Partial<Record<StoredJob['kind'], number>> = {},
  ) {
    this.ttls = JSON.stringify({ '*': retentionS, ...retentionByKind });
  }

  /** How long a record of this kind is kept after it ends (s). */
  retentionFor(kind: StoredJob['kind']): number {
    return this.retentionByKind[kind] ?? this.retentionS;
  }

  /** Writes a new job's record and its first event (which it returns), and lists it. */
  async create(job: StoredJob): Promise<JobEvent> {
    const event = this.event(job, 'submitted');
    const created = Date.parse(job.created_at);
    const tx = this.redis
      .multi()
      // the API request's trace (when tracing): every later span of the job continues it
      .hset(this.keys.job(job.id), { ...encode(job), ...traceField() })
      .rpush(this.keys.jobEvents(job.id), JSON.stringify(event))
      .zadd(this.keys.activeJobs(), created, job.id);
    // the lists (GET /v1/jobs, /v1/trainings): by tenant and kind, newest first
    for (const key of this.keys.recordIndexes('jobs', job.client, job.kind)) tx.zadd(key, created, job.id);
    await tx.hset(this.keys.recordOwners('jobs'), job.id, `${job.client} ${job.kind}`).exec();
    lifecycle.submitted(job);
    return { ...event, seq: 1 };
  }

  /** The W3C traceparent the job's spans continue (tracing.ts), if it was created in a traced request. */
  async traceOf(id: string): Promise<string | null> {
    const raw = await this.redis.hget(this.keys.job(id), 'trace');
    return raw ? (JSON.parse(raw) as string) : null;
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

  /** Records that `retryId` retries `id` (its record links to it), for as long as `id` is kept. */
  async addRetry(id: string, retryId: string): Promise<void> {
    const ttl = await this.redis.pttl(this.keys.job(id));
    const tx = this.redis.multi().rpush(this.keys.jobRetries(id), retryId);
    if (ttl > 0) tx.pexpire(this.keys.jobRetries(id), ttl);
    await tx.exec();
  }

  /** The jobs that retry this one, oldest first. */
  async retriesOf(id: string): Promise<string[]> {
    return this.redis.lrange(this.keys.jobRetries(id), 0, -1);
  }

  /**
   * Where each job stands — status, attempt, agent — and nothing else (null: no such job, or its
   * record expired), in one round trip: what a walk over every unfinished job needs, without
   * reading and validating each whole record.
   */
  async standings(ids: string[]): Promise<(JobStanding | null)[]> {
    const pipe = this.redis.pipeline();
    for (const id of ids) pipe.hmget(this.keys.job(id), 'status', 'attempt', 'agent');
    return ((await pipe.exec()) ?? []).map(([, raw], i) => {
      const [status, attempt, agent] = (raw ?? []) as (string | null)[];
      if (!status) return null;
      return { id: ids[i]!, status: JSON.parse(status) as JobStatus, attempt: Number(attempt ?? 0), agent: agent ? (JSON.parse(agent) as string | null) : null };
    });
  }

  /** Just the status of each job (null: no such job, or its record expired), in one round trip. */
  async statuses(ids: string[]): Promise<(JobStatus | null)[]> {
    const pipe = this.redis.pipeline();
    for (const id of ids) pipe.hget(this.keys.job(id), 'status');
    return ((await pipe.exec()) ?? []).map(([, raw]) => (typeof raw === 'string' ? (JSON.parse(raw) as JobStatus) : null));
  }

  /**
   * The job's events after the `after`-th (its `seq`), those blanked by compaction left out: what
   * a follower who has seen up to `after` has not. Events never move (see COMPACT), so this is
   * one LRANGE from there.
   */
  async eventsAfter(id: string, after: number): Promise<JobEvent[]> {
    return parseEvents(await this.redis.lrange(this.keys.jobEvents(id), after, -1), after);
  }

  async history(id: string): Promise<{ events: JobEvent[]; deliveries: WebhookDelivery[] }> {
    const [events, deliveries] = await Promise.all([
      this.redis.lrange(this.keys.jobEvents(id), 0, -1),
      this.redis.lrange(this.keys.jobDeliveries(id), 0, -1),
    ]);
    return {
      events: parseEvents(events, 0),
      deliveries: deliveries.map((d) => WebhookDelivery.parse(JSON.parse(d))),
    };
  }

  /**
   * Applies `patch` if `guard` holds; records a lifecycle event when status, stage, attempt
   * or agent change. A patch into a terminal status is the job's end (end-job): it also
   * announces the end in the outbox and counts it on the job's group, in the same step.
   * Returns the updated job, or null when the guard refused the write.
   */
  async update(id: string, guard: Guard, patch: JobPatch, message?: string): Promise<StoredJob | null> {
    const fields = Object.entries(encode(patch)).flat();
    const at = JSON.stringify(new Date().toISOString());
    const said = message ? JSON.stringify(message) : '';
    const res = patch.status && isTerminal(patch.status)
      ? await END_JOB.run(this.redis, this.scriptKeys('end', id), [...this.guardArgs(guard), at, said, this.ttls, id, this.keys.group(''), ...this.channels(id), ...fields])
      : await UPDATE_JOB.run(this.redis, this.scriptKeys('update', id), [...this.guardArgs(guard), at, said, 'record', ...this.channels(id), ...fields]);
    if (!Array.isArray(res)) return null;
    return StoredJob.parse(decode(pairs(res as string[])));
  }

  /**
   * The dispatcher's claim: a queued job on `attempt` becomes running on `agent` (attempt + 1)
   * and leaves intake (`intakeKey` makes a key of the intake queue) in the same step. Returns
   * the record as written, or null when the guard refused (the job moved on; its entry stays).
   */
  /**
   * Claims queued jobs for agents (CLAIM_JOB), all in one round trip, in the order given (the
   * order each agent runs them): for each, the claimed attempt and group, or null where the
   * guard refused it (the job was canceled or moved on since it was read).
   */
  async claimMany(claims: readonly Claim[]): Promise<(Claimed | null)[]> {
    if (claims.length === 0) return [];
    CLAIM_JOB.define(this.redis);
    const pipe = this.redis.pipeline();
    const at = JSON.stringify(new Date().toISOString());
    for (const c of claims) {
      const fields = Object.entries(encode({ status: 'running', stage: 'dispatched', agent: c.agent, attempt: c.attempt + 1 })).flat();
      const keys = [this.keys.job(c.id), this.keys.jobEvents(c.id), c.intake.key('prioritized'), c.intake.key('wait'), c.intake.key(c.intake.entryId), c.intake.key(`${c.intake.entryId}:logs`)];
      CLAIM_JOB.queue(pipe, keys, [...this.guardArgs({ status: ['queued'], attempt: c.attempt }), at, JSON.stringify(c.message), c.intake.entryId, ...this.channels(c.id), ...fields]);
    }
    const results = (await pipe.exec()) ?? [];
    return results.map(([err, res]) => {
      if (err) throw err;
      if (!Array.isArray(res)) return null;
      const [attempt, group] = res as (string | null)[];
      return { attempt: JSON.parse(attempt ?? 'null') as number, group_id: JSON.parse(group ?? 'null') as string | null };
    });
  }

  /** One claim (see claimMany). */
  async claim(id: string, attempt: number, agent: string, message: string, intake: Claim['intake']): Promise<Claimed | null> {
    return (await this.claimMany([{ id, attempt, agent, message, intake }]))[0]!;
  }

  /**
   * The pub/sub channels a write wakes (NOTIFY): the job's, and the prefix of its group's. A
   * hint only: live followers (SSE) re-read the record.
   */
  private channels(id: string): [string, string] {
    return [this.keys.jobChanged(id), this.keys.groupChanged('')];
  }

  /** A live preview to whoever follows the job (and its group), beside the record, never in it (previews.ts). */
  async preview(p: PreviewEvent, groupId: string | null): Promise<void> {
    await publishPreview(this.redis, this.keys, p, groupId);
  }

  /**
   * The hot path for per-step progress: one guarded write, no event, no read back. Also
   * reports whether cancellation was requested, so an agent notices it even if it missed the
   * pub/sub message.
   */
  async setProgress(id: string, attempt: number, patch: Pick<JobPatch, 'progress' | 'stage' | 'training'>): Promise<{ ok: boolean; cancelRequested: boolean }> {
    const fields = Object.entries(encode(patch)).flat();
    // one script call, not a MULTI: a script inside MULTI cannot be reloaded if Redis lost it
    const res = await UPDATE_JOB.run(this.redis, this.scriptKeys('update', id), [...this.guardArgs({ status: ['running'], attempt }), '', '', 'cancel', ...this.channels(id), ...fields]);
    const reply = Array.isArray(res) ? (res as [number, string]) : null;
    return { ok: reply !== null, cancelRequested: reply?.[1] === 'true' };
  }

  /**
   * Claims announcements for a drainer (see CLAIM_ANNOUNCEMENTS): the given members if they
   * are due, else up to `limit` of those due. Each is hidden for `leaseMs` until `announced`.
   */
  async claimAnnouncements(leaseMs: number, members: string[] = [], limit = 100): Promise<string[]> {
    if (members.length === 0 && limit <= 0) return [];
    return CLAIM_ANNOUNCEMENTS.run<string[]>(this.redis, [this.keys.outbox()], [String(leaseMs), String(limit), ...members]);
  }

  /** The announcement was made (its webhook queued, its group finished): drop it from the outbox. */
  async announced(member: string): Promise<void> {
    await this.redis.zrem(this.keys.outbox(), member);
  }

  /** How many announcements wait in the outbox (due or claimed). */
  async pendingAnnouncements(): Promise<number> {
    return this.redis.zcard(this.keys.outbox());
  }

  /** The keys each job script touches, in its KEYS order: the one place they are assembled. */
  private scriptKeys(script: 'update' | 'end', id: string): string[] {
    const k = this.keys;
    if (script === 'update') return [k.job(id), k.jobEvents(id)];
    // the group's key (group key prefix + the record's group_id) is made in the script: see END_JOB
    return [k.job(id), k.jobEvents(id), k.jobDeliveries(id), k.activeJobs(), k.outbox()];
  }

  private guardArgs(guard: Guard): string[] {
    const statuses = guard.status ?? [];
    return [String(statuses.length), ...statuses.map((s) => JSON.stringify(s)), guard.attempt === undefined ? '' : JSON.stringify(guard.attempt)];
  }

  async addDelivery(id: string, delivery: WebhookDelivery): Promise<void> {
    await this.redis.rpush(this.keys.jobDeliveries(id), JSON.stringify(delivery));
  }

  private event(job: StoredJob, message?: string): Omit<JobEvent, 'seq'> {
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

/**
 * Stored events (LRANGE from position `from`) as JobEvents: each numbered by its position (`seq`,
 * from 1), the blanked ones ('', see COMPACT) left out. The number is not stored: an event never
 * moves, so its position is its number.
 */
function parseEvents(raw: string[], from: number): JobEvent[] {
  const out: JobEvent[] = [];
  for (const [i, e] of raw.entries()) if (e !== '') out.push(JobEvent.parse({ ...JSON.parse(e), seq: from + i + 1 }));
  return out;
}

function traceField(): Record<string, string> {
  const tp = currentTraceparent();
  return tp ? { trace: JSON.stringify(tp) } : {};
}

function encode(obj: object): Record<string, string> {
  const out: Record<string, string> = {};
  for (const [k, v] of Object.entries(obj)) if (v !== undefined) out[k] = JSON.stringify(v);
  return out;
}

/** HGETALL's reply as a script returns it (field, value, …) as an object. */
function pairs(flat: string[]): Record<string, string> {
  const out: Record<string, string> = {};
  for (let i = 0; i < flat.length; i += 2) out[flat[i]!] = flat[i + 1]!;
  return out;
}

function decode(raw: Record<string, string>): Record<string, unknown> {
  const out: Record<string, unknown> = {};
  for (const [k, v] of Object.entries(raw)) out[k] = JSON.parse(v);
  return out;
}
