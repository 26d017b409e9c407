/**
 * Every Redis key and BullMQ queue name Kiln uses, in one place. The prefix isolates farms
 * (and tests) sharing a Redis; wrap it in braces (`{kiln}`) for Redis Cluster.
 */
export class Keys {
  constructor(readonly prefix: string) {}
  job = (id: string) => `${this.prefix}:job:${id}`;
  jobEvents = (id: string) => `${this.prefix}:job:${id}:events`;
  jobDeliveries = (id: string) => `${this.prefix}:job:${id}:deliveries`;
  /** list of the jobs that retry this one (POST /v1/jobs/:id/retry), kept as long as the job */
  jobRetries = (id: string) => `${this.prefix}:job:${id}:retries`;
  /** sorted set of unfinished job ids, scored by creation time */
  activeJobs = () => `${this.prefix}:jobs:active`;
  /** sorted set of ends not yet announced (`job:<id>`, `group:<id>`), scored by when a drainer may take each */
  outbox = () => `${this.prefix}:outbox`;
  group = (id: string) => `${this.prefix}:group:${id}`;
  groupEvents = (id: string) => `${this.prefix}:group:${id}:events`;
  groupDeliveries = (id: string) => `${this.prefix}:group:${id}:deliveries`;
  /** hash: LoRA name → where a trained LoRA lives in S3 */
  loras = () => `${this.prefix}:loras`;
  agents = () => `${this.prefix}:agents`;
  /** set of agent ids an operator took out of rotation (drain); kept across their restarts until resumed */
  agentsMaintenance = () => `${this.prefix}:agents:maintenance`;
  agent = (agentId: string) => `${this.prefix}:agent:${agentId}`;
  dispatcherLease = () => `${this.prefix}:dispatcher:lease`;
  idempotency = (tenant: string, key: string) => `${this.prefix}:idem:${tenant}:${key}`;
  /** sorted set of a tenant's job ids, for its queued-jobs quota (ended ones pruned lazily) */
  tenantJobs = (tenant: string) => `${this.prefix}:tenant:${tenant}:jobs`;
  /**
   * Sorted sets of record ids (`jobs` or `groups`) by creation time (ms), for lists: one per
   * tenant and kind, one per tenant for every kind (`all`), and the same for the whole farm
   * (tenant null, what an admin lists).
   */
  recordIndex = (family: 'jobs' | 'groups', tenant: string | null, kind: string) =>
    tenant === null ? `${this.prefix}:index:${family}:farm:${kind}` : `${this.prefix}:index:${family}:tenant:${tenant}:${kind}`;
  /** Every index a new record of this tenant and kind goes into. */
  recordIndexes = (family: 'jobs' | 'groups', tenant: string, kind: string) => [
    this.recordIndex(family, tenant, kind),
    this.recordIndex(family, tenant, 'all'),
    this.recordIndex(family, null, kind),
    this.recordIndex(family, null, 'all'),
  ];
  /** hash: record id → "<tenant> <kind>", so the retention sweep can drop an expired id from each index */
  recordOwners = (family: 'jobs' | 'groups') => `${this.prefix}:index:${family}:owners`;
  /** sorted set of job ids with a deadline (Cancel-After), scored by it (ms) */
  deadlines = () => `${this.prefix}:deadlines`;
  deadlineLease = () => `${this.prefix}:deadlines:lease`;
  /** sorted set of uploaded object keys, scored by when the retention sweep deletes them */
  uploads = () => `${this.prefix}:uploads`;
  /** the retention sweep's lease (one API at a time) and where its walk through the indexes stands */
  retentionLease = () => `${this.prefix}:retention:lease`;
  retentionCursor = (family: 'jobs' | 'groups') => `${this.prefix}:retention:cursor:${family}`;
  /** @fastify/rate-limit's keys */
  rateLimit = () => `${this.prefix}:ratelimit:`;
  /** pub/sub: a job was submitted or an agent freed a slot — placement should look now. */
  wakeChannel = () => `${this.prefix}:wake`;
  /** pub/sub, per job and per group: it changed (state, stage, progress) — wakes its live followers (SSE). */
  jobChanged = (id: string) => `${this.prefix}:changed:job:${id}`;
  groupChanged = (id: string) => `${this.prefix}:changed:group:${id}`;
  /** pub/sub, per job and per group: live previews (the image itself, never stored on the record) */
  jobPreviews = (id: string) => `${this.prefix}:previews:job:${id}`;
  groupPreviews = (id: string) => `${this.prefix}:previews:group:${id}`;
  /** a job's latest preview, kept PREVIEW_TTL_MS so a follower who connects mid-run sees the current image */
  jobPreview = (id: string) => `${this.prefix}:job:${id}:preview`;
  /** pub/sub: a job's cancellation was requested. */
  cancelChannel = () => `${this.prefix}:cancel`;
}

export const QUEUES = {
  intake: 'intake',
  webhooks: 'webhooks',
  /** one entry per batch or cache request, active until its children end: Bull Board's view of groups */
  groups: 'groups',
  agent: (agentId: string) => `agent.${agentId}`,
} as const;

export const AGENT_QUEUE_PREFIX = 'agent.';
