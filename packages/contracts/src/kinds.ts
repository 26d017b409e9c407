import { z } from 'zod';
import { LIMITS, MAX_SEED, Priority, SCHEDULERS, WebhookSpec } from './generation.js';
import { Text } from './text.js';

/**
 * The other job kinds: batch (many generations as one unit), cache (model residency on chosen
 * agents), training (a LoRA fine-tune whose result generations can use by name) and self-test
 * (the GPU check run by chosen agents' workers, its report on the record).
 */

const ModelName = Text.min(1).max(200);
const AgentId = Text.min(1).max(200);
const S3Key = z
  .string()
  .min(1)
  .max(512)
  .regex(/^[A-Za-z0-9/_.-]+$/, 'letters, digits, "/", "_", "." and "-" only')
  // no "." or ".." segment and no empty one: a key means one object, whatever the server does with paths
  .regex(/^(?!\/)(?!.*\/\/)(?!(?:.*\/)?\.{1,2}(?:\/|$))/, 'no empty, "." or ".." path segments');

// ---- batch -------------------------------------------------------------------------------

export const MAX_BATCH_ITEMS = 1000;
/**
 * Items are generation requests; `defaults` is merged under each (objects merge, arrays and
 * values from the item win) and every merged item is validated like a single request.
 */
export const BatchRequest = z.strictObject({
  defaults: z.record(z.string(), z.unknown()).default({}),
  items: z.array(z.record(z.string(), z.unknown())).min(1).max(MAX_BATCH_ITEMS),
  priority: Priority.default('normal'),
  webhook: WebhookSpec.optional().describe('fires once, when every child has ended'),
});
export type BatchRequest = z.output<typeof BatchRequest>;

// ---- cache -------------------------------------------------------------------------------

export const CacheModels = z
  .strictObject({
    base: ModelName.optional(),
    refiner: ModelName.optional(),
    vae: ModelName.optional(),
    loras: z.array(ModelName).max(8).optional(),
    controlnets: z.array(ModelName).max(4).optional(),
    upscaler: ModelName.optional(),
  })
  .refine((m) => Object.values(m).some((v) => (Array.isArray(v) ? v.length > 0 : !!v)), { message: 'name at least one model', params: { rule: 'required' } });
export type CacheModels = z.output<typeof CacheModels>;

export const CacheRequest = z.strictObject({
  models: CacheModels,
  target: z
    .union([
      z.strictObject({ all: z.literal(true) }),
      z.strictObject({ replicas: z.number().int().min(1).max(256) }),
      z.strictObject({ agents: z.array(AgentId).min(1).max(256) }),
    ])
    .default({ all: true }),
  location: z.enum(['vram', 'ram']).default('vram').describe('vram: hot, ready to run; ram: warm, cheaper to bring in than from disk'),
  pin: z.boolean().default(false).describe('pinned models are never evicted to make room'),
  webhook: WebhookSpec.optional(),
});
export type CacheRequest = z.output<typeof CacheRequest>;

export const EvictRequest = z.strictObject({
  models: z.array(ModelName).min(1).max(32),
  agents: z.array(AgentId).min(1).optional().describe('default: every live agent'),
});

/** One agent's share of a cache request (or eviction), run on that agent's queue. */
export const CacheTask = z.strictObject({
  action: z.enum(['load', 'unload']),
  models: z.array(ModelName).min(1),
  location: z.enum(['vram', 'ram']),
  pin: z.boolean(),
  target_agent: z.string(),
});
export type CacheTask = z.output<typeof CacheTask>;

// ---- training ----------------------------------------------------------------------------

export const LoraName = z
  .string()
  .min(1)
  .max(100)
  .regex(/^[A-Za-z0-9][A-Za-z0-9._-]*(\/[A-Za-z0-9][A-Za-z0-9._-]*)?$/, 'letters, digits, ".", "_", "-", and at most one "/"');

export const TRAINING_LIMITS = { maxImages: 10_000, maxSteps: 100_000, maxTimeoutS: 7 * 24 * 3600 } as const;

function trainingSchema<D extends z.ZodType, Seed extends z.ZodType>(dataset: D, seed: Seed) {
  return z.strictObject({
    base_model: ModelName,
    dataset,
    output: z.strictObject({ name: LoraName.describe('generations use it as loras: [{ name }]') }),
    hyperparameters: z
      .strictObject({
        rank: z.number().int().min(1).max(256).default(16),
        alpha: z.number().positive().max(1024).optional().describe('default: rank'),
        learning_rate: z.number().positive().max(1).default(1e-4),
        steps: z.number().int().min(1).max(TRAINING_LIMITS.maxSteps).default(1000),
        batch_size: z.number().int().min(1).max(16).default(1),
        gradient_accumulation: z.number().int().min(1).max(64).default(1),
        resolution: z.number().int().min(256).max(1024).multipleOf(64, 'must be a multiple of 64').default(1024),
        seed,
        train_text_encoder: z.boolean().default(false),
        checkpoint_every: z.number().int().min(1).max(TRAINING_LIMITS.maxSteps).default(100),
      })
      .prefault({} as never),
    priority: Priority.default('normal'),
    webhook: WebhookSpec.optional(),
    timeout_s: z.number().int().min(1).max(TRAINING_LIMITS.maxTimeoutS).default(24 * 3600),
  });
}

/** Where the images and captions are: a prefix of images with same-named .txt captions, or a manifest. */
export const DatasetInput = z
  .strictObject({
    s3_prefix: z
      .string()
      .min(1)
      .max(400)
      .regex(/^[A-Za-z0-9/_.-]+$/, 'letters, digits, "/", "_", "." and "-" only')
      .regex(/^(?!\/)(?!.*\/\/)(?!(?:.*\/)?\.{1,2}(?:\/|$))/, 'no empty, "." or ".." path segments')
      .optional(),
    manifest: S3Key.optional().describe('a JSON array of { image: <key>, caption: <text> }'),
  })
  .refine((d) => (d.s3_prefix === undefined) !== (d.manifest === undefined), { message: 'give exactly one of s3_prefix or manifest', params: { rule: 'exactly_one' } });

/** The dataset as the worker receives it: every pair listed, resolved by the API. */
export const ResolvedDataset = z.strictObject({
  items: z.array(z.strictObject({ image: S3Key, caption: z.string().max(LIMITS.maxPromptChars) })).min(1).max(TRAINING_LIMITS.maxImages),
});

export const TrainingRequest = trainingSchema(DatasetInput, z.number().int().min(0).max(MAX_SEED).optional());
export type TrainingRequestInput = z.input<typeof TrainingRequest>;
export const ResolvedTrainingRequest = trainingSchema(ResolvedDataset, z.number().int().min(0).max(MAX_SEED));
export type TrainingRequest = z.output<typeof ResolvedTrainingRequest>;

/** VRAM a LoRA fine-tune needs on top of its base model (optimizer state, activations). */
export function trainingVramMb(r: { hyperparameters: { resolution: number; batch_size: number; train_text_encoder: boolean } }): number {
  const h = r.hyperparameters;
  return Math.ceil(4000 * ((h.resolution * h.resolution) / (1024 * 1024)) * h.batch_size + (h.train_text_encoder ? 2000 : 0));
}

// ---- self-test ---------------------------------------------------------------------------

/** What a self-test runs: the worker's environment, the validity of its model files, a timed benchmark. */
export const SELF_TEST_CHECKS = ['environment', 'models', 'benchmark'] as const;
export type SelfTestCheck = (typeof SELF_TEST_CHECKS)[number];
/** Bounds that keep one self-test from holding a GPU for long: at most 10 schedulers × 50 steps at 1024². */
export const SELF_TEST_LIMITS = { maxSide: 1024, maxSteps: 50, maxSchedulers: SCHEDULERS.length, maxTimeoutS: 3600 } as const;

export const SelfTestBenchmark = z.strictObject({
  size: z
    .number()
    .int()
    .min(64)
    .max(SELF_TEST_LIMITS.maxSide)
    .multipleOf(8, 'must be a multiple of 8')
    .optional()
    .describe('image side; default 1024 on a GPU with real weights, 128 on the tiny random pipeline, 256 on the synthetic backend'),
  steps: z.number().int().min(1).max(SELF_TEST_LIMITS.maxSteps).optional().describe('denoising steps per case; default 30 on a GPU with real weights, 10 otherwise'),
  schedulers: z
    .array(z.enum(SCHEDULERS))
    .min(1)
    .max(SELF_TEST_LIMITS.maxSchedulers)
    .refine((s) => new Set(s).size === s.length, { message: 'each scheduler once', params: { rule: 'unique' } })
    .optional()
    .describe('one base case per scheduler; default: every scheduler'),
});
export type SelfTestBenchmark = z.output<typeof SelfTestBenchmark>;

const SelfTestChecks = z
  .array(z.enum(SELF_TEST_CHECKS))
  .min(1)
  .refine((c) => new Set(c).size === c.length, { message: 'each check once', params: { rule: 'unique' } });

/** POST /v1/admin/self-tests: the GPU check on chosen agents (or every live one), one task each. */
export const SelfTestRequest = z.strictObject({
  agents: z
    .union([
      z.literal('all'),
      z
        .array(AgentId)
        .min(1)
        .max(256)
        .refine((a) => new Set(a).size === a.length, { message: 'each agent once', params: { rule: 'unique' } }),
    ])
    .default('all')
    .describe('"all": every live agent not draining; or the ids of live agents'),
  checks: SelfTestChecks.default([...SELF_TEST_CHECKS]).describe('environment: device, driver, library versions; models: every item of MODELS_DIR with a verdict; benchmark: timed generations'),
  benchmark: SelfTestBenchmark.prefault({}),
  timeout_s: z.number().int().min(10).max(SELF_TEST_LIMITS.maxTimeoutS).default(900).describe('each agent\'s task fails with `timeout` past it'),
  webhook: WebhookSpec.optional().describe('fires once, when every agent has reported'),
});
export type SelfTestRequest = z.output<typeof SelfTestRequest>;

/** One agent's share of a self-test request, run on that agent's queue. */
export const SelfTestTask = z.strictObject({
  checks: SelfTestChecks,
  benchmark: SelfTestBenchmark,
  timeout_s: z.number().int().min(1).max(SELF_TEST_LIMITS.maxTimeoutS),
  target_agent: z.string(),
});
export type SelfTestTask = z.output<typeof SelfTestTask>;

const Device = z.object({ name: z.string(), vram_total_mb: z.number().int() });

/** A self-test's findings, as the worker wrote them (the agent stores them as they came). */
export const SelfTestReport = z.object({
  backend: z.enum(['synthetic', 'diffusers']),
  checks: z.array(z.enum(SELF_TEST_CHECKS)),
  generated_at: z.string(),
  duration_ms: z.number(),
  verdict: z.enum(['pass', 'fail']).describe('fail when a model has problems, a benchmark case failed, or a pinned model could not be restored'),
  reasons: z.array(z.string()).describe('why it failed, one line each (empty on a pass); notes such as "synthetic figures" are in the sections'),
  environment: z
    .object({
      backend: z.enum(['synthetic', 'diffusers']),
      device: Device.describe('the device this worker drives'),
      python: z.string(),
      platform: z.string(),
      torch: z.string().nullable(),
      cuda: z.string().nullable().describe('the CUDA torch was built for'),
      cuda_available: z.boolean(),
      driver: z.string().nullable(),
      diffusers: z.string().nullable(),
      transformers: z.string().nullable(),
      spandrel: z.string().nullable(),
      peft: z.string().nullable(),
      devices: z.array(z.object({ index: z.number().int(), name: z.string(), vram_mb: z.number().int(), compute_capability: z.string(), bf16: z.boolean() })),
    })
    .nullable()
    .describe('null when not asked for'),
  models: z
    .object({
      models_dir: z.string().nullable().describe('the folder validated; null when the worker has none'),
      note: z.string().nullable(),
      items: z.array(
        z.object({
          kind: z.string(),
          name: z.string(),
          path: z.string(),
          ok: z.boolean(),
          problems: z.array(z.string()),
          params: z.number().int().optional(),
          disk_bytes: z.number().int().optional(),
          vram_mb_fp16: z.number().int().optional(),
          single_file: z.boolean().optional(),
          controlnet_type: z.string().optional(),
          scale: z.number().int().optional(),
        }),
      ),
    })
    .nullable()
    .describe('every item of MODELS_DIR with a verdict (safetensors headers readable, config present, sizes); null when not asked for'),
  benchmark: z
    .object({
      mode: z
        .enum(['real', 'tiny', 'synthetic'])
        .describe("real: this GPU and its own weights; tiny: the tiny random SDXL pipeline (no GPU or no base model here; figures only show the check runs); synthetic: the synthetic backend's simulated costs, never GPU figures"),
      note: z.string().nullable(),
      base: z.string().nullable(),
      size: z.number().int(),
      steps: z.number().int(),
      device: Device,
      rows: z.array(
        z.object({
          case: z.string(),
          ok: z.boolean().nullable().describe('null: skipped'),
          skipped: z.string().optional(),
          error: z.string().optional(),
          wall_ms: z.number().optional(),
          steps: z.record(z.string(), z.number().int()).optional().describe('denoising steps run, per stage'),
          ms_per_step: z.number().nullable().optional(),
          timings: z.record(z.string(), z.number()).optional().describe('per-stage ms (the contracts\' timing keys)'),
          peak_vram_mb: z.number().int().nullable().optional(),
          loaded: z.array(z.string()).optional(),
          moved: z.array(z.string()).optional(),
        }),
      ),
    })
    .nullable()
    .describe('null when not asked for'),
  residency: z
    .object({
      before: z.array(z.object({ name: z.string(), location: z.enum(['vram', 'ram']), pinned: z.boolean() })),
      after: z.array(z.object({ name: z.string(), location: z.enum(['vram', 'ram']), pinned: z.boolean() })),
      restored: z.array(z.string()).describe('pinned models the benchmark moved, put back where they were and pinned again'),
      problems: z.array(z.string()),
    })
    .describe('what was resident before and after: the benchmark loads and moves models; pinned ones are restored'),
});
export type SelfTestReport = z.infer<typeof SelfTestReport>;
