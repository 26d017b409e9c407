import type { SelfTestJob, SelfTestResultMessage } from '@kiln/contracts';
import type { WorkerProcess } from '../worker-process.js';
import type { Run, Runner, RunnerDeps } from './runner.js';

/**
 * A self-test task: the GPU check (environment, model files, benchmark) in this agent's worker,
 * with the models it has; the report goes on the record as the worker wrote it. The benchmark
 * moves models (pinned ones are put back by the worker), so the heartbeat goes out at once with
 * the residency after it.
 */
export class SelfTestRunner implements Runner<'self_test', null, SelfTestResultMessage> {
  readonly kind = 'self_test';

  constructor(private readonly d: RunnerDeps) {}

  async prepare(): Promise<null> {
    return null;
  }

  infer(r: Run<SelfTestJob>, worker: WorkerProcess): Promise<SelfTestResultMessage> {
    const t = r.job.request;
    return r.request(worker.selfTest({ job_id: r.job.id, attempt: r.attempt, job_dir: r.jobDir, checks: t.checks, benchmark: t.benchmark }, r.onProgress));
  }

  async finish(r: Run<SelfTestJob>, result: SelfTestResultMessage): Promise<void> {
    const { job, attempt } = r;
    await this.d.heartbeat().catch(() => {});
    const finishedAt = new Date();
    await this.d.jobs.update(job.id, { status: ['running'], attempt }, {
      status: 'succeeded',
      stage: 'done',
      progress: null,
      self_test: { report: result.report },
      finished_at: finishedAt.toISOString(),
      timings: { ...r.begun.timings, inference_ms: Math.round(result.report.duration_ms), total_ms: finishedAt.getTime() - Date.parse(job.created_at) },
    });
    this.d.log.info({ job: job.id, agent: this.d.agentId, verdict: result.report.verdict, reasons: result.report.reasons }, `self-test ${result.report.verdict}`);
  }
}
