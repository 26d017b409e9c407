import { z } from 'zod';
import { AgentHeartbeat, ModelKind } from './agent.js';

export const AgentsResponse = z.object({ agents: z.array(AgentHeartbeat) });

export const ModelsResponse = z.object({
  models: z.array(
    z.object({
      name: z.string(),
      kind: ModelKind,
      vram_mb: z.number().int(),
      agents: z.array(z.string()).describe('live agents that can load it'),
      resident_on: z.array(z.string()).describe('live agents holding it now'),
    }),
  ),
});

/** Why a readiness check failed, in one word; the raw error goes to the API's log only. */
export const ReadinessFailure = z.enum(['unreachable', 'timeout', 'failed']);
export type ReadinessFailure = z.infer<typeof ReadinessFailure>;

export const HealthResponse = z.object({
  status: z.enum(['ok', 'unavailable']),
  checks: z.record(z.string(), z.object({ ok: z.boolean(), error: ReadinessFailure.optional() })).optional(),
});
