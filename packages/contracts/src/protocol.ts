import { z } from 'zod';
import { WorkerCapabilities, WorkerState } from './agent.js';
import { JobError } from './errors.js';
import { SafetyVerdict, Upscaled } from './job.js';
import { MAX_SEED, PREVIEW_LIMITS, ResolvedGenerationRequest } from './generation.js';
import { ResolvedTrainingRequest, SELF_TEST_CHECKS, SelfTestBenchmark, SelfTestReport } from './kinds.js';

/**
 * Agent ↔ worker protocol, version 1: one JSON object per line on the worker's stdin/stdout.
 *
 * - Every message carries `v` and the `id` of the request it belongs to.
 * - Requests (agent → worker): hello, generate, load, unload, train, shutdown. `cancel` names
 *   the request to stop.
 * - Each request gets exactly one final message (hello → ready, generate → result | error,
 *   load/unload → loaded | error, train → trained | error, shutdown → bye), after any log,
 *   progress, preview and checkpoint messages for it.
 * - Images never cross the pipe: the worker writes them into `job_dir` and returns paths. The one
 *   exception is a `preview` (when the request asks for them): a small, bounded image inline,
 *   because it is sent on and dropped, never stored.
 */
export const PROTOCOL_VERSION = 1 as const;
const v = z.literal(PROTOCOL_VERSION);
const id = z.string().min(1).max(200);

export const HelloMessage = z.strictObject({
  v,
  type: z.literal('hello'),
  id,
  agent_id: z.string(),
  gpu_id: z.string(),
});
export const GenerateMessage = z.strictObject({
  v,
  type: z.literal('generate'),
  id,
  job_id: z.string(),
  attempt: z.number().int().min(1),
  job_dir: z.string().describe('absolute directory the worker writes outputs into'),
  files: z.record(z.string(), z.string()).describe("local paths of the request's input images, by s3_key (the agent downloads them)"),
  request: ResolvedGenerationRequest,
});
export const LoadMessage = z.strictObject({
  v,
  type: z.literal('load'),
  id,
  models: z.array(z.string()).min(1),
  location: z.enum(['vram', 'ram']),
  pin: z.boolean(),
});
export const UnloadMessage = z.strictObject({ v, type: z.literal('unload'), id, models: z.array(z.string()).min(1) });
export const TrainMessage = z.strictObject({
  v,
  type: z.literal('train'),
  id,
  job_id: z.string(),
  attempt: z.number().int().min(1),
  job_dir: z.string().describe('absolute directory for checkpoints and the result'),
  dataset_dir: z.string().describe('the dataset images as <index>.<ext>, in the order of request.dataset.items'),
  resume: z.strictObject({ path: z.string(), step: z.number().int().min(1) }).nullable().describe('the last checkpoint of an earlier attempt'),
  request: ResolvedTrainingRequest,
});
/**
 * The GPU check in the worker, with the backend and models it has: a self-test job's share on one
 * agent. Progress comes as stage `self_test` (one step per check or benchmark case); the final
 * message is `self_test_result` (or error; a cancel stops it between cases or steps).
 */
export const SelfTestMessage = z.strictObject({
  v,
  type: z.literal('self_test'),
  id,
  job_id: z.string(),
  attempt: z.number().int().min(1),
  job_dir: z.string().describe("absolute directory for the benchmark's scratch files"),
  checks: z.array(z.enum(SELF_TEST_CHECKS)).min(1),
  benchmark: SelfTestBenchmark,
});
export const CancelMessage = z.strictObject({ v, type: z.literal('cancel'), id });
export const ShutdownMessage = z.strictObject({ v, type: z.literal('shutdown'), id });

export const AgentToWorker = z.discriminatedUnion('type', [HelloMessage, GenerateMessage, LoadMessage, UnloadMessage, TrainMessage, SelfTestMessage, CancelMessage, ShutdownMessage]);
export type AgentToWorker = z.infer<typeof AgentToWorker>;

export const ReadyMessage = z.strictObject({
  v,
  type: z.literal('ready'),
  id,
  worker: z.strictObject({ version: z.string(), pid: z.number().int(), python: z.string() }),
  device: z.strictObject({ name: z.string(), vram_total_mb: z.number().int() }),
  capabilities: WorkerCapabilities,
  state: WorkerState,
});
export const LogMessage = z.strictObject({
  v,
  type: z.literal('log'),
  id: id.nullable(),
  level: z.enum(['debug', 'info', 'warning', 'error']),
  message: z.string(),
});
export const ProgressMessage = z.strictObject({
  v,
  type: z.literal('progress'),
  id,
  stage: z.enum(['loading_model', 'base', 'refiner', 'upscale', 'safety', 'train', 'self_test']).describe('self_test: step = checks and benchmark cases done, of total'),
  step: z.number().int().min(0),
  total: z.number().int().min(0),
  loss: z.number().optional().describe('training only'),
});
/** Base64 of at most `bytes` bytes. */
export const base64Of = (bytes: number) =>
  z
    .string()
    .min(4)
    .max(Math.ceil(bytes / 3) * 4)
    .regex(/^[A-Za-z0-9+/]+={0,2}$/, 'must be base64');
export const PREVIEW_CONTENT_TYPES = ['image/webp', 'image/jpeg', 'image/png'] as const;
/**
 * Not final, generate only, when the request asks for `output.previews`: a small image of the
 * first image's current estimate after a denoising step, right after that step's progress.
 */
export const PreviewMessage = z.strictObject({
  v,
  type: z.literal('preview'),
  id,
  stage: z.enum(['base', 'refiner']),
  step: z.number().int().min(1),
  total: z.number().int().min(1),
  width: z.number().int().min(1).max(PREVIEW_LIMITS.maxSide),
  height: z.number().int().min(1).max(PREVIEW_LIMITS.maxSide),
  content_type: z.enum(PREVIEW_CONTENT_TYPES),
  data: base64Of(PREVIEW_LIMITS.maxBytes).describe('the encoded image, base64'),
});
/**
 * Per-stage wall time of one generation, in ms, under `outputs[].metadata.timings` (never embedded
 * in the file). One set of keys for every backend, `<stage>_ms`: model_load (making the suite
 * resident; 0 when it already was), compile (torch.compile's one-time cost), base and refiner
 * (denoising), upscale, safety, encode (writing the files). A stage that did not run has no key.
 */
export const STAGE_TIMING_KEYS = ['model_load_ms', 'compile_ms', 'base_ms', 'refiner_ms', 'upscale_ms', 'safety_ms', 'encode_ms'] as const;
const ms = z.number().min(0);
export const StageTimings = z.strictObject({
  model_load_ms: ms,
  compile_ms: ms.optional(),
  base_ms: ms,
  refiner_ms: ms.optional(),
  upscale_ms: ms.optional(),
  safety_ms: ms.optional(),
  encode_ms: ms,
});
export type StageTimings = z.infer<typeof StageTimings>;
/** What is embedded in the file (when asked), plus the per-stage timings. */
export const WorkerOutputMetadata = z.looseObject({ timings: StageTimings });

export const WorkerOutput = z.strictObject({
  index: z.number().int().min(0),
  path: z.string(),
  width: z.number().int(),
  height: z.number().int(),
  seed: z.number().int().min(0).max(MAX_SEED).describe('image i of a request: (seed + i) mod 2^32'),
  sha256: z.string().regex(/^[0-9a-f]{64}$/),
  bytes: z.number().int(),
  content_type: z.string(),
  upscaled: Upscaled.nullable(),
  safety: SafetyVerdict.nullable(),
  metadata: WorkerOutputMetadata.describe('what is embedded in the file (when asked), plus per-stage timings'),
});
export type WorkerOutput = z.infer<typeof WorkerOutput>;
export const ResultMessage = z.strictObject({
  v,
  type: z.literal('result'),
  id,
  outputs: z.array(WorkerOutput),
  timings: z.strictObject({ model_load_ms: z.number(), inference_ms: z.number() }),
  loaded_models: z.array(z.string()).describe('models this request had to load (cold or from RAM)'),
  state: WorkerState,
});
export const ErrorMessage = z.strictObject({
  v,
  type: z.literal('error'),
  id,
  error: JobError,
  state: WorkerState.nullable(),
});
export const LoadedMessage = z.strictObject({
  v,
  type: z.literal('loaded'),
  id,
  models: z.array(z.string()).describe('what load brought in, or unload freed'),
  timings: z.strictObject({ load_ms: z.number() }),
  state: WorkerState,
});
/** Not final: a checkpoint file the agent uploads while training goes on. */
export const CheckpointMessage = z.strictObject({
  v,
  type: z.literal('checkpoint'),
  id,
  step: z.number().int().min(1),
  path: z.string(),
  sha256: z.string().regex(/^[0-9a-f]{64}$/),
  bytes: z.number().int(),
});
export const TrainedMessage = z.strictObject({
  v,
  type: z.literal('trained'),
  id,
  path: z.string().describe('the LoRA weights (safetensors, diffusers format)'),
  sha256: z.string().regex(/^[0-9a-f]{64}$/),
  bytes: z.number().int(),
  steps: z.number().int(),
  final_loss: z.number(),
  timings: z.strictObject({ model_load_ms: z.number(), train_ms: z.number() }),
  state: WorkerState,
});
/** Final for self_test: the report; `state` is the residency after it (pinned models restored). */
export const SelfTestResultMessage = z.strictObject({
  v,
  type: z.literal('self_test_result'),
  id,
  report: SelfTestReport,
  state: WorkerState,
});
export const ByeMessage = z.strictObject({ v, type: z.literal('bye'), id });

export const WorkerToAgent = z.discriminatedUnion('type', [
  ReadyMessage,
  LogMessage,
  ProgressMessage,
  PreviewMessage,
  ResultMessage,
  ErrorMessage,
  LoadedMessage,
  CheckpointMessage,
  TrainedMessage,
  SelfTestResultMessage,
  ByeMessage,
]);
export type WorkerToAgent = z.infer<typeof WorkerToAgent>;
export type ReadyMessage = z.infer<typeof ReadyMessage>;
export type ResultMessage = z.infer<typeof ResultMessage>;
export type ErrorMessage = z.infer<typeof ErrorMessage>;
export type ProgressMessage = z.infer<typeof ProgressMessage>;
export type PreviewMessage = z.infer<typeof PreviewMessage>;
export type GenerateMessage = z.infer<typeof GenerateMessage>;
export type TrainMessage = z.infer<typeof TrainMessage>;
export type LoadedMessage = z.infer<typeof LoadedMessage>;
export type TrainedMessage = z.infer<typeof TrainedMessage>;
export type CheckpointMessage = z.infer<typeof CheckpointMessage>;
export type SelfTestMessage = z.infer<typeof SelfTestMessage>;
export type SelfTestResultMessage = z.infer<typeof SelfTestResultMessage>;
