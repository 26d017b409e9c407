import type { StoredJob } from '@kiln/contracts';
import type { JobWork } from './jobs.js';

/**
 * How much work a job is, for the remaining-time estimate: its denoising (or training) steps
 * and its pixels (a step's time grows with the image); none for a cache task.
 */
export function workOf(job: StoredJob): JobWork | undefined {
  switch (job.kind) {
    case 'generation': {
      const r = job.request;
      const h = r.hyperparameters;
      const refiner = r.model.refiner ? (r.refiner?.steps ?? r.scheduler.steps) : 0;
      return { key: `generation ${r.model.base}`, steps: r.scheduler.steps + refiner, pixels: h.width * h.height * h.num_images };
    }
    case 'training': {
      const h = job.request.hyperparameters;
      return { key: `training ${job.request.base_model}`, steps: h.steps, pixels: h.resolution * h.resolution * h.batch_size };
    }
    case 'cache':
    case 'self_test':
      return undefined;
  }
}

/**
 * Expected run time of `work` on an agent: its steps × the agent's measured time of one step
 * per megapixel for that kind and model (heartbeat step_ms) × megapixels; `fallbackMs` (the
 * agent's average job) when the agent has not measured it.
 */
export function runMsOf(work: JobWork | undefined, stepMs: Record<string, number>, fallbackMs: number): number;
export function runMsOf(work: JobWork | undefined, stepMs: Record<string, number>, fallbackMs: number | null): number | null;
export function runMsOf(work: JobWork | undefined, stepMs: Record<string, number>, fallbackMs: number | null): number | null {
  const v = work ? stepMs[work.key] : undefined;
  return work && v !== undefined ? work.steps * v * (work.pixels / 1_000_000) : fallbackMs;
}
