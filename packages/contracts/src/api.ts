import { z } from 'zod';
import { AgentHeartbeat, AgentState, ModelKind, ResidentModel, WorkerCapabilities } from './agent.js';
import { GenerationRequest, IMAGE_LIMITS } from './generation.js';
import { GroupRecord, JobRecord } from './job.js';
import { PreviewMessage } from './protocol.js';

export const AgentsResponse = z.object({ agents: z.array(AgentHeartbeat) });

export const ModelsResponse = z.object({
  models: z.array(
    z.object({
      name: z.string(),
      kind: ModelKind,
      vram_mb: z.number().int(),
      agents: z.array(z.string()).describe('live agents that can load it'),
      resident_on: z.array(z.string()).describe('live agents holding it now'),
    }),
  ),
});

/** Why a readiness check failed, in one word; the raw error goes to the API's log only. */
export const ReadinessFailure = z.enum(['unreachable', 'timeout', 'failed']);
export type ReadinessFailure = z.infer<typeof ReadinessFailure>;

export const HealthResponse = z.object({
  status: z.enum(['ok', 'unavailable']),
  checks: z.record(z.string(), z.object({ ok: z.boolean(), error: ReadinessFailure.optional() })).optional(),
});

// ---- API responses that are not records ---------------------------------------------------
// (records are JobRecord and GroupRecord in job.ts; every error is ApiError in errors.ts)

/** GET /v1/capabilities: what the farm can do, per agent and as the union over live agents. */
export const CapabilitiesResponse = z.object({
  aggregate: z.object({
    schedulers: z.array(z.string()),
    scheduler_aliases: z
      .record(z.string(), z.record(z.string(), z.union([z.string(), z.number(), z.boolean()])))
      .describe('alias → the scheduler class and the options it implies'),
    controlnet_types: z.array(z.string()),
    controlnet_preprocessors: z.array(z.string()),
    upscalers: z.array(z.string()).describe('"lanczos" (resampling) is always there'),
    features: z.array(z.string()),
    output_formats: z.array(z.string()),
    dtypes: z.array(z.string()),
    performance: z.array(z.string()),
    models: z.array(z.string()),
    max_side: z.number().int(),
    max_images: z.number().int(),
  }),
  agents: z.array(WorkerCapabilities.extend({ agent_id: z.string(), vram_total_mb: z.number().int() })),
});

/** GET /v1/cache: what is resident where. */
export const ResidencyResponse = z.object({
  agents: z.array(
    z.object({ agent_id: z.string(), state: AgentState, vram_total_mb: z.number().int(), vram_free_mb: z.number().int(), resident: z.array(ResidentModel) }),
  ),
});

/** DELETE /v1/cache when no live agent holds the models: nothing to do. */
export const NothingToEvict = z.object({ evicted: z.array(z.string()).max(0), message: z.string() });

/** POST /v1/validate: the request as it would be stored (defaults filled, aliases resolved). */
export const ValidateResponse = z.object({
  valid: z.literal(true),
  request: GenerationRequest,
  agents: z.array(z.string()).describe('live agents that could run it now'),
  estimate: z.object({
    run_s: z.number().nullable().describe('how long it should run, from the agents measured times (model loads not counted); null with nothing measured yet'),
    vram_mb: z.number().int().nullable().describe('VRAM its models and images need on the best-fitting capable agent'),
  }),
});

/** GET /v1/queue: what waits, what runs it, and how long until it is all done. */
export const QueueSummary = z.object({
  waiting: z.number().int().describe('entries in intake'),
  counted: z.number().int().describe('of those, the ones read for the breakdowns (at most 2000, first to be placed first)'),
  by_priority: z.object({ high: z.number().int(), normal: z.number().int(), low: z.number().int() }),
  by_model: z.record(z.string(), z.number().int()),
  by_tenant: z.record(z.string(), z.number().int()).describe("every tenant's for an admin key; the caller's own for a client key"),
  agents: z.object({ total: z.number().int(), busy: z.number().int(), idle: z.number().int(), unavailable: z.number().int().describe('starting, draining or defunct') }),
  drain_s: z.number().int().nullable().describe('estimated seconds until everything queued and running has ended; null without a usable agent'),
});
export type QueueSummary = z.infer<typeof QueueSummary>;

/** A LoRA trained here, as GET /v1/loras and POST /v1/loras/share show it. */
export const TrainedLora = z.object({
  name: z.string().describe('qualified name, <tenant>/<name>: what generations put in loras[].name'),
  tenant: z.string(),
  key: z.string().describe('where its weights are in the bucket'),
  sha256: z.string(),
  bytes: z.number().int(),
  base_model: z.string(),
  rank: z.number().int(),
  job_id: z.string().describe('the training that made it'),
  created_at: z.string(),
  shared: z.boolean().describe('an admin shared it with every tenant'),
});

export const LorasResponse = z.object({
  trained: z.array(TrainedLora).describe("the caller's own and shared ones"),
  available_on_agents: z.array(z.string()).describe('LoRAs the agents ship with (global)'),
});

// ---- lists --------------------------------------------------------------------------------

const NextCursor = z.string().nullable().describe('pass as `cursor` for the next page; null when there is no more');

/** GET /v1/jobs and GET /v1/trainings: newest first. */
export const JobList = z.object({ data: z.array(JobRecord), next_cursor: NextCursor });

/** A batch as a list shows it: its record without the children, events and deliveries (GET /v1/batches/:id has them). */
export const GroupSummary = GroupRecord.omit({ children: true, events: true, webhook_deliveries: true });
export type GroupSummary = z.infer<typeof GroupSummary>;

/** GET /v1/batches: newest first. */
export const BatchList = z.object({ data: z.array(GroupSummary), next_cursor: NextCursor });

// ---- uploads ------------------------------------------------------------------------------

/** What may be uploaded, with its file name extensions and size limit. */
export const UPLOAD_TYPES = {
  'image/png': { extensions: ['png'], maxBytes: IMAGE_LIMITS.maxBytes },
  'image/jpeg': { extensions: ['jpg', 'jpeg'], maxBytes: IMAGE_LIMITS.maxBytes },
  'image/webp': { extensions: ['webp'], maxBytes: IMAGE_LIMITS.maxBytes },
  'text/plain': { extensions: ['txt'], maxBytes: 64 * 1024 },
  'application/json': { extensions: ['json'], maxBytes: 16 * 1024 * 1024 },
} as const;
export type UploadType = keyof typeof UPLOAD_TYPES;

/** POST /v1/uploads: a file to put into the caller's area of the bucket. */
export const UploadRequest = z
  .strictObject({
    content_type: z.enum(Object.keys(UPLOAD_TYPES) as [UploadType, ...UploadType[]]).describe('an input image (png, jpeg, webp), a caption (.txt) or a dataset manifest (.json)'),
    bytes: z.number().int().min(1).describe('its size: at most 10 MB for an image, 64 KB for a caption, 16 MB for a manifest'),
    path: z
      .string()
      .min(1)
      .max(300)
      .regex(/^[A-Za-z0-9_.-]+(\/[A-Za-z0-9_.-]+)*$/, 'letters, digits, "_", "." and "-" in "/"-separated segments')
      .regex(/^(?!(?:.*\/)?\.{1,2}(?:\/|$))/, 'no "." or ".." segments')
      .optional()
      .describe('where under your uploads area, e.g. datasets/kilns/1.png (a training dataset is the prefix datasets/kilns/); default: a new name'),
  })
  .superRefine((r, ctx) => {
    const type = UPLOAD_TYPES[r.content_type];
    if (r.bytes > type.maxBytes) ctx.addIssue({ code: 'custom', path: ['bytes'], message: `at most ${type.maxBytes} bytes for ${r.content_type}`, params: { rule: 'too_large' } });
    const ext = r.path?.split('.').pop()?.toLowerCase();
    if (r.path !== undefined && !(type.extensions as readonly string[]).includes(ext ?? ''))
      ctx.addIssue({ code: 'custom', path: ['path'], message: `a ${r.content_type} file name ends in .${type.extensions.join(' or .')}`, params: { rule: 'extension_mismatch' } });
  });
export type UploadRequest = z.infer<typeof UploadRequest>;

export const UploadResponse = z.object({
  s3_key: z.string().describe('use it in requests: image.init.s3_key, controlnets[].image.s3_key, dataset.s3_prefix (its folder), dataset.manifest'),
  url: z.string().describe('PUT the file here, with the content-type below, before url_expires_at'),
  method: z.literal('PUT'),
  headers: z.object({ 'content-type': z.string() }),
  max_bytes: z.number().int().describe('Kiln refuses the object when it is used if it is larger'),
  url_expires_at: z.string(),
  expires_at: z.string().describe('when the object is deleted (UPLOAD_RETENTION_S after this request; ask again to keep it longer)'),
});
export type UploadResponse = z.infer<typeof UploadResponse>;

/**
 * A live preview as the SSE streams send it (`event: preview`, no id: never replayed) and as
 * agents publish it: the worker's preview of one attempt of one job. Never stored on the record.
 */
export const PreviewEvent = PreviewMessage.pick({ stage: true, step: true, total: true, width: true, height: true, content_type: true, data: true }).extend({
  job_id: z.string(),
  attempt: z.number().int().min(1),
});
export type PreviewEvent = z.infer<typeof PreviewEvent>;
