/**
 * What placement learns from this agent's heartbeat about its speed: the average time a job
 * holds the GPU (avg_job_ms) and the step time per megapixel by "<kind> <base model>"
 * (step_ms), both moving averages.
 */
export class JobStats {
  jobsDone = 0;
  avgJobMs: number | null = null;
  /** ms per step per megapixel by "<kind> <base model>" (heartbeat step_ms) */
  readonly stepMs = new Map<string, number>();

  recordDuration(ms: number): void {
    this.jobsDone += 1;
    this.avgJobMs = this.avgJobMs === null ? ms : Math.round(this.avgJobMs * 0.8 + ms * 0.2);
  }

  /** Placement's step time: `ms` spent on `steps` steps of `pixels` pixels, per megapixel-step. */
  recordSteps(key: string, ms: number, steps: number, pixels: number): void {
    if (!(steps > 0 && pixels > 0 && ms >= 0)) return;
    const v = ms / steps / (pixels / 1_000_000);
    const before = this.stepMs.get(key);
    this.stepMs.set(key, Math.round((before === undefined ? v : before * 0.8 + v * 0.2) * 1000) / 1000);
  }
}
