import { PreviewEvent } from '@kiln/contracts';
import type { Redis } from 'ioredis';
import type { Keys } from './keys.js';

/** How long a job's latest preview is kept for followers who connect mid-run. */
export const PREVIEW_TTL_MS = 30_000;

/**
 * Live previews travel beside the job record, never in it: an agent publishes each one on the
 * job's preview channel (and its group's, for batch followers) and keeps it as the job's latest
 * for PREVIEW_TTL_MS; the API's SSE streams pass them on. Nothing replays or lists them.
 */
export async function publishPreview(redis: Redis, keys: Keys, preview: PreviewEvent, groupId: string | null): Promise<void> {
  const json = JSON.stringify(preview);
  const pipe = redis.pipeline().set(keys.jobPreview(preview.job_id), json, 'PX', PREVIEW_TTL_MS).publish(keys.jobPreviews(preview.job_id), json);
  if (groupId) pipe.publish(keys.groupPreviews(groupId), json);
  await pipe.exec();
}

/** A published preview, or null when the text is not one (a stream drops it). */
export function parsePreview(json: string | null): PreviewEvent | null {
  if (!json) return null;
  try {
    const parsed = PreviewEvent.safeParse(JSON.parse(json));
    return parsed.success ? parsed.data : null;
  } catch {
    return null;
  }
}

/** The latest previews of these jobs (null where none is kept), in their order. */
export async function latestPreviews(redis: Redis, keys: Keys, jobIds: string[]): Promise<(PreviewEvent | null)[]> {
  if (jobIds.length === 0) return [];
  const pipe = redis.pipeline();
  for (const id of jobIds) pipe.get(keys.jobPreview(id));
  return ((await pipe.exec()) ?? []).map(([, raw]) => parsePreview(typeof raw === 'string' ? raw : null));
}
