import { z } from 'zod';
import { JobError } from './errors.js';
import { MAX_SEED, Priority, ResolvedGenerationRequest, WebhookEvent } from './generation.js';
import { CacheTask, ResolvedTrainingRequest, SelfTestReport, SelfTestTask } from './kinds.js';

export const JobKind = z.enum(['generation', 'training', 'cache', 'self_test']);
export const JobStatus = z.enum(['queued', 'running', 'succeeded', 'failed', 'canceled']);
export type JobStatus = z.infer<typeof JobStatus>;
export const TERMINAL_STATUSES: readonly JobStatus[] = ['succeeded', 'failed', 'canceled'];
export const isTerminal = (s: JobStatus) => TERMINAL_STATUSES.includes(s);

/** Finer position while queued or running. */
export const JobStage = z.enum(['queued', 'dispatched', 'loading_model', 'running', 'uploading', 'done']);
export type JobStage = z.infer<typeof JobStage>;

export const Upscaled = z.object({
  factor: z.number().int(),
  upscaler: z.string().describe('the model that ran, or "lanczos" for high-quality resampling'),
  kind: z.enum(['model', 'resample']),
});
export const SafetyVerdict = z.object({ checked: z.boolean(), nsfw: z.boolean(), checker: z.string() });
export const GenerationMetadata = z.record(z.string(), z.unknown()).describe('prompt, seed, scheduler, models, LoRAs, timings');

export const Output = z.object({
  index: z.number().int(),
  key: z.string().describe('object key in the output bucket'),
  url: z.string().describe('presigned GET URL, fresh on every read'),
  width: z.number().int(),
  height: z.number().int(),
  seed: z.number().int().min(0).max(MAX_SEED).describe('the seed this image was made with: image i of a request uses (seed + i) mod 2^32'),
  sha256: z.string(),
  bytes: z.number().int(),
  content_type: z.string(),
  upscaled: Upscaled.nullable(),
  safety: SafetyVerdict.nullable(),
  metadata: GenerationMetadata,
});
export type Output = z.infer<typeof Output>;
/** An output as stored on the record; the URL is signed when the record is read. */
export const StoredOutput = Output.omit({ url: true });
export type StoredOutput = z.infer<typeof StoredOutput>;

export const Timings = z.object({
  queued_ms: z.number().nullable().describe('submit → an agent started it (last attempt)'),
  model_load_ms: z.number().nullable(),
  inference_ms: z.number().nullable(),
  upload_ms: z.number().nullable(),
  total_ms: z.number().nullable().describe('submit → finished'),
});
export type Timings = z.infer<typeof Timings>;

export const JobEvent = z.object({
  at: z.string(),
  status: JobStatus,
  stage: JobStage,
  attempt: z.number().int(),
  agent: z.string().nullable(),
  message: z.string().optional(),
  seq: z
    .number()
    .int()
    .min(1)
    .describe("its number in the job's history, from 1 (submitted): the id of its SSE state event. Never reused; the numbers of the events dropped when the job succeeded are missing"),
});
export type JobEvent = z.infer<typeof JobEvent>;

export const WebhookDelivery = z.object({
  id: z.string().describe('webhook-id header: the same across retries of one message'),
  event: WebhookEvent,
  try: z.number().int(),
  at: z.string(),
  status_code: z.number().int().nullable(),
  ok: z.boolean(),
  error: z.string().nullable(),
  duration_ms: z.number(),
});
export type WebhookDelivery = z.infer<typeof WebhookDelivery>;

export const Progress = z.object({
  stage: z.string(),
  step: z.number().int(),
  total: z.number().int(),
  loss: z.number().optional().describe('training only'),
});

const common = {
  id: z.string(),
  client: z.string().describe('the tenant that submitted it ("default" on an open farm)'),
  status: JobStatus,
  stage: JobStage,
  attempt: z.number().int().describe('0 until first placed; +1 on every placement'),
  charged_attempts: z
    .number()
    .int()
    .optional()
    .describe('attempts that failed through the job itself (worker crash, out of memory) since it last made progress; the job fails at MAX_ATTEMPTS'),
  infra_since: z
    .string()
    .nullable()
    .optional()
    .describe('when the current run of infrastructure failures (storage, Redis, a lost agent) began; retries stop at INFRA_RETRY_DEADLINE_S after it'),
  agent: z.string().nullable(),
  priority: Priority,
  progress: Progress.nullable(),
  outputs: z.array(StoredOutput),
  error: JobError.nullable(),
  timings: Timings,
  cancel_requested: z.boolean(),
  group_id: z.string().nullable().describe('the batch, cache or self-test request this job belongs to'),
  retry_of: z.string().nullable().optional().describe('the job this one retries (POST /v1/jobs/:id/retry), with the same request'),
  deadline_at: z.string().nullable().optional().describe('Cancel-After: when it is canceled if it has not ended — before it starts, it never runs'),
  created_at: z.string(),
  started_at: z.string().nullable(),
  finished_at: z.string().nullable(),
};

export const TrainingState = z.object({
  step: z.number().int(),
  total: z.number().int(),
  loss: z.number().nullable(),
  last_checkpoint: z.object({ step: z.number().int(), key: z.string(), sha256: z.string(), bytes: z.number().int() }).nullable(),
  lora: z
    .object({ name: z.string(), key: z.string(), sha256: z.string(), bytes: z.number().int(), base_model: z.string(), rank: z.number().int() })
    .nullable()
    .describe('the trained LoRA, registered under its name'),
});
export type TrainingState = z.infer<typeof TrainingState>;

/** Everything Kiln stores about a job, by kind; the API's record adds presigned URLs and links. */
export const GenerationJob = z.object({
  ...common,
  kind: z.literal('generation'),
  request: ResolvedGenerationRequest,
  loaded_models: z
    .array(z.string())
    .optional()
    .describe('models the succeeding attempt had to load (cold or from RAM) before it ran; empty when all were resident (timings.model_load_ms is time, which a busy host spends even with nothing to load)'),
});
export const TrainingJob = z.object({ ...common, kind: z.literal('training'), request: ResolvedTrainingRequest, training: TrainingState });
export const CacheJob = z.object({
  ...common,
  kind: z.literal('cache'),
  request: CacheTask,
  cache: z.object({ loaded: z.array(z.string()), unloaded: z.array(z.string()) }).nullable(),
});
/** One agent's share of a self-test request; its report once the worker has run it. */
export const SelfTestJob = z.object({
  ...common,
  kind: z.literal('self_test'),
  request: SelfTestTask,
  self_test: z.object({ report: SelfTestReport }).nullable(),
});
export const StoredJob = z.discriminatedUnion('kind', [GenerationJob, TrainingJob, CacheJob, SelfTestJob]);
export type StoredJob = z.infer<typeof StoredJob>;
export type GenerationJob = z.infer<typeof GenerationJob>;
export type TrainingJob = z.infer<typeof TrainingJob>;
export type CacheJob = z.infer<typeof CacheJob>;
export type SelfTestJob = z.infer<typeof SelfTestJob>;

/**
 * Kinds whose jobs belong to one agent (`request.target_agent`): the API puts them straight on
 * that agent's queue, they are never placed elsewhere, retried or handed back — an agent that is
 * gone fails them (agent_lost).
 */
export const AGENT_TASK_KINDS = ['cache', 'self_test'] as const;
export const isAgentTask = (job: Pick<StoredJob, 'kind'>): job is CacheJob | SelfTestJob => (AGENT_TASK_KINDS as readonly string[]).includes(job.kind);

/** When a record and everything it stored (outputs, inputs, checkpoints) are deleted. */
const ExpiresAt = z.string().nullable().describe('when the record and its outputs are deleted: JOB_RETENTION_S (or JOB_RETENTION_S_<KIND> for its kind) after it ended; null until it ends');

/** Where to go from a job record; each is a route of the API (method in the description). */
export const JobLinks = z.object({
  self: z.string().describe('GET: this record'),
  cancel: z.string().describe('DELETE: cancel it (409 once it has ended)'),
  events: z.string().describe('GET: its live progress (server-sent events)'),
  retry: z.string().optional().describe('POST: a new job with the same request (not for a cache or self-test task)'),
  retry_of: z.string().optional().describe('GET: the job this one retries'),
  retried_as: z.string().optional().describe('GET: its latest retry'),
  group: z.string().optional().describe('GET: the batch, cache or self-test request it belongs to'),
});

/** Where a job stands: an estimate from the agents' measured times (model loads not counted). */
export const QueueInfo = z.object({
  position: z.number().int().nullable().describe('entries ahead of it in intake (0: next to be placed); null once it is placed'),
  eta_s: z.number().int().nullable().describe('estimated seconds until it ends; null with nothing to go on yet'),
});
export type QueueInfo = z.infer<typeof QueueInfo>;

const recordExtras = {
  expires_at: ExpiresAt,
  queue: QueueInfo.nullable().optional().describe('while queued or running (the API adds it; null once ended)'),
  retried_as: z.array(z.string()).describe('the jobs that retry this one, oldest first'),
  outputs: z.array(Output),
  events: z.array(JobEvent),
  webhook_deliveries: z.array(WebhookDelivery),
  links: JobLinks,
};
export const JobRecord = z.discriminatedUnion('kind', [GenerationJob.extend(recordExtras), TrainingJob.extend(recordExtras), CacheJob.extend(recordExtras), SelfTestJob.extend(recordExtras)]);
export type JobRecord = z.infer<typeof JobRecord>;

/** A batch, cache or self-test request: many jobs as one unit. */
export const GroupKind = z.enum(['batch', 'cache', 'self_test']);
export const GroupStatus = z.enum(['queued', 'running', 'succeeded', 'failed', 'partially_succeeded', 'canceled']);
export type GroupStatus = z.infer<typeof GroupStatus>;
export const StoredGroup = z.object({
  id: z.string(),
  kind: GroupKind,
  client: z.string(),
  status: GroupStatus,
  priority: Priority,
  children: z.array(z.string()),
  webhook: z.object({ url: z.string(), events: z.array(z.string()) }).nullable(),
  cancel_requested: z.boolean(),
  created_at: z.string(),
  finished_at: z.string().nullable(),
});
export type StoredGroup = z.infer<typeof StoredGroup>;

export const GroupEvent = z.object({ at: z.string(), status: GroupStatus, message: z.string() });
export type GroupEvent = z.infer<typeof GroupEvent>;

export const GroupRecord = StoredGroup.omit({ children: true }).extend({
  counts: z.object({ total: z.number().int(), queued: z.number().int(), running: z.number().int(), succeeded: z.number().int(), failed: z.number().int(), canceled: z.number().int() }),
  children: z.array(
    z.object({
      index: z.number().int(),
      id: z.string(),
      kind: z.string(),
      status: JobStatus,
      agent: z.string().nullable(),
      outputs: z.array(Output),
      error: JobError.nullable(),
    }),
  ),
  events: z.array(GroupEvent),
  webhook_deliveries: z.array(WebhookDelivery),
  expires_at: ExpiresAt,
  links: z.object({
    self: z.string().describe('GET: this record'),
    cancel: z.string().describe('DELETE: cancel its unfinished jobs (409 once it has ended)'),
    events: z.string().optional().describe("GET: a batch's live progress (server-sent events)"),
    jobs: z.string().optional().describe("GET: a batch's jobs, in their order"),
  }),
});
export type GroupRecord = z.infer<typeof GroupRecord>;
