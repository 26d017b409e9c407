import type { AgentHeartbeat } from '@kiln/contracts';

export const SDXL_BASE = 'stabilityai/stable-diffusion-xl-base-1.0';

/**
 * A valid heartbeat of a ready synthetic agent holding nothing, that knows `models` (name →
 * VRAM MB, default SDXL base at 7,000 MB); `over` replaces any field. For tests and benches
 * that stand in for agents (the registry, placement's views, simulated agents).
 */
export function heartbeat(agentId: string, over: Partial<AgentHeartbeat> = {}, models: Record<string, number> = { [SDXL_BASE]: 7_000 }): AgentHeartbeat {
  const now = new Date().toISOString();
  return {
    agent_id: agentId,
    host: 'test',
    gpu_id: '0',
    gpu: { name: 'simulated', vram_total_mb: 24_576, vram_free_mb: 24_576 },
    state: 'ready',
    maintenance: false,
    resident: [],
    current_job: null,
    capabilities: {
      backend: 'synthetic',
      models: Object.entries(models).map(([name, vram_mb]) => ({ name, kind: 'base', vram_mb, load_ms: 3_000 })),
      schedulers: ['EulerDiscreteScheduler'],
      output_formats: ['png'],
      max_side: 2048,
      max_images: 8,
      features: [],
      controlnet_types: [],
      controlnet_preprocessors: [],
      upscalers: [],
      dtypes: ['fp16'],
      performance: [],
    },
    worker: { pid: 1, restarts: 0 },
    jobs_done: 0,
    avg_job_ms: null,
    step_ms: {},
    started_at: now,
    heartbeat_at: now,
    ...over,
  };
}

/** A resident model entry of a heartbeat. */
export const resident = (name: string, vramMb = 7_000, pinned = false): AgentHeartbeat['resident'][number] => ({ name, location: 'vram', vram_mb: vramMb, last_used_at: new Date().toISOString(), pinned });
