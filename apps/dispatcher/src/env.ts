import { CommonEnv, JobEnv, MetricsEnv, StorageEnv, WebhookEnv } from '@kiln/runtime';
import { z } from 'zod';

export const DispatcherEnv = CommonEnv.extend(StorageEnv.shape)
  .extend(WebhookEnv.shape)
  .extend(JobEnv.shape)
  .extend(MetricsEnv.shape)
  .extend({
    DISPATCH_INTERVAL_MS: z.coerce.number().int().min(10).default(500),
    LEASE_TTL_MS: z.coerce.number().int().min(500).default(5_000),
    SWEEP_INTERVAL_MS: z.coerce.number().int().min(100).default(5_000),
    UNSCHEDULABLE_GRACE_MS: z.coerce.number().int().min(0).default(60_000),
    AGING_MS: z.coerce.number().int().min(1_000).default(60_000).describe('waiting this long raises a job one priority rank'),
    INTAKE_WINDOW: z.coerce.number().int().min(1).max(10_000).default(500),
    TICK_COALESCE_MAX_MS: z.coerce
      .number()
      .int()
      .min(0)
      .max(1_000)
      .default(25)
      .describe('after a tick of T ms with wakes waiting, the next waits min(T, this), so wakes under load gather into one tick (0: at once)'),
    PLAN_SLICE_MS: z.coerce.number().int().min(1).max(1_000).default(10).describe('planning gives the event loop back after running this long'),
    AGENT_SLOTS: z.coerce.number().int().min(1).max(8).default(2).describe('jobs held per agent: the running one plus the next'),
    PLACEMENT_POLICY: z.enum(['affinity', 'fifo']).default('affinity').describe('fifo: plain competing consumers, the benchmark baseline'),
    WARM_LOAD_FACTOR: z.coerce.number().min(0).max(1).default(0.15).describe('cost of bringing a warm (host RAM) model into VRAM, as a fraction of a cold load'),
    WEBHOOK_CONCURRENCY: z.coerce.number().int().min(1).max(256).default(16),
  });
export type DispatcherEnv = z.infer<typeof DispatcherEnv>;
