import { z } from 'zod';
import { AgentHeartbeat, AgentState, ModelKind, ResidentModel, WorkerCapabilities } from './agent.js';
import { GenerationRequest } from './generation.js';
import { GroupRecord, JobRecord } from './job.js';

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
});

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
