import { z } from 'zod';
import { JobRecord } from './job.js';

export const WebhookType = z.enum(['job.started', 'job.progress', 'job.completed']);

/** The body Kiln POSTs, signed per Standard Webhooks. `data` is the job record at that moment. */
export const WebhookPayload = z.object({
  type: WebhookType,
  timestamp: z.string(),
  data: JobRecord,
});
export type WebhookPayload = z.infer<typeof WebhookPayload>;
