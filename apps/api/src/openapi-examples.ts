/**
 * Request bodies shown in the OpenAPI document and on /docs, taken from the README's examples,
 * keyed by operation (`METHOD /path`). tests/openapi.e2e.test.ts checks that each one is a valid
 * request, so the documentation cannot drift from what the API accepts.
 */

const BASE = 'stabilityai/stable-diffusion-xl-base-1.0';

export const REQUEST_EXAMPLES: Record<string, Record<string, { summary: string; value: unknown }>> = {
  'POST /v1/generations': {
    walkthrough: {
      summary: 'The walk-through: one 512² image, 4 steps',
      value: {
        model: { base: BASE },
        scheduler: { type: 'EulerDiscreteScheduler', steps: 4 },
        hyperparameters: { guidance_scale: 5.0, seed: 7, width: 512, height: 512, num_images: 1 },
        conditioning: { prompt: 'a lighthouse at dusk', negative_prompt: 'blurry' },
        output: { format: 'png' },
      },
    },
    refiner: {
      summary: 'Base + refiner (ensemble of experts), custom VAE, an alias scheduler',
      value: {
        model: { base: BASE, refiner: 'stabilityai/stable-diffusion-xl-refiner-1.0', vae: 'madebyollin/sdxl-vae-fp16-fix' },
        scheduler: { type: 'DPM++ 2M Karras', steps: 30 },
        refiner: { denoising_switch: 0.8, steps: 20 },
        conditioning: { prompt: 'a lighthouse at dusk, detailed' },
      },
    },
    loras: {
      summary: 'Two LoRAs',
      value: {
        model: { base: BASE },
        loras: [
          { name: 'kiln/lora-pixel-art', weight: 0.8 },
          { name: 'kiln/lora-watercolor', weight: 0.4 },
        ],
        conditioning: { prompt: 'a fox' },
      },
    },
    controlnets: {
      summary: 'Two ControlNets: canny computed in the worker, depth given as a map',
      value: {
        model: { base: BASE },
        conditioning: { prompt: 'a glass house' },
        controlnets: [
          { type: 'canny', image: { url: 'https://example.com/house.jpg' }, preprocess: true, conditioning_scale: 0.7 },
          { type: 'depth', image: { s3_key: 'tenants/acme/uploads/house-depth.png' }, guidance_end: 0.6 },
        ],
      },
    },
    img2img: {
      summary: 'img2img from an uploaded image (POST /v1/uploads gives the s3_key)',
      value: { model: { base: BASE }, conditioning: { prompt: 'the same scene in winter' }, image: { init: { s3_key: 'tenants/acme/uploads/scene.png' }, strength: 0.6 } },
    },
    upscaled: {
      summary: 'Four images, upscaled ×4, safety-checked, as webp',
      value: {
        model: { base: BASE },
        conditioning: { prompt: 'a city at night' },
        hyperparameters: { num_images: 4, seed: 100 },
        postprocess: { upscale: { factor: 4 }, safety_check: true },
        output: { format: 'webp', quality: 85 },
      },
    },
  },
  'POST /v1/batches': {
    two: {
      summary: 'Two prompts over shared defaults',
      value: {
        defaults: { model: { base: BASE }, scheduler: { steps: 20 } },
        items: [{ conditioning: { prompt: 'a red kiln' } }, { conditioning: { prompt: 'a blue kiln' } }],
      },
    },
  },
  'POST /v1/cache': {
    pinned: {
      summary: 'Load and pin a suite on one agent',
      value: {
        models: { base: 'stabilityai/sdxl-turbo', vae: 'madebyollin/sdxl-vae-fp16-fix', loras: ['kiln/lora-pixel-art'] },
        target: { replicas: 1 },
        location: 'vram',
        pin: true,
      },
    },
  },
  'DELETE /v1/cache': {
    evict: { summary: 'Evict (and unpin) a model everywhere', value: { models: ['stabilityai/sdxl-turbo'] } },
  },
  'POST /v1/trainings': {
    prefix: {
      summary: 'A LoRA from images and same-named .txt captions under a prefix',
      value: {
        base_model: BASE,
        dataset: { s3_prefix: 'tenants/acme/uploads/kilns/' },
        output: { name: 'team/kiln-style' },
        hyperparameters: { rank: 16, steps: 1500, learning_rate: 0.0001, resolution: 1024, checkpoint_every: 250 },
      },
    },
  },
  'POST /v1/loras/share': {
    share: { summary: "Share a tenant's LoRA with every tenant", value: { name: 'acme/team/kiln-style' } },
  },
  'POST /v1/admin/self-tests': {
    one_agent: {
      summary: 'The GPU check on one agent: every check, a short benchmark',
      value: { agents: ['gpu-0'], checks: ['environment', 'models', 'benchmark'], benchmark: { size: 1024, steps: 30, schedulers: ['EulerDiscreteScheduler', 'DPMSolverMultistepScheduler'] }, timeout_s: 900 },
    },
    validate_only: {
      summary: 'Every live agent: environment and model files only, no benchmark',
      value: { agents: 'all', checks: ['environment', 'models'] },
    },
  },
};
