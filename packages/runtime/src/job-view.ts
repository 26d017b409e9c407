import { isAgentTask, type JobEvent, type JobRecord, type StoredGroup, type StoredJob, type WebhookDelivery } from '@kiln/contracts';
import type { JobStore } from './job-store.js';
import type { Storage } from './storage.js';

/** A job's history, when the caller knows it (a job it has just created: its one event, nothing else). */
export interface KnownHistory {
  events: JobEvent[];
  deliveries: WebhookDelivery[];
  retries: string[];
}

/** The history of a job just created: its `submitted` event. */
export const freshHistory = (submitted: JobEvent): KnownHistory => ({ events: [submitted], deliveries: [], retries: [] });

/** The job record as clients see it: history attached (read, unless `known`), outputs with fresh presigned URLs. */
export async function jobRecord(job: StoredJob, store: JobStore, storage: Storage, publicUrl: string, known?: KnownHistory): Promise<JobRecord> {
  const [{ events, deliveries }, outputs, retries] = await Promise.all([
    known ?? store.history(job.id),
    Promise.all(job.outputs.map(async (o) => ({ ...o, url: await storage.presign(o.key) }))),
    known?.retries ?? store.retriesOf(job.id),
  ]);
  const record = { ...job, expires_at: expiresAt(job.finished_at, store.retentionFor(job.kind)), retried_as: retries, outputs, events, webhook_deliveries: deliveries, links: jobLinks(job, retries, publicUrl) };
  if (record.kind === 'training' && record.progress?.stage === 'train') {
    // live step and loss come from the progress field, written on every step
    record.training = { ...record.training, step: record.progress.step, loss: record.progress.loss ?? record.training.loss };
  }
  return record;
}

/** Where each kind of group is read (GET) and canceled (DELETE): `<path>/<id>`. */
export const GROUP_PATHS: Record<StoredGroup['kind'], string> = { batch: '/v1/batches', cache: '/v1/cache', self_test: '/v1/admin/self-tests' };

/** A record expires JOB_RETENTION_S (or its kind's JOB_RETENTION_S_<KIND>) after it ended (the end-job script starts that TTL). */
export function expiresAt(finishedAt: string | null, retentionS: number): string | null {
  return finishedAt ? new Date(Date.parse(finishedAt) + retentionS * 1000).toISOString() : null;
}

/** The record's links: every one a route of the API (see JobLinks for the method of each). */
export function jobLinks(job: StoredJob, retries: string[], publicUrl: string): JobRecord['links'] {
  const url = (path: string) => new URL(path, publicUrl).toString();
  const self = url(`/v1/jobs/${job.id}`);
  return {
    self,
    cancel: self,
    events: url(`/v1/jobs/${job.id}/events`),
    ...(isAgentTask(job) ? {} : { retry: url(`/v1/jobs/${job.id}/retry`) }),
    ...(job.retry_of ? { retry_of: url(`/v1/jobs/${job.retry_of}`) } : {}),
    ...(retries.length ? { retried_as: url(`/v1/jobs/${retries.at(-1)}`) } : {}),
    ...(job.group_id ? { group: url(`${GROUP_PATHS[job.kind === 'cache' || job.kind === 'self_test' ? job.kind : 'batch']}/${job.group_id}`) } : {}),
  };
}
