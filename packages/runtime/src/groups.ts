import { GroupEvent, type GroupRecord, type GroupStatus, type StoredGroup, type StoredJob, StoredGroup as StoredGroupSchema, WebhookDelivery } from '@kiln/contracts';
import type { Job, Queue } from 'bullmq';
import type { Redis } from 'ioredis';
import type { Keys } from './keys.js';
import type { JobStore } from './job-store.js';
import { expiresAt, GROUP_PATHS } from './job-view.js';
import { LuaScript } from './scripts.js';
import type { Storage } from './storage.js';

/**
 * patch-group (KEYS: group, events, deliveries) — replaces a group's record with one the caller
 * derived from the record it read, if that is still the record (else returns 0: read again)
 * and the group has not ended (returns -1). A patch that ends the group (ttl > 0) marks it
 * ended, so it ends exactly once, and starts its retention.
 * ARGV: record read, new record, event JSON ('' = none), ttl s (0 = not an end).
 */
const PATCH_GROUP = new LuaScript('kilnPatchGroup', `
if redis.call('HEXISTS', KEYS[1], 'ended') == 1 then return -1 end
if redis.call('HGET', KEYS[1], 'record') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'record', ARGV[2])
if ARGV[3] ~= '' then redis.call('RPUSH', KEYS[2], ARGV[3]) end
local ttl = tonumber(ARGV[4])
if ttl > 0 then
  redis.call('HSET', KEYS[1], 'ended', '1')
  for k = 1, 3 do redis.call('EXPIRE', KEYS[k], ttl) end
end
return 1
`);

const ENDED: readonly GroupStatus[] = ['succeeded', 'failed', 'partially_succeeded', 'canceled'];

/**
 * Groups: a batch, a cache request or a self-test request, as one unit over many jobs. The group keeps its
 * children's ids, their number (`total`) and a counter of children that ended. The counter
 * moves in the same step as the child's end (JobStore's end-job), and the child that brings
 * it to the total also puts the group's announcement in the outbox; the drainer then
 * finishes the group (`finish`, once) and fires its webhook. So a group never waits forever
 * on a failed child, and no crash leaves it open.
 */
export class GroupStore {
  constructor(
    private readonly redis: Redis,
    private readonly keys: Keys,
    /** how long a record is kept after it ends (JOB_RETENTION_S) */
    readonly retentionS: number,
  ) {}

  async create(group: StoredGroup): Promise<void> {
    const created = Date.parse(group.created_at);
    const tx = this.redis
      .multi()
      .hset(this.keys.group(group.id), { record: JSON.stringify(group), done: '0', total: String(group.children.length) })
      .rpush(this.keys.groupEvents(group.id), JSON.stringify(groupEvent(group.status, 'submitted')));
    // the lists (GET /v1/batches): by tenant and kind, newest first
    for (const key of this.keys.recordIndexes('groups', group.client, group.kind)) tx.zadd(key, created, group.id);
    await tx.hset(this.keys.recordOwners('groups'), group.id, `${group.client} ${group.kind}`).exec();
  }

  async get(id: string): Promise<StoredGroup | null> {
    const raw = await this.redis.hget(this.keys.group(id), 'record');
    return raw ? StoredGroupSchema.parse(JSON.parse(raw)) : null;
  }

  async doneCount(id: string): Promise<number> {
    return Number((await this.redis.hget(this.keys.group(id), 'done')) ?? 0);
  }

  /** Ends the group with `status` unless it already ended; returns the group if this call ended it. */
  async finish(id: string, status: GroupStatus): Promise<StoredGroup | null> {
    return this.patch(id, { status, finished_at: new Date().toISOString() }, { event: groupEvent(status), end: true });
  }

  async markRunning(id: string): Promise<void> {
    await this.patch(id, { status: 'running' }, { from: 'queued', event: groupEvent('running') });
  }

  /** Flags the group canceled-on-request (unless it ended); returns the group as it now is. */
  async requestCancel(id: string): Promise<StoredGroup | null> {
    return (await this.patch(id, { cancel_requested: true })) ?? this.get(id);
  }

  /** Merges `fields` into the record (see PATCH_GROUP); the group as patched, or null if nothing changed. */
  private async patch(id: string, fields: Partial<StoredGroup>, opts: { from?: GroupStatus; event?: GroupEvent; end?: boolean } = {}): Promise<StoredGroup | null> {
    const k = this.keys;
    for (;;) {
      const raw = await this.redis.hget(k.group(id), 'record');
      if (!raw) return null;
      const group = StoredGroupSchema.parse(JSON.parse(raw));
      if (groupEnded(group) || (opts.from && group.status !== opts.from)) return null;
      const next = { ...group, ...fields };
      const res = await PATCH_GROUP.run<number>(
        this.redis,
        [k.group(id), k.groupEvents(id), k.groupDeliveries(id)],
        [raw, JSON.stringify(next), opts.event ? JSON.stringify(opts.event) : '', String(opts.end ? this.retentionS : 0)],
      );
      if (res === 1) {
        await this.redis.publish(k.groupChanged(id), '1'); // wakes its live followers (SSE)
        return next;
      }
      if (res === -1) return null;
    }
  }

  async addDelivery(id: string, d: WebhookDelivery): Promise<void> {
    await this.redis.rpush(this.keys.groupDeliveries(id), JSON.stringify(d));
  }

  async history(id: string): Promise<{ events: GroupEvent[]; deliveries: WebhookDelivery[] }> {
    const [events, deliveries] = await Promise.all([this.redis.lrange(this.keys.groupEvents(id), 0, -1), this.redis.lrange(this.keys.groupDeliveries(id), 0, -1)]);
    return { events: events.map((e) => GroupEvent.parse(JSON.parse(e))), deliveries: deliveries.map((d) => WebhookDelivery.parse(JSON.parse(d))) };
  }
}

/** Whether the group has ended (any final status). */
export const groupEnded = (group: StoredGroup) => ENDED.includes(group.status);

/** How a group ended, from its children: canceled on request, else by how many succeeded. */
export function groupOutcome(group: StoredGroup, children: (StoredJob | null)[]): GroupStatus {
  if (group.cancel_requested) return 'canceled';
  const ok = children.filter((c) => c?.status === 'succeeded').length;
  if (ok === children.length) return 'succeeded';
  return ok === 0 ? 'failed' : 'partially_succeeded';
}

function groupEvent(status: GroupStatus, message?: string): GroupEvent {
  return { at: new Date().toISOString(), status, message: message ?? status };
}

/** The group as clients see it: counts per state and each child's result. */
export async function groupRecord(group: StoredGroup, groups: GroupStore, jobs: JobStore, storage: Storage, publicUrl: string): Promise<GroupRecord> {
  const [children, { events, deliveries }] = await Promise.all([jobs.getMany(group.children), groups.history(group.id)]);
  const counts = { total: group.children.length, queued: 0, running: 0, succeeded: 0, failed: 0, canceled: 0 };
  for (const c of children) if (c) counts[c.status] += 1;
  const list = await Promise.all(
    children.map(async (c, index) => ({
      index,
      id: group.children[index]!,
      kind: c?.kind ?? 'generation',
      status: c?.status ?? 'failed',
      agent: c?.agent ?? null,
      outputs: c ? await Promise.all(c.outputs.map(async (o) => ({ ...o, url: await storage.presign(o.key) }))) : [],
      error: c?.error ?? (c ? null : { code: 'not_found' as const, message: 'the child record expired', retryable: false }),
    })),
  );
  const { children: _ids, ...rest } = group;
  return { ...rest, counts, children: list, events, webhook_deliveries: deliveries, expires_at: expiresAt(group.finished_at, groups.retentionS), links: groupLinks(group, publicUrl) };
}

/** A group's links: every one a route of the API (see GroupRecord's links for the method of each). */
export function groupLinks(group: StoredGroup, publicUrl: string): GroupRecord['links'] {
  const url = (path: string) => new URL(path, publicUrl).toString();
  if (group.kind !== 'batch') return { self: url(`${GROUP_PATHS[group.kind]}/${group.id}`), cancel: url(`${GROUP_PATHS[group.kind]}/${group.id}`) };
  const self = url(`/v1/batches/${group.id}`);
  return { self, cancel: self, events: url(`/v1/batches/${group.id}/events`), jobs: url(`/v1/jobs?batch=${group.id}`) };
}

export interface GroupTrackData {
  group_id: string;
  total: number;
}

/** Puts a new group on the `groups` queue, so Bull Board shows it until its children end. */
export async function trackGroup(queue: Queue<GroupTrackData>, group: StoredGroup): Promise<void> {
  // kept once ended as the queue's history allows (QUEUE_KEEP_*: createJobServices)
  await queue.add(group.kind, { group_id: group.id, total: group.children.length }, { jobId: group.id });
}

/**
 * The `groups` queue's processor (run by every dispatcher): holds the entry active with the
 * share of children that ended as its progress, and completes it — or fails it, for a group
 * that failed — when the group ends. Only a view: the group ends by its children either way.
 */
export function groupTracker(groups: GroupStore, pollMs = 1_000) {
  return async (entry: Job<GroupTrackData>): Promise<{ status: GroupStatus }> => {
    for (;;) {
      const group = await groups.get(entry.data.group_id);
      if (!group) throw new Error(`group ${entry.data.group_id} expired`);
      const ended = groupEnded(group);
      await entry.updateProgress(ended ? 100 : Math.floor((100 * (await groups.doneCount(group.id))) / Math.max(1, entry.data.total)));
      if (group.status === 'failed') throw new Error('every child failed');
      if (ended) return { status: group.status };
      await new Promise((r) => setTimeout(r, pollMs));
    }
  };
}
