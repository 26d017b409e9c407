import { execFileSync } from 'node:child_process';
import { readdirSync, readFileSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { describe, expect, it } from 'vitest';
import {
  AgentToWorker,
  ErrorCode,
  GenerationRequest,
  httpStatusFor,
  isRetryable,
  issuesToDetails,
  JSON_SCHEMA_DIR,
  protocolJsonSchemas,
  renderJsonSchema,
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
          expect.objectContaining({ field: 'request.loras', rule: 'unrecognized_keys' }),
        ]),
      );
      const py = python[sample.path]!;
      expect(py.valid, `Python accepted ${sample.file}`).toBe(false);
      expect(py.problems).toEqual(
        expect.arrayContaining([
          expect.stringMatching(/^request\.hyperparameters\.width: 1001 is not a multiple of 8/),
          expect.stringMatching(/^request: Additional properties are not allowed \('loras' was unexpected\)/),
        ]),
      );
    }
  });
});

describe('error codes', () => {
  // The API's status and the retry decision for every code, as a user or operator sees them.
  const expected: Record<ErrorCode, { retryable: boolean; status: number }> = {
    validation_failed: { retryable: false, status: 400 },
    unauthorized: { retryable: false, status: 401 },
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
  };

  it('every code has a retry decision and an HTTP error status', () => {
    expect(Object.keys(expected).sort()).toEqual([...ErrorCode.options].sort());
    for (const code of ErrorCode.options) {
      expect({ code, retryable: isRetryable(code), status: httpStatusFor(code) }).toEqual({ code, ...expected[code] });
    }
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

  it('accepts a minimal request and fills the defaults', () => {
    expect(GenerationRequest.parse(valid)).toEqual({
      model: valid.model,
      scheduler: { type: 'EulerDiscreteScheduler', steps: 30 },
      hyperparameters: { guidance_scale: 5, width: 1024, height: 1024, num_images: 1 },
      conditioning: { prompt: 'a kiln at dusk' },
      output: { format: 'png' },
      priority: 'normal',
      timeout_s: 600,
    });
  });

  it.each([
    ['width not a multiple of 8', { hyperparameters: { width: 1001 } }, 'hyperparameters.width', 'not_multiple_of'],
    ['width too large', { hyperparameters: { width: 4096 } }, 'hyperparameters.width', 'too_big'],
    ['zero steps', { scheduler: { steps: 0 } }, 'scheduler.steps', 'too_small'],
    ['guidance above 30', { hyperparameters: { guidance_scale: 30.5 } }, 'hyperparameters.guidance_scale', 'too_big'],
    ['an empty prompt', { conditioning: { prompt: '   ' } }, 'conditioning.prompt', 'too_small'],
    ['an unknown top-level field', { loras: [{ name: 'pixel-art' }] }, 'loras', 'unrecognized_keys'],
    ['an unknown nested field', { hyperparameters: { clip_skip: 2 } }, 'hyperparameters.clip_skip', 'unrecognized_keys'],
    ['a webhook URL that is not http(s)', { webhook: { url: 'ftp://hooks.example.com/kiln' } }, 'webhook.url', 'invalid_format'],
    ['a webhook event listed twice', { webhook: { url: 'https://hooks.example.com/kiln', events: ['completed', 'completed'] } }, 'webhook.events', 'custom'],
  ])('refuses %s, naming the field and rule', (_what, patch, field, rule) => {
    const result = GenerationRequest.safeParse({ ...valid, ...patch });
    expect(result.success).toBe(false);
    const details = issuesToDetails(result.error!.issues);
    expect(details).toEqual([expect.objectContaining({ field, rule })]);
    expect(details[0]!.message.length).toBeGreaterThan(0);
  });

  it('reports every problem of one request, not just the first', () => {
    const result = GenerationRequest.safeParse({
      ...valid,
      scheduler: { steps: 0 },
      hyperparameters: { width: 1001, guidance_scale: 99 },
      loras: [],
    });
    const fields = issuesToDetails(result.error!.issues).map((d) => d.field).sort();
    expect(fields).toEqual(['hyperparameters.guidance_scale', 'hyperparameters.width', 'loras', 'scheduler.steps']);
  });
});
