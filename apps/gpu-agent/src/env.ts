import { hostname } from 'node:os';
import { resolve } from 'node:path';
import { CommonEnv, JobEnv, MetricsEnv, StorageEnv, WebhookEnv } from '@kiln/runtime';
import { z } from 'zod';

const repoRoot = resolve(import.meta.dirname, '../../..');

export const AgentEnv = CommonEnv.extend(StorageEnv.shape)
  .extend(WebhookEnv.shape)
  .extend(JobEnv.shape)
  .extend(MetricsEnv.shape)
  .extend({
    GPU_ID: z.string().regex(/^[0-9]+$/, 'must be a GPU index like 0').default('0'),
    AGENT_ID: z.string().regex(/^[A-Za-z0-9_.-]+$/, 'letters, digits, "_", "." and "-" only').optional(),
    HEARTBEAT_MS: z.coerce.number().int().min(50).default(1_000),
    WORKER_BACKEND: z.enum(['synthetic', 'diffusers']).default('synthetic'),
    WORKER_PYTHON: z.string().default(resolve(repoRoot, 'workers-py/.venv/bin/python')),
    WORKER_DIR: z.string().default(resolve(repoRoot, 'workers-py')),
    /** test hook: a JSON array [file, ...args] run instead of `python -m kiln_worker` */
    WORKER_COMMAND: z
      .string()
      .transform((s, ctx) => {
        try {
          const v = z.array(z.string()).min(1).parse(JSON.parse(s));
          return v;
        } catch {
          ctx.addIssue({ code: 'custom', message: 'must be a JSON array of strings: ["file", "arg", …]' });
          return z.NEVER;
        }
      })
      .optional(),
    WORKER_START_TIMEOUT_MS: z.coerce.number().int().min(100).default(120_000),
    WORK_DIR: z.string().default(resolve(repoRoot, '.kiln/work')),
    PIPELINE_DEPTH: z.coerce
      .number()
      .int()
      .min(1)
      .max(8)
      .default(2)
      .describe('jobs taken from the agent queue at once: one on the GPU while the next prepares (inputs, LoRAs) and the previous uploads; 1 runs each job start to end before taking the next'),
    CANCEL_GRACE_MS: z.coerce.number().int().min(0).default(2_000).describe('after a cooperative cancel, wait this long before killing the worker'),
    PROGRESS_WEBHOOK_MS: z.coerce.number().int().min(0).default(1_000),
    TRANSFER_RETRY_MS: z.coerce
      .number()
      .int()
      .min(0)
      .default(60_000)
      .describe('an upload or download is retried in place (backoff with jitter, from the files on disk) this long; then the job is re-placed, spending no attempt, until INFRA_RETRY_DEADLINE_S'),
  })
  .transform((e) => ({ ...e, AGENT_ID: e.AGENT_ID ?? `${hostname()}-gpu${e.GPU_ID}` }));
export type AgentEnv = z.infer<typeof AgentEnv>;
