import type { StoredJob } from '@kiln/contracts';
import { isTerminal } from '@kiln/contracts';
import { processLogger } from './logger.js';
import { jobSeconds, jobsEnded, jobStageSeconds, jobsSubmitted } from './metrics.js';

/**
 * The story of a job, told once per event: one log line at info (a failure at warn) and its
 * metrics, from the process where the event happened. Every line names the job, its tenant and,
 * once placed, its agent, so `grep <job id>` across the processes' logs reads as its history.
 *
 *   submitted (api) → placed, with why there (dispatcher) → started → each stage (agent)
 *   → succeeded / failed / canceled, with its durations and code (whoever ended it)
 */

/** Why the dispatcher chose an agent: its model was there, had to be loaded, or pushed others out. */
export type PlacementReason = 'model_resident' | 'load_needed' | 'eviction';

const REASON_TEXT: Record<PlacementReason, string> = {
  model_resident: 'model resident',
  load_needed: 'model load needed',
  eviction: 'model load needed, evicting others',
};

/** The model a job is about, for its lines (cache tasks name their agent instead). */
export function modelOf(job: StoredJob): string | undefined {
  if (job.kind === 'generation') return job.request.model.base;
  if (job.kind === 'training') return job.request.base_model;
  return undefined;
}

const fields = (job: StoredJob) => ({ job: job.id, tenant: job.client, kind: job.kind, model: modelOf(job), ...(job.agent ? { agent: job.agent } : {}) });

export const lifecycle = {
  submitted(job: StoredJob): void {
    jobsSubmitted.inc({ kind: job.kind, priority: job.priority });
    processLogger().info({ ...fields(job), priority: job.priority, ...(job.group_id ? { group: job.group_id } : {}) }, 'job submitted');
  },

  /** (the dispatcher knows the placement fields it read, not the whole record) */
  placed(job: Pick<StoredJob, 'id' | 'client' | 'kind'> & { model: string | undefined }, agent: string, attempt: number, reason: PlacementReason, waitedMs: number): void {
    processLogger().info({ job: job.id, tenant: job.client, kind: job.kind, model: job.model, agent, attempt, reason, waited_ms: waitedMs }, `job placed on ${agent}: ${REASON_TEXT[reason]}`);
  },

  started(job: StoredJob, agent: string, attempt: number): void {
    processLogger().info({ ...fields(job), agent, attempt, queued_ms: job.timings.queued_ms }, 'job started');
  },

  /** A stage of the work began (loading_model, base, refiner, upscale, safety, train, uploading…). */
  stage(job: StoredJob, agent: string, stage: string, steps: number): void {
    processLogger().info({ ...fields(job), agent, stage, steps }, `job stage ${stage}`);
  },

  /** The job reached a terminal status (called once, by the process whose write ended it). */
  ended(job: StoredJob): void {
    if (!isTerminal(job.status)) return;
    const code = job.error?.code ?? 'none';
    jobsEnded.inc({ kind: job.kind, outcome: job.status, code });
    const t = job.timings;
    const total = job.finished_at ? Date.parse(job.finished_at) - Date.parse(job.created_at) : (t.total_ms ?? null);
    if (total !== null && Number.isFinite(total)) jobSeconds.observe({ kind: job.kind, outcome: job.status }, total / 1000);
    if (job.status === 'succeeded') {
      // stage times of a successful run; a failed one's are partial and would skew them
      const stages = { queued: t.queued_ms, model_load: t.model_load_ms, inference: t.inference_ms, upload: t.upload_ms };
      for (const [stage, ms] of Object.entries(stages)) if (ms !== null && ms >= 0) jobStageSeconds.observe({ kind: job.kind, stage }, ms / 1000);
    }
    const line = { ...fields(job), attempt: job.attempt, outcome: job.status, code: job.error?.code, total_ms: total, queued_ms: t.queued_ms, model_load_ms: t.model_load_ms, inference_ms: t.inference_ms, upload_ms: t.upload_ms };
    if (job.status === 'failed') processLogger().warn({ ...line, err: job.error?.message }, `job failed: ${code}`);
    else processLogger().info(line, `job ${job.status}`);
  },
};
