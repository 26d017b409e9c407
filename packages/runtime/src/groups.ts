import { GroupEvent, type GroupRecord, type GroupStatus, type StoredGroup, type StoredJob, StoredGroup as StoredGroupSchema, WebhookDelivery } from '@kiln/contracts';
import type { Job, Queue } from 'bullmq';
import type { Redis } from 'ioredis';
import type { Keys } from './keys.js';
import type { JobStore } from './job-store.js';
import type { Storage } from './storage.js';

/**
 * Groups: a batch, or a cache request, as one unit over many jobs. The group keeps its
 * children's ids and a counter of children that ended; the child whose end brings the counter
 * to the total finalizes the group (exactly one does: HINCRBY is atomic), so a group never
 * waits forever on a failed child.
 */
export class GroupStore {
  constructor(
    private readonly redis: Redis,
    private readonly keys: Keys,
    private readonly retentionS: number,
  ) {}

  async create(group: StoredGroup): Promise<void> {
    await this.redis
      .multi()
      .hset(this.keys.group(group.id), { record: JSON.stringify(group), done: '0' })
      .rpush(this.keys.groupEvents(group.id), JSON.stringify(groupEvent(group.status, 'submitted')))
      .exec();
  }

  async get(id: string): Promise<StoredGroup | null> {
    const raw = await this.redis.hget(this.keys.group(id), 'record');
    return raw ? StoredGroupSchema.parse(JSON.parse(raw)) : null;
  }

  async doneCount(id: string): Promise<number> {
    return Number((await this.redis.hget(this.keys.group(id), 'done')) ?? 0);
  }

  /** Counts one more ended child; returns true for the child that ended the group. */
  async childEnded(id: string, total: number): Promise<boolean> {
    return (await this.redis.hincrby(this.keys.group(id), 'done', 1)) === total;
  }

  /** Sets the group's status unless it already ended; returns the group if it changed. */
  async finish(id: string, status: GroupStatus): Promise<StoredGroup | null> {
    const group = await this.get(id);
    if (!group || ['succeeded', 'failed', 'partially_succeeded', 'canceled'].includes(group.status)) return null;
    const done = { ...group, status, finished_at: new Date().toISOString() };
    await this.redis
      .multi()
      .hset(this.keys.group(id), 'record', JSON.stringify(done))
      .rpush(this.keys.groupEvents(id), JSON.stringify(groupEvent(status)))
      .expire(this.keys.group(id), this.retentionS)
      .expire(this.keys.groupEvents(id), this.retentionS)
      .expire(this.keys.groupDeliveries(id), this.retentionS)
      .exec();
    return done;
  }

  async markRunning(id: string): Promise<void> {
    const group = await this.get(id);
    if (group?.status !== 'queued') return;
    await this.redis.hset(this.keys.group(id), 'record', JSON.stringify({ ...group, status: 'running' }));
    await this.redis.rpush(this.keys.groupEvents(id), JSON.stringify(groupEvent('running')));
  }

  async requestCancel(id: string): Promise<StoredGroup | null> {
    const group = await this.get(id);
    if (!group) return null;
    const next = { ...group, cancel_requested: true };
    await this.redis.hset(this.keys.group(id), 'record', JSON.stringify(next));
    return next;
  }

  async addDelivery(id: string, d: WebhookDelivery): Promise<void> {
    await this.redis.rpush(this.keys.groupDeliveries(id), JSON.stringify(d));
  }

  async history(id: string): Promise<{ events: GroupEvent[]; deliveries: WebhookDelivery[] }> {
    const [events, deliveries] = await Promise.all([this.redis.lrange(this.keys.groupEvents(id), 0, -1), this.redis.lrange(this.keys.groupDeliveries(id), 0, -1)]);
    return { events: events.map((e) => GroupEvent.parse(JSON.parse(e))), deliveries: deliveries.map((d) => WebhookDelivery.parse(JSON.parse(d))) };
  }
}

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
export async function groupRecord(group: StoredGroup, groups: GroupStore, jobs: JobStore, storage: Storage, publicUrl: string, path: string): Promise<GroupRecord> {
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
  const self = new URL(`${path}/${group.id}`, publicUrl).toString();
  const { children: _ids, ...rest } = group;
  return { ...rest, counts, children: list, events, webhook_deliveries: deliveries, links: { self, cancel: self } };
}

export interface GroupTrackData {
  group_id: string;
  total: number;
}

/** Puts a new group on the `groups` queue, so Bull Board shows it until its children end. */
export async function trackGroup(queue: Queue<GroupTrackData>, group: StoredGroup): Promise<void> {
  await queue.add(group.kind, { group_id: group.id, total: group.children.length }, { jobId: group.id, removeOnComplete: { age: 7 * 24 * 3600 }, removeOnFail: { age: 7 * 24 * 3600 } });
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
      const ended = ['succeeded', 'partially_succeeded', 'canceled', 'failed'].includes(group.status);
      await entry.updateProgress(ended ? 100 : Math.floor((100 * (await groups.doneCount(group.id))) / Math.max(1, entry.data.total)));
      if (group.status === 'failed') throw new Error('every child failed');
      if (ended) return { status: group.status };
      await new Promise((r) => setTimeout(r, pollMs));
    }
  };
}
