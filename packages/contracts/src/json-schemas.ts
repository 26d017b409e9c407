import { z } from 'zod';
import { CONTROLNET_TYPES, PREPROCESSABLE, SCHEDULER_ALIASES, SCHEDULER_OPTIONS, SCHEDULERS } from './generation.js';
import { AgentToWorker, STAGE_TIMING_KEYS, WorkerToAgent } from './protocol.js';

/**
 * The JSON Schema files generated into workers-py. The worker validates what it receives
 * against agent-to-worker.json; its tests check what it sends against worker-to-agent.json.
 */
export function protocolJsonSchemas(): Record<string, unknown> {
  return {
    'agent-to-worker.json': z.toJSONSchema(AgentToWorker, { io: 'output', target: 'draft-2020-12' }),
    'worker-to-agent.json': z.toJSONSchema(WorkerToAgent, { io: 'output', target: 'draft-2020-12' }),
    // tables the worker shares with the API, so both sides decide the same way
    'tables.json': { schedulers: SCHEDULERS, scheduler_aliases: SCHEDULER_ALIASES, scheduler_options: SCHEDULER_OPTIONS, controlnet_types: CONTROLNET_TYPES, preprocessable: PREPROCESSABLE, stage_timing_keys: STAGE_TIMING_KEYS },
  };
}

export const JSON_SCHEMA_DIR = 'workers-py/kiln_worker/schemas';

export function renderJsonSchema(schema: unknown): string {
  return JSON.stringify(schema, null, 2) + '\n';
}
