import { z } from 'zod';

export const ModelKind = z.enum(['base', 'refiner', 'vae', 'lora', 'controlnet', 'upscaler', 'safety_checker']);
export const ModelInfo = z.object({
  name: z.string(),
  kind: ModelKind,
  vram_mb: z.number().int().describe('VRAM the loaded model takes'),
  load_ms: z.number().int().describe("the worker's estimate of a cold load from disk"),
  controlnet_type: z.string().optional().describe('for kind controlnet: canny, depth, …'),
  scale: z.number().int().optional().describe('for kind upscaler: its native factor'),
});
export type ModelInfo = z.infer<typeof ModelInfo>;

export const ResidentModel = z.object({
  name: z.string(),
  location: z.enum(['vram', 'ram']),
  vram_mb: z.number().int(),
  last_used_at: z.string().nullable(),
  pinned: z.boolean().default(false).describe('pinned by a cache request: never evicted to make room'),
});
export type ResidentModel = z.infer<typeof ResidentModel>;

export const FEATURES = ['refiner', 'vae', 'lora', 'controlnet', 'img2img', 'inpaint', 'upscale', 'safety_check', 'metadata', 'training'] as const;
export const PERFORMANCE_OPTIONS = ['attention_slicing', 'vae_slicing', 'vae_tiling', 'cpu_offload_model', 'cpu_offload_sequential', 'channels_last', 'compile'] as const;

export const WorkerCapabilities = z.object({
  backend: z.enum(['synthetic', 'diffusers']),
  models: z.array(ModelInfo),
  schedulers: z.array(z.string()),
  output_formats: z.array(z.string()),
  max_side: z.number().int(),
  max_images: z.number().int(),
  features: z.array(z.enum(FEATURES)),
  controlnet_types: z.array(z.string()).describe('types with at least one ControlNet model here'),
  controlnet_preprocessors: z.array(z.string()),
  upscalers: z.array(z.string()).describe('upscaler models here; "lanczos" resampling is always available'),
  dtypes: z.array(z.enum(['fp16', 'bf16', 'fp32'])),
  performance: z.array(z.enum(PERFORMANCE_OPTIONS)),
});
export type WorkerCapabilities = z.infer<typeof WorkerCapabilities>;

export const WorkerState = z.object({
  vram_total_mb: z.number().int(),
  vram_used_mb: z.number().int(),
  resident: z.array(ResidentModel),
});
export type WorkerState = z.infer<typeof WorkerState>;

export const AgentState = z.enum(['starting', 'ready', 'busy', 'draining', 'defunct']);
export type AgentState = z.infer<typeof AgentState>;

/** What an agent publishes on every heartbeat; the registry entry expires if they stop. */
export const AgentHeartbeat = z.object({
  agent_id: z.string(),
  host: z.string(),
  gpu_id: z.string(),
  gpu: z.object({ name: z.string(), vram_total_mb: z.number().int(), vram_free_mb: z.number().int() }),
  state: AgentState,
  maintenance: z.boolean().default(false).describe('taken out of rotation by an operator (POST /v1/agents/:id/drain): it finishes what it holds and gets nothing new, until resumed'),
  resident: z.array(ResidentModel),
  current_job: z.string().nullable(),
  capabilities: WorkerCapabilities.nullable(),
  worker: z.object({ pid: z.number().int().nullable(), restarts: z.number().int() }),
  jobs_done: z.number().int(),
  avg_job_ms: z.number().nullable().describe('moving average of run time, for placement'),
  step_ms: z
    .record(z.string(), z.number())
    .default({})
    .describe('measured time of one step per megapixel, by "<kind> <base model>" (generation, training): moving averages placement multiplies by a job\'s known steps and size to tell how long it will run'),
  started_at: z.string(),
  heartbeat_at: z.string(),
});
export type AgentHeartbeat = z.infer<typeof AgentHeartbeat>;
