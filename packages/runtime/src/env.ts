import { JobKind } from '@kiln/contracts';

type Kind = z.infer<typeof JobKind>;
import { z } from 'zod';

/**
 * Each process parses its configuration once at start with a zod schema built from these
 * pieces. A bad variable is never a surprise later: `parseEnv` lists every one and exits.
 */

export const boolFromEnv = z
  .enum(['true', 'false', '1', '0', 'yes', 'no', ''])
  .transform((v) => v === 'true' || v === '1' || v === 'yes');

export const CommonEnv = z.object({
  REDIS_URL: z.url({ protocol: /^rediss?$/, error: 'must be a redis:// or rediss:// URL' }).default('redis://127.0.0.1:6379'),
  KILN_PREFIX: z
    .string()
    .regex(/^[A-Za-z0-9:{}_-]+$/, 'letters, digits, ":", "{", "}", "_" and "-" only')
    .default('kiln'),
  LOG_LEVEL: z.enum(['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent']).default('info'),
  PUBLIC_URL: z.url().default('http://127.0.0.1:8080').describe('base URL clients use for the API; used in links'),
  SHUTDOWN_TIMEOUT_MS: z.coerce.number().int().min(0).default(30_000),
});

export const StorageEnv = z.object({
  S3_ENDPOINT: z.url({ protocol: /^https?$/, error: 'must be an http(s) URL' }).default('http://127.0.0.1:9000'),
  S3_PUBLIC_ENDPOINT: z.url({ protocol: /^https?$/ }).optional(),
  S3_ACCESS_KEY: z.string().min(1).default('kiln'),
  S3_SECRET_KEY: z.string().min(1).default('kiln-secret'),
  S3_BUCKET: z
    .string()
    .regex(/^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$/, 'must be a valid S3 bucket name')
    .default('kiln'),
  S3_REGION: z.string().min(1).default('us-east-1'),
  S3_PRESIGN_EXPIRY_S: z.coerce.number().int().min(1).max(7 * 24 * 3600).default(3600),
  S3_STALL_TIMEOUT_MS: z.coerce
    .number()
    .int()
    .min(100)
    .default(30_000)
    .describe('an S3 connection that moves no byte this long is cut and the call fails (then retried like an outage); a slow transfer that keeps moving is never cut'),
});
export type StorageEnv = z.infer<typeof StorageEnv>;

export const WebhookEnv = z.object({
  WEBHOOK_SECRET: z
    .string()
    .regex(/^whsec_[A-Za-z0-9+/=]{16,}$/, 'must be "whsec_" followed by a base64 key')
    .optional(),
  WEBHOOK_ALLOW_PRIVATE: boolFromEnv.default(false),
  WEBHOOK_MAX_ATTEMPTS: z.coerce.number().int().min(1).max(50).default(8),
  WEBHOOK_BACKOFF_MS: z.coerce.number().int().min(10).default(2_000),
  WEBHOOK_TIMEOUT_MS: z.coerce.number().int().min(100).default(10_000),
});
export type WebhookEnv = z.infer<typeof WebhookEnv>;

const retention = (kind: Kind) => z.coerce.number().int().min(60).optional().describe(`how long a finished ${kind} job's record is kept; unset: JOB_RETENTION_S`);

export const JobEnv = z.object({
  MAX_ATTEMPTS: z.coerce.number().int().min(1).max(20).default(3).describe('attempts that fail on the job itself (worker crash, out of memory) before it fails'),
  INFRA_RETRY_DEADLINE_S: z.coerce
    .number()
    .int()
    .min(1)
    .default(900)
    .describe('how long a job is retried through infrastructure failures (storage, Redis, a lost agent), which spend no attempt, before it fails'),
  JOB_RETENTION_S: z.coerce.number().int().min(60).default(7 * 24 * 3600).describe('how long a finished job’s record (and its outputs) is kept'),
  // per kind, each unset one following JOB_RETENTION_S (see retentionByKind)
  JOB_RETENTION_S_GENERATION: retention('generation'),
  JOB_RETENTION_S_TRAINING: retention('training'),
  JOB_RETENTION_S_CACHE: retention('cache'),
  JOB_RETENTION_S_SELF_TEST: retention('self_test'),
  AGENT_TTL_MS: z.coerce.number().int().min(200).default(5_000),
  QUEUE_KEEP_COMPLETED: z.coerce.number().int().min(0).default(1_000).describe('finished entries each Kiln queue keeps for Bull Board'),
  QUEUE_KEEP_FAILED: z.coerce.number().int().min(0).default(5_000).describe('failed entries each Kiln queue keeps for Bull Board'),
  QUEUE_KEEP_S: z.coerce.number().int().min(60).default(7 * 24 * 3600).describe('how long a finished or failed queue entry is kept'),
});
export type JobEnv = z.infer<typeof JobEnv>;

/** The retention of each kind that has its own (JOB_RETENTION_S_<KIND>); the others keep JOB_RETENTION_S. */
export function retentionByKind(env: Partial<Record<`JOB_RETENTION_S_${Uppercase<Kind>}`, number | undefined>>): Partial<Record<Kind, number>> {
  const out: Partial<Record<Kind, number>> = {};
  for (const kind of JobKind.options) {
    const s = env[`JOB_RETENTION_S_${kind.toUpperCase() as Uppercase<Kind>}`];
    if (s !== undefined) out[kind] = s;
  }
  return out;
}

/**
 * How long BullMQ keeps finished and failed entries (bounded by count and age): the history
 * Bull Board shows. The job records themselves are kept for JOB_RETENTION_S either way.
 */
export function keepHistory(env: Partial<Record<'QUEUE_KEEP_COMPLETED' | 'QUEUE_KEEP_FAILED' | 'QUEUE_KEEP_S', number>>) {
  const age = env.QUEUE_KEEP_S ?? 7 * 24 * 3600;
  return {
    removeOnComplete: { count: env.QUEUE_KEEP_COMPLETED ?? 1_000, age },
    removeOnFail: { count: env.QUEUE_KEEP_FAILED ?? 5_000, age },
  };
}

export class EnvError extends Error {
  constructor(readonly problems: string[]) {
    super(`invalid configuration:\n${problems.map((p) => `  - ${p}`).join('\n')}`);
  }
}

/** Parses `env` with `schema`; throws an EnvError listing every bad variable. */
export function parseEnvOrThrow<S extends z.ZodType>(schema: S, env: NodeJS.ProcessEnv = process.env): z.output<S> {
  const cleaned = Object.fromEntries(Object.entries(env).filter(([, v]) => v !== undefined && v !== ''));
  const result = schema.safeParse(cleaned);
  if (result.success) return result.data;
  throw new EnvError(
    // values are not echoed: some are secrets
    result.error.issues.map((i) => `${i.path.join('.') || '(env)'}: ${i.message}`),
  );
}

/** For a process entry point: parse or print every problem and exit 2. */
export function parseEnv<S extends z.ZodType>(schema: S, processName: string, env: NodeJS.ProcessEnv = process.env): z.output<S> {
  try {
    return parseEnvOrThrow(schema, env);
  } catch (err) {
    if (err instanceof EnvError) {
      process.stderr.write(`kiln ${processName}: ${err.message}\n`);
      process.exit(2);
    }
    throw err;
  }
}
