import { z } from 'zod';
import { Text } from './text.js';

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

/**
 * Scheduler aliases, per diffusers' own table of A1111/k-diffusion names
 * (docs: api/schedulers/overview): each maps to a diffusers class and the options it implies.
 */
export const SCHEDULER_ALIASES = {
  'DPM++ 2M': { type: 'DPMSolverMultistepScheduler' },
  'DPM++ 2M Karras': { type: 'DPMSolverMultistepScheduler', use_karras_sigmas: true },
  'DPM++ 2M SDE': { type: 'DPMSolverMultistepScheduler', algorithm_type: 'sde-dpmsolver++' },
  'DPM++ 2M SDE Karras': { type: 'DPMSolverMultistepScheduler', algorithm_type: 'sde-dpmsolver++', use_karras_sigmas: true },
  'DPM++ 2S a Karras': { type: 'DPMSolverSinglestepScheduler', use_karras_sigmas: true },
  'DPM++ SDE': { type: 'DPMSolverSinglestepScheduler' },
  'DPM++ SDE Karras': { type: 'DPMSolverSinglestepScheduler', use_karras_sigmas: true },
  DPM2: { type: 'KDPM2DiscreteScheduler' },
  'DPM2 Karras': { type: 'KDPM2DiscreteScheduler', use_karras_sigmas: true },
  'DPM2 a': { type: 'KDPM2AncestralDiscreteScheduler' },
  'DPM2 a Karras': { type: 'KDPM2AncestralDiscreteScheduler', use_karras_sigmas: true },
  Euler: { type: 'EulerDiscreteScheduler' },
  'Euler a': { type: 'EulerAncestralDiscreteScheduler' },
  Heun: { type: 'HeunDiscreteScheduler' },
  LMS: { type: 'LMSDiscreteScheduler' },
  'LMS Karras': { type: 'LMSDiscreteScheduler', use_karras_sigmas: true },
  DDIM: { type: 'DDIMScheduler' },
  UniPC: { type: 'UniPCMultistepScheduler' },
} as const satisfies Record<string, { type: (typeof SCHEDULERS)[number]; use_karras_sigmas?: boolean; algorithm_type?: string }>;
export type SchedulerAlias = keyof typeof SCHEDULER_ALIASES;

export const ALGORITHM_TYPES = ['dpmsolver++', 'sde-dpmsolver++', 'dpmsolver', 'sde-dpmsolver'] as const;
export const TIMESTEP_SPACINGS = ['leading', 'trailing', 'linspace'] as const;

/**
 * Which options each scheduler accepts (checked against diffusers' constructors). The worker
 * reads the same table from the generated schedulers.json.
 */
export const SCHEDULER_OPTIONS: Record<(typeof SCHEDULERS)[number], { use_karras_sigmas: boolean; algorithm_types: readonly string[]; solver_order: boolean; timestep_spacing: boolean }> = {
  DPMSolverMultistepScheduler: { use_karras_sigmas: true, algorithm_types: ALGORITHM_TYPES, solver_order: true, timestep_spacing: true },
  DPMSolverSinglestepScheduler: { use_karras_sigmas: true, algorithm_types: ['dpmsolver++', 'dpmsolver', 'sde-dpmsolver++'], solver_order: true, timestep_spacing: false },
  DDIMScheduler: { use_karras_sigmas: false, algorithm_types: [], solver_order: false, timestep_spacing: true },
  EulerDiscreteScheduler: { use_karras_sigmas: true, algorithm_types: [], solver_order: false, timestep_spacing: true },
  EulerAncestralDiscreteScheduler: { use_karras_sigmas: false, algorithm_types: [], solver_order: false, timestep_spacing: true },
  HeunDiscreteScheduler: { use_karras_sigmas: true, algorithm_types: [], solver_order: false, timestep_spacing: true },
  LMSDiscreteScheduler: { use_karras_sigmas: true, algorithm_types: [], solver_order: false, timestep_spacing: true },
  KDPM2DiscreteScheduler: { use_karras_sigmas: true, algorithm_types: [], solver_order: false, timestep_spacing: true },
  KDPM2AncestralDiscreteScheduler: { use_karras_sigmas: true, algorithm_types: [], solver_order: false, timestep_spacing: true },
  UniPCMultistepScheduler: { use_karras_sigmas: true, algorithm_types: [], solver_order: true, timestep_spacing: true },
};

export const CONTROLNET_TYPES = ['canny', 'depth', 'openpose', 'lineart', 'scribble', 'normal', 'seg'] as const;
export const ControlNetType = z.enum(CONTROLNET_TYPES);
/** Control images the worker can preprocess itself (cheaply, with OpenCV); others come processed. */
export const PREPROCESSABLE: readonly (typeof CONTROLNET_TYPES)[number][] = ['canny'];

export const IMAGE_LIMITS = { maxBytes: 10 * 1024 * 1024, maxSide: 4096, maxPixels: 4096 * 4096 } as const;
const S3Key = z
  .string()
  .min(1)
  .max(512)
  .regex(/^[A-Za-z0-9/_.-]+$/, 'letters, digits, "/", "_", "." and "-" only')
  // no "." or ".." segment and no empty one: a key means one object, whatever the server does with paths
  .regex(/^(?!\/)(?!.*\/\/)(?!(?:.*\/)?\.{1,2}(?:\/|$))/, 'no empty, "." or ".." path segments');

/** An input image as a client may give it; the API fetches, validates and stores it. */
export const ImageRefInput = z
  .strictObject({
    url: z.url({ protocol: /^https?$/, error: 'must be an http(s) URL' }).max(2048).optional(),
    s3_key: S3Key.optional().describe('object key in S3_BUCKET'),
    base64: z
      .string()
      .min(1)
      .max(Math.ceil((IMAGE_LIMITS.maxBytes * 4) / 3) + 64, `must decode to at most ${IMAGE_LIMITS.maxBytes} bytes`)
      .optional()
      .describe('the image file, base64 (a data: URI prefix is allowed)'),
  })
  .refine((r) => [r.url, r.s3_key, r.base64].filter((v) => v !== undefined).length === 1, {
    message: 'give the image exactly one way: url, s3_key or base64',
    params: { rule: 'exactly_one' },
  });
export type ImageRefInput = z.infer<typeof ImageRefInput>;
/** An input image as the worker receives it: stored by the API, fetched by the agent. */
export const StoredImageRef = z.strictObject({ s3_key: S3Key });

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

const Fraction = z.number().min(0).max(1);

/**
 * Live previews: small images of the current estimate, sent to live followers (SSE) and never
 * stored. `maxBytes` bounds one encoded preview (the worker lowers its quality to fit, or skips it).
 */
export const PREVIEW_LIMITS = { minSide: 32, maxSide: 512, defaultSide: 256, maxBytes: 128 * 1024 } as const;
export const PreviewSpec = z.strictObject({
  every_n_steps: z.number().int().min(1).max(LIMITS.maxSteps).describe('a preview after every n-th denoising step of each stage (base, refiner)'),
  max_size: z
    .number()
    .int()
    .min(PREVIEW_LIMITS.minSide)
    .max(PREVIEW_LIMITS.maxSide)
    .default(PREVIEW_LIMITS.defaultSide)
    .describe('long side of a preview in pixels (never larger than the image)'),
});
export type PreviewSpec = z.output<typeof PreviewSpec>;

function requestSchema<I extends z.ZodType, T extends z.ZodType, Seed extends z.ZodType>(image: I, schedulerType: T, seed: Seed) {
  const Scheduler = z.strictObject({
    type: schedulerType.default('EulerDiscreteScheduler' as never),
    steps: z.number().int().min(1).max(LIMITS.maxSteps).default(30),
    use_karras_sigmas: z.boolean().optional(),
    algorithm_type: z.enum(ALGORITHM_TYPES).optional(),
    timestep_spacing: z.enum(TIMESTEP_SPACINGS).optional(),
    solver_order: z.number().int().min(1).max(3).optional(),
  });
  const Hyperparameters = z
    .strictObject({
      guidance_scale: z.number().min(0).max(LIMITS.maxGuidance).default(5),
      seed,
      width: Side.default(1024),
      height: Side.default(1024),
      num_images: z.number().int().min(1).max(LIMITS.maxImages).default(1),
    })
    .refine((h) => h.width * h.height <= LIMITS.maxPixels, { message: `width × height must be at most ${LIMITS.maxPixels} pixels`, path: ['width'] });
  const ModelName = Text.min(1).max(200);
  return z
    .strictObject({
      model: z.strictObject({
        base: ModelName.describe('model id, e.g. stabilityai/stable-diffusion-xl-base-1.0'),
        refiner: ModelName.optional().describe('refiner for the ensemble of experts, e.g. stabilityai/stable-diffusion-xl-refiner-1.0'),
        vae: ModelName.optional().describe('replaces the pipeline VAE, e.g. madebyollin/sdxl-vae-fp16-fix'),
      }),
      scheduler: Scheduler.prefault({}),
      // prefault: an absent object is parsed from {}, so its defaults fill in and its rules hold
      hyperparameters: Hyperparameters.prefault({} as never),
      refiner: z
        .strictObject({
          denoising_switch: z.number().min(0.5).max(0.99).default(0.8).describe('fraction of the noise schedule the base model runs'),
          steps: z.number().int().min(1).max(LIMITS.maxSteps).optional().describe('refiner steps; default scheduler.steps'),
        })
        .optional(),
      conditioning: z.strictObject({
        prompt: Text.trim().min(1, 'must not be empty').max(LIMITS.maxPromptChars),
        negative_prompt: Text.max(LIMITS.maxPromptChars).optional(),
      }),
      loras: z
        .array(z.strictObject({ name: ModelName, weight: z.number().min(-2).max(2).default(1) }))
        .max(8)
        .refine((l) => new Set(l.map((x) => x.name)).size === l.length, 'must not name a LoRA twice')
        .optional(),
      controlnets: z
        .array(
          z.strictObject({
            type: ControlNetType,
            model: ModelName.optional().describe('a ControlNet of this type; default: one a live agent has'),
            image,
            conditioning_scale: z.number().min(0).max(2).default(1),
            guidance_start: Fraction.default(0),
            guidance_end: Fraction.default(1),
            preprocess: z.boolean().default(false).describe('compute the control map from a plain image in the worker (canny)'),
          }),
        )
        .max(4)
        .optional(),
      image: z
        .strictObject({
          init: image.describe('img2img / inpainting source; resized to width × height'),
          mask: image.optional().describe('inpainting mask: white is repainted'),
          strength: z.number().gt(0).max(1).default(0.8),
        })
        .optional(),
      postprocess: z
        .strictObject({
          upscale: z.strictObject({ factor: z.literal([2, 4]), upscaler: ModelName.optional().describe('an upscaler model; default: the best available, else lanczos') }).optional(),
          safety_check: z.boolean().default(false),
        })
        .optional(),
      output: z
        .strictObject({
          format: z.enum(['png', 'jpeg', 'webp']).default('png'),
          quality: z.number().int().min(1).max(100).default(90).describe('jpeg and webp'),
          embed_metadata: z.boolean().default(true),
          previews: PreviewSpec.optional().describe('live previews of the first image as it forms, sent as `preview` events on the SSE streams, never stored'),
        })
        .prefault({}),
      performance: z
        .strictObject({
          dtype: z.enum(['fp16', 'bf16', 'fp32']).default('fp16'),
          attention_slicing: z.boolean().default(false),
          vae_slicing: z.boolean().default(false),
          vae_tiling: z.boolean().default(false),
          cpu_offload: z.enum(['none', 'model', 'sequential']).default('none'),
          channels_last: z.boolean().default(false),
          compile: z.boolean().default(false),
        })
        .optional(),
      priority: Priority.default('normal'),
      webhook: WebhookSpec.optional(),
      timeout_s: z.number().int().min(1).max(LIMITS.maxTimeoutS).default(600),
    })
    .superRefine((r, ctx) => {
      const issue = (path: (string | number)[], rule: string, message: string) =>
        ctx.addIssue({ code: 'custom', path, message, params: { rule } });
      const sched = r.scheduler as { type: string; use_karras_sigmas?: boolean; algorithm_type?: string; solver_order?: number };
      const alias = SCHEDULER_ALIASES[sched.type as SchedulerAlias] as { type: (typeof SCHEDULERS)[number] } | undefined;
      const canonical = alias?.type ?? (sched.type as (typeof SCHEDULERS)[number]);
      const opts = SCHEDULER_OPTIONS[canonical];
      if (opts) {
        if (sched.use_karras_sigmas && !opts.use_karras_sigmas) issue(['scheduler', 'use_karras_sigmas'], 'unsupported_option', `${canonical} has no Karras sigmas option`);
        if (sched.algorithm_type && !opts.algorithm_types.includes(sched.algorithm_type))
          issue(['scheduler', 'algorithm_type'], 'unsupported_option', opts.algorithm_types.length ? `${canonical} accepts ${opts.algorithm_types.join(', ')}` : `${canonical} has no algorithm_type option`);
        if ((sched as { timestep_spacing?: string }).timestep_spacing && !opts.timestep_spacing) issue(['scheduler', 'timestep_spacing'], 'unsupported_option', `${canonical} has no timestep_spacing option`);
        if (sched.solver_order !== undefined && !opts.solver_order) issue(['scheduler', 'solver_order'], 'unsupported_option', `${canonical} has no solver_order option`);
      }
      if (r.refiner && !r.model.refiner) issue(['refiner'], 'requires_model_refiner', 'set model.refiner to use refiner options');
      if (r.model.refiner && (r.controlnets?.length || r.image))
        issue(['model', 'refiner'], 'unsupported_combination', 'the refiner runs with text-to-image only, not with controlnets or image');
      const steps = (r.scheduler as { steps: number }).steps;
      if (r.image && Math.floor(steps * r.image.strength) < 1)
        issue(['image', 'strength'], 'no_denoising_steps', `${steps} steps × strength ${r.image.strength} leaves no denoising step (as in diffusers, img2img runs floor(steps × strength) steps); raise either`);
      r.controlnets?.forEach((c, i) => {
        if (c.guidance_start >= c.guidance_end) issue(['controlnets', i, 'guidance_end'], 'must_exceed_start', 'must be greater than guidance_start');
        if (c.preprocess && !PREPROCESSABLE.includes(c.type))
          issue(['controlnets', i, 'preprocess'], 'preprocess_unsupported', `the worker preprocesses ${PREPROCESSABLE.join(', ')} only; send an already processed ${c.type} map`);
      });
    });
}

/** The scheduler as a client may name it: a diffusers class or one of the familiar aliases. */
export const SchedulerName = z.enum([...SCHEDULERS, ...(Object.keys(SCHEDULER_ALIASES) as SchedulerAlias[])] as [string, ...string[]]);

export const GenerationRequest = requestSchema(ImageRefInput, SchedulerName, z.number().int().min(0).max(MAX_SEED).optional().describe('chosen at random and reported when absent'));
/** What a client sends. */
export type GenerationRequestInput = z.input<typeof GenerationRequest>;
/** A request as the API parsed it: defaults filled, seed maybe absent, images not yet stored. */
export type ParsedGenerationRequest = z.output<typeof GenerationRequest>;

/** The request as stored and as the worker receives it: canonical scheduler, seed chosen, images in S3. */
export const ResolvedGenerationRequest = requestSchema(StoredImageRef, SchedulerType, z.number().int().min(0).max(MAX_SEED));
export type GenerationRequest = z.output<typeof ResolvedGenerationRequest>;

/** Canonical scheduler spec: aliases become their class and options; explicit options win. */
export function resolveScheduler<S extends { type: string }>(s: S): S & { type: (typeof SCHEDULERS)[number] } {
  const alias = SCHEDULER_ALIASES[s.type as SchedulerAlias];
  if (!alias) return s as S & { type: (typeof SCHEDULERS)[number] };
  const { type, ...implied } = alias;
  return { ...implied, ...s, type } as S & { type: (typeof SCHEDULERS)[number] };
}

/** Every model a request needs resident (the suite), with the field that named it. */
export function suiteOf(r: Pick<GenerationRequest, 'model' | 'loras' | 'controlnets' | 'postprocess'>): { name: string; field: string }[] {
  const out = [{ name: r.model.base, field: 'model.base' }];
  if (r.model.refiner) out.push({ name: r.model.refiner, field: 'model.refiner' });
  if (r.model.vae) out.push({ name: r.model.vae, field: 'model.vae' });
  r.loras?.forEach((l, i) => out.push({ name: l.name, field: `loras.${i}.name` }));
  r.controlnets?.forEach((c, i) => c.model && out.push({ name: c.model, field: `controlnets.${i}.model` }));
  const up = r.postprocess?.upscale?.upscaler;
  if (up && up !== 'lanczos') out.push({ name: up, field: 'postprocess.upscale.upscaler' });
  return out;
}

/**
 * Working VRAM a request needs on top of its models (latents, activations, VAE decode),
 * about 1.2 GB per 1024×1024 image at fp16. Placement and the synthetic backend both use it.
 */
export const ACTIVATION_MB_PER_MEGAPIXEL = 1200;
export function activationVramMb(h: { width: number; height: number; num_images: number }): number {
  return Math.ceil((ACTIVATION_MB_PER_MEGAPIXEL * h.width * h.height * h.num_images) / (1024 * 1024));
}
