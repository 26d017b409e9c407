import type { JobRecord, StoredJob } from '@kiln/contracts';
import type { JobStore } from './job-store.js';
import type { Storage } from './storage.js';

/** The job record as clients see it: history attached, outputs with fresh presigned URLs. */
export async function jobRecord(job: StoredJob, store: JobStore, storage: Storage, publicUrl: string): Promise<JobRecord> {
  const [{ events, deliveries }, outputs] = await Promise.all([
    store.history(job.id),
    Promise.all(job.outputs.map(async (o) => ({ ...o, url: await storage.presign(o.key) }))),
  ]);
  const self = new URL(`/v1/jobs/${job.id}`, publicUrl).toString();
  const record = { ...job, expires_at: expiresAt(job.finished_at, store.retentionS), outputs, events, webhook_deliveries: deliveries, links: { self, cancel: self } };
  if (record.kind === 'training' && record.progress?.stage === 'train') {
    // live step and loss come from the progress field, written on every step
    record.training = { ...record.training, step: record.progress.step, loss: record.progress.loss ?? record.training.loss };
  }
  return record;
}

/** A record expires JOB_RETENTION_S after it ended (the end-job script starts that TTL). */
export function expiresAt(finishedAt: string | null, retentionS: number): string | null {
  return finishedAt ? new Date(Date.parse(finishedAt) + retentionS * 1000).toISOString() : null;
}
