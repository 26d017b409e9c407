import { execFileSync } from 'node:child_process';
import { mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import type { z } from 'zod';
import {
  AgentToWorker,
  BatchRequest,
  CacheRequest,
  ErrorCode,
  faultClass,
  GenerationRequest,
  httpStatusFor,
  isRetryable,
  issuesToDetails,
  JSON_SCHEMA_DIR,
  PREVIEW_LIMITS,
  protocolJsonSchemas,
  renderJsonSchema,
  ResolvedGenerationRequest,
  resolveScheduler,
  suiteOf,
  TrainingRequest,
  trainingVramMb,
  WorkerToAgent,
} from './index.js';

const repoRoot = resolve(import.meta.dirname, '../../..');
const schemaDir = join(repoRoot, JSON_SCHEMA_DIR);
const samplesDir = resolve(import.meta.dirname, '../samples');
const invalidDir = join(samplesDir, 'invalid');
const python = join(repoRoot, 'workers-py/.venv/bin/python');

type Direction = 'agent-to-worker' | 'worker-to-agent';
const unions = { 'agent-to-worker': AgentToWorker, 'worker-to-agent': WorkerToAgent } as const;

interface Sample {
  file: string;
  path: string;
  direction: Direction;
  type: string;
  json: unknown;
}

function loadSamples(dir: string): Sample[] {
  return readdirSync(dir)
    .filter((f) => f.endsWith('.json'))
    .sort()
    .map((file) => {
      const m = /^(agent-to-worker|worker-to-agent)\.([a-z_]+)\.json$/.exec(file);
      if (!m) throw new Error(`sample ${file} must be named <direction>.<type>.json`);
      const path = join(dir, file);
      return { file, path, direction: m[1] as Direction, type: m[2]!, json: JSON.parse(readFileSync(path, 'utf8')) };
    });
}

const samples = loadSamples(samplesDir);
const invalidSamples = loadSamples(invalidDir);

/**
 * Validates each file with jsonschema's Draft202012Validator against the generated schema of
 * its direction, as the Python worker does. `valid` is the verdict of the whole schema; the
 * problems come from the branch for the message's type, so they name fields ("field: message").
 */
function pythonVerdicts(files: Sample[]): Record<string, { valid: boolean; problems: string[] }> {
  const script = `
import json, sys
from pathlib import Path
from jsonschema import Draft202012Validator
schema_dir = Path(sys.argv[1])
out = {}
for arg in sys.argv[2:]:
    direction, path = arg.split("=", 1)
    schema = json.loads((schema_dir / f"{direction}.json").read_text())
    message = json.loads(Path(path).read_text())
    branch = next((b for b in schema["oneOf"] if b["properties"]["type"].get("const") == message.get("type")), schema)
    branch_validator = Draft202012Validator({"$schema": schema["$schema"], **branch})
    out[path] = {
        "valid": Draft202012Validator(schema).is_valid(message),
        "problems": sorted(f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in branch_validator.iter_errors(message)),
    }
print(json.dumps(out))
`;
  const stdout = execFileSync(python, ['-c', script, schemaDir, ...files.map((s) => `${s.direction}=${s.path}`)], { encoding: 'utf8' });
  return JSON.parse(stdout) as Record<string, { valid: boolean; problems: string[] }>;
}

describe('generated JSON Schemas', () => {
  it('match what the contracts generate today, byte for byte', () => {
    const generated = protocolJsonSchemas();
    const onDisk = readdirSync(schemaDir).filter((f) => f.endsWith('.json')).sort();
    expect(onDisk, `${JSON_SCHEMA_DIR} has other files than the contracts generate; run \`npm run gen:schemas\``).toEqual(
      Object.keys(generated).sort(),
    );
    for (const [name, schema] of Object.entries(generated)) {
      const file = readFileSync(join(schemaDir, name), 'utf8');
      // toBe, not toEqual: a diff of two JSON texts is what the developer needs to see
      expect(file, `${JSON_SCHEMA_DIR}/${name} is stale; run \`npm run gen:schemas\``).toBe(renderJsonSchema(schema));
    }
  });
});

describe('protocol message samples', () => {
  it('cover every message type in both directions', () => {
    for (const direction of ['agent-to-worker', 'worker-to-agent'] as const) {
      const types = unions[direction].options.map((o) => o.shape.type.value).sort();
      const sampled = samples.filter((s) => s.direction === direction).map((s) => s.type).sort();
      expect(sampled, `packages/contracts/samples needs one ${direction}.<type>.json per message type`).toEqual(types);
    }
  });

  describe.each(samples.map((s) => [s.file, s] as const))('%s', (_file, sample) => {
    it('parses with the zod schema of its direction, unchanged, and matches its wire snapshot', async () => {
      const parsed = unions[sample.direction].parse(sample.json);
      expect(parsed.type).toBe(sample.type);
      expect(parsed).toEqual(sample.json); // nothing dropped or defaulted on the way
      // the frame as the agent would write it (zod emits keys in schema order)
      await expect(JSON.stringify(parsed, null, 2) + '\n').toMatchFileSnapshot(`./__snapshots__/protocol/${sample.file}`);
    });
  });

  it('all pass the Python side’s jsonschema validation against the generated schemas', () => {
    const verdicts = pythonVerdicts(samples);
    expect(Object.keys(verdicts)).toHaveLength(samples.length);
    const refused = Object.entries(verdicts).filter(([, v]) => !v.valid || v.problems.length > 0);
    expect(Object.fromEntries(refused)).toEqual({});
  });

  it('an invalid generate message is refused by both sides, each naming the bad fields', () => {
    expect(invalidSamples.length).toBeGreaterThan(0);
    const python = pythonVerdicts(invalidSamples);
    for (const sample of invalidSamples) {
      const zod = unions[sample.direction].safeParse(sample.json);
      expect(zod.success, `zod accepted ${sample.file}`).toBe(false);
      const details = issuesToDetails(zod.error!.issues);
      expect(details).toEqual(
        expect.arrayContaining([
          expect.objectContaining({ field: 'request.hyperparameters.width', rule: 'not_multiple_of' }),
          expect.objectContaining({ field: 'request.loras.0.scale', rule: 'unrecognized_keys' }),
          expect.objectContaining({ field: 'request.clip_skip', rule: 'unrecognized_keys' }),
        ]),
      );
      const py = python[sample.path]!;
      expect(py.valid, `Python accepted ${sample.file}`).toBe(false);
      expect(py.problems).toEqual(
        expect.arrayContaining([
          expect.stringMatching(/^request\.hyperparameters\.width: 1001 is not a multiple of 8/),
          expect.stringMatching(/^request\.loras\.0: Additional properties are not allowed \('scale' was unexpected\)/),
          expect.stringMatching(/^request: Additional properties are not allowed \('clip_skip' was unexpected\)/),
        ]),
      );
    }
  });
});

describe('preview messages', () => {
  const sample = samples.find((s) => s.file === 'worker-to-agent.preview.json')!;
  const dir = mkdtempSync(join(tmpdir(), 'kiln-preview-'));
  afterAll(() => rmSync(dir, { recursive: true, force: true }));
  const variant = (name: string, patch: Record<string, unknown>): Sample => {
    const path = join(dir, `worker-to-agent.preview-${name}.json`);
    const json = { ...(sample.json as object), ...patch };
    writeFileSync(path, JSON.stringify(json));
    return { file: `worker-to-agent.preview-${name}.json`, path, direction: 'worker-to-agent', type: 'preview', json };
  };

  it('both sides refuse a preview over the size bound, one that is not base64, and one outside a denoising stage', () => {
    const bad = [
      variant('too-big', { data: 'A'.repeat(Math.ceil(PREVIEW_LIMITS.maxBytes / 3) * 4 + 4) }),
      variant('not-base64', { data: 'not base64!' }),
      variant('wide', { width: PREVIEW_LIMITS.maxSide + 1 }),
      variant('stage', { stage: 'upscale' }),
    ];
    const python = pythonVerdicts(bad);
    for (const s of bad) {
      expect(WorkerToAgent.safeParse(s.json).success, `zod accepted ${s.file}`).toBe(false);
      expect(python[s.path]!.valid, `Python accepted ${s.file}`).toBe(false);
    }
    const fits = variant('fits', { data: 'A'.repeat(Math.ceil(PREVIEW_LIMITS.maxBytes / 3) * 4) });
    expect(WorkerToAgent.safeParse(fits.json).success).toBe(true);
    expect(pythonVerdicts([fits])[fits.path]).toEqual({ valid: true, problems: [] });
  });
});

describe('error codes', () => {
  // The API's status and the retry decision for every code, as a user or operator sees them.
  const expected: Record<ErrorCode, { retryable: boolean; status: number }> = {
    validation_failed: { retryable: false, status: 400 },
    unauthorized: { retryable: false, status: 401 },
    forbidden: { retryable: false, status: 403 },
    rate_limited: { retryable: false, status: 429 },
    quota_exceeded: { retryable: false, status: 429 },
    idempotency_mismatch: { retryable: false, status: 422 },
    request_timeout: { retryable: false, status: 408 },
    uri_too_long: { retryable: false, status: 414 },
    headers_too_large: { retryable: false, status: 431 },
    unsupported_media_type: { retryable: false, status: 415 },
    not_found: { retryable: false, status: 404 },
    conflict: { retryable: false, status: 409 },
    payload_too_large: { retryable: false, status: 413 },
    unschedulable: { retryable: false, status: 422 },
    unavailable: { retryable: true, status: 503 },
    internal: { retryable: false, status: 500 },
    invalid_request: { retryable: false, status: 400 },
    model_not_found: { retryable: false, status: 404 },
    out_of_memory: { retryable: true, status: 500 },
    worker_crashed: { retryable: true, status: 500 },
    worker_protocol: { retryable: true, status: 500 },
    agent_lost: { retryable: true, status: 503 },
    storage_failed: { retryable: true, status: 503 },
    timeout: { retryable: false, status: 504 },
    canceled: { retryable: false, status: 409 },
    max_attempts_exceeded: { retryable: false, status: 500 },
    integrity_failed: { retryable: false, status: 500 },
  };

  it('every code has a retry decision and an HTTP error status', () => {
    expect(Object.keys(expected).sort()).toEqual([...ErrorCode.options].sort());
    for (const code of ErrorCode.options) {
      expect({ code, retryable: isRetryable(code), status: httpStatusFor(code) }).toEqual({ code, ...expected[code] });
    }
  });

  it('only a job\'s own failures spend its attempts; infrastructure faults are retried without counting', () => {
    const of = (cls: string) => ErrorCode.options.filter((c) => faultClass(c) === cls).sort();
    expect(of('job')).toEqual(['out_of_memory', 'worker_crashed', 'worker_protocol']);
    expect(of('infra')).toEqual(['agent_lost', 'storage_failed', 'unavailable']);
    for (const code of ErrorCode.options) expect(isRetryable(code)).toBe(faultClass(code) !== 'final');
  });

  it('the Python worker decides retryability the same way for every code', () => {
    const stdout = execFileSync(python, ['-c', 'import json; from kiln_worker.errors import RETRYABLE_CODES as r, NON_RETRYABLE_CODES as n; print(json.dumps({"retryable": sorted(r), "not": sorted(n)}))'], {
      cwd: join(repoRoot, 'workers-py'),
      encoding: 'utf8',
    });
    const py = JSON.parse(stdout) as { retryable: string[]; not: string[] };
    expect(py.retryable).toEqual(ErrorCode.options.filter((c) => isRetryable(c)).sort());
    expect(py.not).toEqual(ErrorCode.options.filter((c) => !isRetryable(c)).sort());
  });
});

describe('GenerationRequest validation', () => {
  const valid = { model: { base: 'stabilityai/stable-diffusion-xl-base-1.0' }, conditioning: { prompt: 'a kiln at dusk' } };
  const initImage = { s3_key: 'inputs/job-1/init.png' };

  it('accepts a minimal request and fills the defaults', () => {
    expect(GenerationRequest.parse(valid)).toEqual({
      model: valid.model,
      scheduler: { type: 'EulerDiscreteScheduler', steps: 30 },
      hyperparameters: { guidance_scale: 5, width: 1024, height: 1024, num_images: 1 },
      conditioning: { prompt: 'a kiln at dusk' },
      output: { format: 'png', quality: 90, embed_metadata: true },
      priority: 'normal',
      timeout_s: 600,
    });
  });

  it('fills the defaults inside the optional sections a request names', () => {
    const parsed = GenerationRequest.parse({
      ...valid,
      scheduler: { type: 'DPM++ 2M Karras' },
      loras: [{ name: 'kiln/lora-watercolor' }],
      controlnets: [{ type: 'canny', image: { url: 'https://images.example.com/edges.png' } }],
      postprocess: { upscale: { factor: 2 } },
      performance: {},
      output: { format: 'jpeg' },
    });
    expect(parsed.scheduler).toEqual({ type: 'DPM++ 2M Karras', steps: 30 });
    expect(parsed.loras).toEqual([{ name: 'kiln/lora-watercolor', weight: 1 }]);
    expect(parsed.controlnets).toEqual([
      { type: 'canny', image: { url: 'https://images.example.com/edges.png' }, conditioning_scale: 1, guidance_start: 0, guidance_end: 1, preprocess: false },
    ]);
    expect(parsed.postprocess).toEqual({ upscale: { factor: 2 }, safety_check: false });
    expect(parsed.performance).toEqual({ dtype: 'fp16', attention_slicing: false, vae_slicing: false, vae_tiling: false, cpu_offload: 'none', channels_last: false, compile: false });
    expect(parsed.output).toEqual({ format: 'jpeg', quality: 90, embed_metadata: true });
  });

  it('accepts the options a scheduler does support', () => {
    const result = GenerationRequest.safeParse({
      ...valid,
      scheduler: { type: 'DPMSolverMultistepScheduler', use_karras_sigmas: true, algorithm_type: 'sde-dpmsolver++', solver_order: 2, timestep_spacing: 'trailing' },
    });
    expect(result.error?.issues).toBeUndefined();
  });

  it.each([
    ['width not a multiple of 8', { hyperparameters: { width: 1001 } }, 'hyperparameters.width', 'not_multiple_of'],
    ['width too large', { hyperparameters: { width: 4096 } }, 'hyperparameters.width', 'too_big'],
    ['zero steps', { scheduler: { steps: 0 } }, 'scheduler.steps', 'too_small'],
    ['guidance above 30', { hyperparameters: { guidance_scale: 30.5 } }, 'hyperparameters.guidance_scale', 'too_big'],
    ['an empty prompt', { conditioning: { prompt: '   ' } }, 'conditioning.prompt', 'too_small'],
    ['an unknown top-level field', { clip_skip: 2 }, 'clip_skip', 'unrecognized_keys'],
    ['an unknown nested field', { hyperparameters: { clip_skip: 2 } }, 'hyperparameters.clip_skip', 'unrecognized_keys'],
    ['an unknown scheduler', { scheduler: { type: 'PNDMScheduler' } }, 'scheduler.type', 'invalid_value'],
    ['a webhook URL that is not http(s)', { webhook: { url: 'ftp://hooks.example.com/kiln' } }, 'webhook.url', 'invalid_format'],
    ['a webhook event listed twice', { webhook: { url: 'https://hooks.example.com/kiln', events: ['completed', 'completed'] } }, 'webhook.events', 'custom'],
    ['Karras sigmas on EulerAncestralDiscreteScheduler', { scheduler: { type: 'EulerAncestralDiscreteScheduler', use_karras_sigmas: true } }, 'scheduler.use_karras_sigmas', 'unsupported_option'],
    ['Karras sigmas on the alias "Euler a"', { scheduler: { type: 'Euler a', use_karras_sigmas: true } }, 'scheduler.use_karras_sigmas', 'unsupported_option'],
    ['an algorithm_type on EulerDiscreteScheduler', { scheduler: { type: 'EulerDiscreteScheduler', algorithm_type: 'dpmsolver++' } }, 'scheduler.algorithm_type', 'unsupported_option'],
    ['sde-dpmsolver on DPMSolverSinglestepScheduler', { scheduler: { type: 'DPMSolverSinglestepScheduler', algorithm_type: 'sde-dpmsolver' } }, 'scheduler.algorithm_type', 'unsupported_option'],
    ['a solver_order on DDIMScheduler', { scheduler: { type: 'DDIMScheduler', solver_order: 2 } }, 'scheduler.solver_order', 'unsupported_option'],
    ['a timestep_spacing on DPMSolverSinglestepScheduler', { scheduler: { type: 'DPMSolverSinglestepScheduler', timestep_spacing: 'trailing' } }, 'scheduler.timestep_spacing', 'unsupported_option'],
    ['an image given two ways', { image: { init: { url: 'https://images.example.com/a.png', base64: 'iVBORw0KGgo=' } } }, 'image.init', 'exactly_one'],
    ['an image given no way', { controlnets: [{ type: 'canny', image: {} }] }, 'controlnets.0.image', 'exactly_one'],
    ['an image URL that is not http(s)', { image: { init: { url: 'file:///etc/passwd' } } }, 'image.init.url', 'invalid_format'],
    ['refiner options without model.refiner', { refiner: { denoising_switch: 0.7 } }, 'refiner', 'requires_model_refiner'],
    [
      'a refiner with img2img',
      { model: { base: 'stabilityai/stable-diffusion-xl-base-1.0', refiner: 'stabilityai/stable-diffusion-xl-refiner-1.0' }, image: { init: initImage } },
      'model.refiner',
      'unsupported_combination',
    ],
    ['img2img whose floor(steps × strength) is 0', { scheduler: { steps: 3 }, image: { init: initImage, strength: 0.3 } }, 'image.strength', 'no_denoising_steps'],
    ['a LoRA named twice', { loras: [{ name: 'kiln/lora-watercolor' }, { name: 'kiln/lora-watercolor', weight: 0.5 }] }, 'loras', 'custom'],
    ['a LoRA weight above 2', { loras: [{ name: 'kiln/lora-watercolor', weight: 2.5 }] }, 'loras.0.weight', 'too_big'],
    ['a ControlNet whose guidance ends before it starts', { controlnets: [{ type: 'depth', image: initImage, guidance_start: 0.6, guidance_end: 0.4 }] }, 'controlnets.0.guidance_end', 'must_exceed_start'],
    ['preprocessing a depth map', { controlnets: [{ type: 'depth', image: initImage, preprocess: true }] }, 'controlnets.0.preprocess', 'preprocess_unsupported'],
    ['an upscale factor of 3', { postprocess: { upscale: { factor: 3 } } }, 'postprocess.upscale.factor', 'invalid_value'],
    ['an output format Kiln cannot write', { output: { format: 'gif' } }, 'output.format', 'invalid_value'],
    ['an unknown dtype', { performance: { dtype: 'int8' } }, 'performance.dtype', 'invalid_value'],
    ['previews every 0 steps', { output: { previews: { every_n_steps: 0 } } }, 'output.previews.every_n_steps', 'too_small'],
    ['previews every 1.5 steps', { output: { previews: { every_n_steps: 1.5 } } }, 'output.previews.every_n_steps', 'invalid_type'],
    ['previews larger than 512 px', { output: { previews: { every_n_steps: 5, max_size: 1024 } } }, 'output.previews.max_size', 'too_big'],
    ['previews without every_n_steps', { output: { previews: { max_size: 128 } } }, 'output.previews.every_n_steps', 'invalid_type'],
    ['an unknown previews option', { output: { previews: { every_n_steps: 5, format: 'gif' } } }, 'output.previews.format', 'unrecognized_keys'],
  ])('refuses %s, naming the field and rule', (_what, patch, field, rule) => {
    const result = GenerationRequest.safeParse({ ...valid, ...patch });
    expect(result.success).toBe(false);
    const details = issuesToDetails(result.error!.issues);
    expect(details).toEqual([expect.objectContaining({ field, rule })]);
    expect(details[0]!.message.length).toBeGreaterThan(0);
  });

  it('previews are off unless asked for; asked for, their size defaults to 256 px', () => {
    expect(GenerationRequest.parse(valid).output.previews).toBeUndefined();
    expect(GenerationRequest.parse({ ...valid, output: { previews: { every_n_steps: 5 } } }).output).toEqual({
      format: 'png',
      quality: 90,
      embed_metadata: true,
      previews: { every_n_steps: 5, max_size: 256 },
    });
  });

  it('img2img runs when floor(steps × strength) is at least one step', () => {
    expect(GenerationRequest.safeParse({ ...valid, scheduler: { steps: 4 }, image: { init: initImage, strength: 0.25 } }).success).toBe(true);
  });

  it('reports every problem of one request, not just the first', () => {
    const result = GenerationRequest.safeParse({
      ...valid,
      scheduler: { steps: 0 },
      hyperparameters: { width: 1001, guidance_scale: 99 },
      loras: [{ name: 'kiln/lora-watercolor', weight: 3 }],
    });
    const fields = issuesToDetails(result.error!.issues).map((d) => d.field).sort();
    expect(fields).toEqual(['hyperparameters.guidance_scale', 'hyperparameters.width', 'loras.0.weight', 'scheduler.steps']);
  });

  it('the resolved request (what the worker gets) takes canonical scheduler classes only, and a seed', () => {
    const resolved = { ...valid, hyperparameters: { seed: 7 }, scheduler: { type: 'DPMSolverMultistepScheduler' } };
    expect(ResolvedGenerationRequest.safeParse(resolved).success).toBe(true);
    const alias = ResolvedGenerationRequest.safeParse({ ...resolved, scheduler: { type: 'DPM++ 2M Karras' } });
    expect(issuesToDetails(alias.error!.issues)).toEqual([expect.objectContaining({ field: 'scheduler.type', rule: 'invalid_value' })]);
    // (with hyperparameters given: an omitted section takes its default as is, without a seed — see the report)
    const noSeed = ResolvedGenerationRequest.safeParse({ ...valid, hyperparameters: {} });
    expect(issuesToDetails(noSeed.error!.issues)).toEqual([expect.objectContaining({ field: 'hyperparameters.seed' })]);
    const url = ResolvedGenerationRequest.safeParse({ ...resolved, image: { init: { url: 'https://images.example.com/a.png' } } });
    expect(issuesToDetails(url.error!.issues).map((d) => d.field)).toContain('image.init.url');
  });
});

describe('resolveScheduler', () => {
  it('turns an alias into its diffusers class and the options it implies', () => {
    expect(resolveScheduler({ type: 'DPM++ 2M SDE Karras', steps: 25 })).toEqual({
      type: 'DPMSolverMultistepScheduler',
      algorithm_type: 'sde-dpmsolver++',
      use_karras_sigmas: true,
      steps: 25,
    });
    expect(resolveScheduler({ type: 'Euler a', steps: 30 })).toEqual({ type: 'EulerAncestralDiscreteScheduler', steps: 30 });
  });

  it('lets options the client gave explicitly win over those the alias implies', () => {
    expect(resolveScheduler({ type: 'DPM++ 2M Karras', steps: 30, use_karras_sigmas: false })).toEqual({
      type: 'DPMSolverMultistepScheduler',
      steps: 30,
      use_karras_sigmas: false,
    });
  });

  it('leaves a diffusers class name as it is', () => {
    const s = { type: 'UniPCMultistepScheduler', steps: 20, solver_order: 2 };
    expect(resolveScheduler(s)).toEqual(s);
  });
});

describe('suiteOf', () => {
  it('lists every model a request needs, each with the field that named it', () => {
    const r = ResolvedGenerationRequest.parse({
      model: { base: 'stabilityai/stable-diffusion-xl-base-1.0', refiner: 'stabilityai/stable-diffusion-xl-refiner-1.0', vae: 'madebyollin/sdxl-vae-fp16-fix' },
      conditioning: { prompt: 'a kiln at dusk' },
      hyperparameters: { seed: 1 },
      loras: [{ name: 'kiln/lora-watercolor' }, { name: 'kiln/lora-pixel-art', weight: 0.5 }],
      postprocess: { upscale: { factor: 4, upscaler: 'ai-forever/Real-ESRGAN-x4' } },
    });
    expect(suiteOf(r)).toEqual([
      { name: 'stabilityai/stable-diffusion-xl-base-1.0', field: 'model.base' },
      { name: 'stabilityai/stable-diffusion-xl-refiner-1.0', field: 'model.refiner' },
      { name: 'madebyollin/sdxl-vae-fp16-fix', field: 'model.vae' },
      { name: 'kiln/lora-watercolor', field: 'loras.0.name' },
      { name: 'kiln/lora-pixel-art', field: 'loras.1.name' },
      { name: 'ai-forever/Real-ESRGAN-x4', field: 'postprocess.upscale.upscaler' },
    ]);
  });

  it('lists ControlNets that name a model, and no model for lanczos or a default upscaler', () => {
    const r = ResolvedGenerationRequest.parse({
      model: { base: 'stabilityai/sdxl-turbo' },
      conditioning: { prompt: 'a kiln at dusk' },
      hyperparameters: { seed: 1 },
      controlnets: [
        { type: 'canny', image: { s3_key: 'inputs/c0.png' } },
        { type: 'depth', model: 'diffusers/controlnet-depth-sdxl-1.0', image: { s3_key: 'inputs/c1.png' } },
      ],
      postprocess: { upscale: { factor: 2, upscaler: 'lanczos' } },
    });
    expect(suiteOf(r)).toEqual([
      { name: 'stabilityai/sdxl-turbo', field: 'model.base' },
      { name: 'diffusers/controlnet-depth-sdxl-1.0', field: 'controlnets.1.model' },
    ]);
    expect(suiteOf({ model: { base: 'stabilityai/sdxl-turbo' }, postprocess: { upscale: { factor: 2 }, safety_check: false } })).toEqual([
      { name: 'stabilityai/sdxl-turbo', field: 'model.base' },
    ]);
  });
});

describe('the other job kinds', () => {
  const training = {
    base_model: 'stabilityai/stable-diffusion-xl-base-1.0',
    dataset: { s3_prefix: 'datasets/kilns/' },
    output: { name: 'acme/kilns-v1' },
  };

  it('accept a minimal request of each kind and fill the defaults', () => {
    expect(BatchRequest.parse({ items: [{ conditioning: { prompt: 'a' } }] })).toEqual({ defaults: {}, items: [{ conditioning: { prompt: 'a' } }], priority: 'normal' });
    expect(CacheRequest.parse({ models: { base: 'stabilityai/sdxl-turbo' } })).toEqual({
      models: { base: 'stabilityai/sdxl-turbo' },
      target: { all: true },
      location: 'vram',
      pin: false,
    });
    // hyperparameters given as {}: omitted entirely, zod takes the section's default `{}` without filling it
    expect(TrainingRequest.parse({ ...training, hyperparameters: {} })).toEqual({
      ...training,
      hyperparameters: {
        rank: 16,
        learning_rate: 1e-4,
        steps: 1000,
        batch_size: 1,
        gradient_accumulation: 1,
        resolution: 1024,
        train_text_encoder: false,
        checkpoint_every: 100,
      },
      priority: 'normal',
      timeout_s: 24 * 3600,
    });
  });

  it.each([
    ['a batch with no items', BatchRequest, { items: [] }, 'items', 'too_small'],
    ['a batch with an unknown field', BatchRequest, { items: [{}], parallelism: 4 }, 'parallelism', 'unrecognized_keys'],
    ['a cache request naming no model', CacheRequest, { models: { loras: [] } }, 'models', 'required'],
    ['a cache request for an unknown location', CacheRequest, { models: { base: 'stabilityai/sdxl-turbo' }, location: 'disk' }, 'location', 'invalid_value'],
    ['a training dataset given two ways', TrainingRequest, { ...training, dataset: { s3_prefix: 'datasets/kilns/', manifest: 'datasets/kilns.json' } }, 'dataset', 'exactly_one'],
    ['a training resolution not a multiple of 64', TrainingRequest, { ...training, hyperparameters: { resolution: 1000 } }, 'hyperparameters.resolution', 'not_multiple_of'],
    ['a LoRA output name with two slashes', TrainingRequest, { ...training, output: { name: 'acme/kilns/v1' } }, 'output.name', 'invalid_format'],
  ] as const)('refuses %s, naming the field and rule', (_what, schema, body, field, rule) => {
    const result = (schema as z.ZodType).safeParse(body);
    expect(result.success).toBe(false);
    expect(issuesToDetails(result.error!.issues)).toEqual([expect.objectContaining({ field, rule })]);
  });
});

describe('absent sections are parsed, not copied', () => {
  it('a training request without hyperparameters gets every default', () => {
    const r = TrainingRequest.parse({ base_model: 'b', dataset: { s3_prefix: 'd/' }, output: { name: 'n' } });
    expect(r.hyperparameters).toMatchObject({ rank: 16, steps: 1000, batch_size: 1, resolution: 1024, checkpoint_every: 100, train_text_encoder: false });
    expect(Number.isFinite(trainingVramMb(r))).toBe(true);
  });

  it('a resolved generation request without hyperparameters is refused: the seed is required', () => {
    const r = ResolvedGenerationRequest.safeParse({ model: { base: 'b' }, conditioning: { prompt: 'p' } });
    expect(r.success).toBe(false);
    expect(r.error!.issues.map((i) => i.path.join('.'))).toContain('hyperparameters.seed');
  });

  it('an upscale factor of 3 names both allowed values', () => {
    const r = GenerationRequest.safeParse({ model: { base: 'b' }, conditioning: { prompt: 'p' }, postprocess: { upscale: { factor: 3 } } });
    expect(r.error!.issues[0]!.message).toContain('2|4');
  });
});
