import { z } from 'zod';
import { LIMITS, MAX_SEED, Priority, WebhookSpec } from './generation.js';
import { Text } from './text.js';

/**
 * The other job kinds: batch (many generations as one unit), cache (model residency on chosen
 * agents) and training (a LoRA fine-tune whose result generations can use by name).
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
