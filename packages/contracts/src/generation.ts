import { z } from 'zod';

/**
 * The generation request ("prompt submission"), v1. One schema from API to worker: the API
 * parses the body with it (filling defaults and choosing a seed), stores the parsed object on
 * the job record, and the worker receives exactly that object.
 *
 * Objects are strict: a field Kiln cannot honour yet is a 400 naming it, never silently ignored.
 */

export const SCHEDULERS = [
  'DPMSolverMultistepScheduler',
  'DPMSolverSinglestepScheduler',
  'DDIMScheduler',
  'EulerDiscreteScheduler',
  'EulerAncestralDiscreteScheduler',
  'HeunDiscreteScheduler',
  'LMSDiscreteScheduler',
  'KDPM2DiscreteScheduler',
  'KDPM2AncestralDiscreteScheduler',
  'UniPCMultistepScheduler',
] as const;
export const SchedulerType = z.enum(SCHEDULERS);

export const LIMITS = {
  minSide: 64,
  maxSide: 2048,
  maxPixels: 2048 * 2048,
  maxSteps: 150,
  maxGuidance: 30,
  maxImages: 8,
  maxPromptChars: 4000,
  maxTimeoutS: 6 * 3600,
} as const;

const Side = z.number().int().min(LIMITS.minSide).max(LIMITS.maxSide).multipleOf(8, 'must be a multiple of 8');
export const MAX_SEED = 2 ** 32 - 1;

export const ModelSuite = z.strictObject({
  base: z.string().min(1).max(200).describe('model id, e.g. stabilityai/stable-diffusion-xl-base-1.0'),
});

export const Scheduler = z.strictObject({
  type: SchedulerType.default('EulerDiscreteScheduler'),
  steps: z.number().int().min(1).max(LIMITS.maxSteps).default(30),
});

export const Hyperparameters = z
  .strictObject({
    guidance_scale: z.number().min(0).max(LIMITS.maxGuidance).default(5),
    seed: z.number().int().min(0).max(MAX_SEED).optional().describe('chosen at random and reported when absent'),
    width: Side.default(1024),
    height: Side.default(1024),
    num_images: z.number().int().min(1).max(LIMITS.maxImages).default(1),
  })
  .refine((h) => h.width * h.height <= LIMITS.maxPixels, {
    message: `width × height must be at most ${LIMITS.maxPixels} pixels`,
    path: ['width'],
  });

export const Conditioning = z.strictObject({
  prompt: z.string().trim().min(1, 'must not be empty').max(LIMITS.maxPromptChars),
  negative_prompt: z.string().max(LIMITS.maxPromptChars).optional(),
});

export const OutputFormat = z.enum(['png']);
export const OutputOptions = z.strictObject({ format: OutputFormat.default('png') });

export const WebhookEvent = z.enum(['started', 'progress', 'completed']);
export type WebhookEvent = z.infer<typeof WebhookEvent>;
export const WebhookSpec = z.strictObject({
  url: z
    .url({ protocol: /^https?$/, error: 'must be an http(s) URL' })
    .max(2048),
  events: z
    .array(WebhookEvent)
    .min(1)
    .refine((e) => new Set(e).size === e.length, 'must not repeat an event')
    .default(['completed']),
});

export const Priority = z.enum(['low', 'normal', 'high']);
export type Priority = z.infer<typeof Priority>;

export const GenerationRequest = z.strictObject({
  model: ModelSuite,
  scheduler: Scheduler.default({ type: 'EulerDiscreteScheduler', steps: 30 }),
  hyperparameters: Hyperparameters.default({ guidance_scale: 5, width: 1024, height: 1024, num_images: 1 }),
  conditioning: Conditioning,
  output: OutputOptions.default({ format: 'png' }),
  priority: Priority.default('normal'),
  webhook: WebhookSpec.optional(),
  timeout_s: z.number().int().min(1).max(LIMITS.maxTimeoutS).default(600),
});
/** What a client sends. */
export type GenerationRequestInput = z.input<typeof GenerationRequest>;
/** A request as the API parsed it: defaults filled, the seed maybe still absent. */
export type ParsedGenerationRequest = z.output<typeof GenerationRequest>;

/** The parsed request as the worker sees it: the seed is always present. */
export const ResolvedGenerationRequest = GenerationRequest.extend({
  hyperparameters: Hyperparameters.safeExtend({ seed: z.number().int().min(0).max(MAX_SEED) }),
});
/** What the API stores and the worker receives: defaults filled, seed chosen. */
export type GenerationRequest = z.output<typeof ResolvedGenerationRequest>;

/**
 * Working VRAM a request needs on top of its models (latents, activations, VAE decode),
 * about 1.2 GB per 1024×1024 image at fp16. Placement and the synthetic backend both use it.
 */
export const ACTIVATION_MB_PER_MEGAPIXEL = 1200;
export function activationVramMb(h: { width: number; height: number; num_images: number }): number {
  return Math.ceil((ACTIVATION_MB_PER_MEGAPIXEL * h.width * h.height * h.num_images) / (1024 * 1024));
}
