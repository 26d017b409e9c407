import { mkdir } from 'node:fs/promises';
import { join } from 'node:path';
import type { GenerationJob, PreviewMessage, ResultMessage, StoredOutput } from '@kiln/contracts';
import { coerceError, Storage } from '@kiln/runtime';
import type { WorkerProcess } from '../worker-process.js';
import type { Run, Runner, RunnerDeps } from './runner.js';

interface Prepared {
  /** input images by their S3 key, fetched into the job directory */
  files: Record<string, string>;
  started: number;
}

/** One SDXL request: inputs and trained LoRAs fetched, the images generated, then uploaded. */
export class GenerationRunner implements Runner<'generation', Prepared, ResultMessage> {
  readonly kind = 'generation';

  constructor(private readonly d: RunnerDeps) {}

  async prepare(r: Run<GenerationJob>): Promise<Prepared> {
    const started = Date.now();
    const [files] = await Promise.all([this.downloadInputs(r), this.d.trainedLoras.fetchFor(r.job)]);
    return { files, started };
  }

  infer(r: Run<GenerationJob>, worker: WorkerProcess, { files }: Prepared): Promise<ResultMessage> {
    return r.request(worker.generate({ job_id: r.job.id, attempt: r.attempt, job_dir: r.jobDir, files, request: r.job.request }, r.onProgress, (p) => this.preview(r, p)));
  }

  /** A live preview on to the job's followers, beside its record (never in it); one lost is replaced by the next. */
  private preview(r: Run<GenerationJob>, p: PreviewMessage): void {
    const { v: _v, type: _type, id: _id, ...image } = p;
    this.d.jobs.store
      .preview({ job_id: r.job.id, attempt: r.attempt, ...image }, r.job.group_id)
      .catch((err) => this.d.log.warn({ job: r.job.id, err: coerceError(err).message }, 'preview not published'));
  }

  async finish(r: Run<GenerationJob>, result: ResultMessage, { started }: Prepared): Promise<void> {
    const { job, attempt, run, begun } = r;
    const { jobs, transfers, log, agentId, stats } = this.d;
    // this run's objects become the job's outputs only through the guarded write below, so an
    // attempt that lost the job meanwhile never replaces what the record describes
    const still = await jobs.store.setProgress(job.id, attempt, { stage: 'uploading', progress: { stage: 'uploading', step: 0, total: result.outputs.length } });
    if (!still.ok) return log.info({ job: job.id, attempt }, 'the job was taken back while it ran here; its result is dropped');
    const uploadStart = Date.now();
    const uploadSpan = r.state.childSpan('upload outputs', { 'kiln.outputs': result.outputs.length });
    // all at once: the sooner this job's entry is done, the sooner the dispatcher gives this
    // agent its next job (it holds two: this one and the one on the GPU now)
    const uploads = await Promise.allSettled(
      result.outputs.map(async (o): Promise<StoredOutput> => {
        const key = Storage.outputKey(job.id, run, o.index, o.content_type.split('/')[1] ?? 'bin');
        await transfers.upload(r.state, key, o.path, o.content_type, { 'x-amz-meta-seed': String(o.seed), 'x-amz-meta-sha256': o.sha256, 'x-amz-meta-attempt': String(attempt), 'x-amz-meta-agent': agentId });
        const { path: _path, ...rest } = o;
        return { ...rest, key };
      }),
    );
    uploadSpan?.end();
    const outputs = uploads.flatMap((u) => (u.status === 'fulfilled' ? [u.value] : []));
    const failed = uploads.find((u) => u.status === 'rejected');
    if (failed) {
      await transfers.discard(outputs.map((o) => o.key)); // a run that ends here leaves no objects behind
      throw failed.reason;
    }
    const finishedAt = new Date();
    const done = await jobs.update(job.id, { status: ['running'], attempt }, {
      status: 'succeeded',
      stage: 'done',
      outputs,
      loaded_models: result.loaded_models,
      progress: null,
      error: null,
      finished_at: finishedAt.toISOString(),
      timings: {
        queued_ms: Date.parse(begun.started_at!) - Date.parse(job.created_at),
        model_load_ms: Math.round(result.timings.model_load_ms),
        inference_ms: Math.round(result.timings.inference_ms),
        upload_ms: Date.now() - uploadStart,
        total_ms: finishedAt.getTime() - Date.parse(job.created_at),
      },
    });
    if (!done) {
      log.info({ job: job.id, attempt }, 'the job was taken back while it ran here; its result is dropped');
      await transfers.discard(outputs.map((o) => o.key));
      return;
    }
    log.debug({ job: job.id, attempt, ms: Date.now() - started, loaded: result.loaded_models }, 'generation uploaded'); // its end is the lifecycle line
    if (attempt > 1) await transfers.discardLeftovers(`outputs/${job.id}/`, new Set(outputs.map((o) => o.key)));
    // placement's estimate of how long a job holds this GPU: from taking the GPU slot to the
    // worker's answer (downloads and uploads overlap other jobs' inference). Model loads are left
    // out: placement charges them separately, and counting them here would make a thrashing
    // agent look slow, which sends more jobs elsewhere and makes it thrash more.
    stats.recordDuration((r.state.gpuMs ?? Date.now() - started) - result.timings.model_load_ms);
    const h = job.request.hyperparameters;
    const steps = job.request.scheduler.steps + (job.request.model.refiner ? (job.request.refiner?.steps ?? job.request.scheduler.steps) : 0);
    stats.recordSteps(`generation ${job.request.model.base}`, result.timings.inference_ms, steps, h.width * h.height * h.num_images);
  }

  /** Fetches the request's input images (stored by the API) into the job directory. */
  private async downloadInputs(r: Run<GenerationJob>): Promise<Record<string, string>> {
    const q = r.job.request;
    const keys = [q.image?.init.s3_key, q.image?.mask?.s3_key, ...(q.controlnets ?? []).map((c) => c.image.s3_key)].filter((k): k is string => !!k);
    const files: Record<string, string> = {};
    if (keys.length) await mkdir(join(r.jobDir, 'inputs'), { recursive: true });
    for (const [i, key] of keys.entries()) {
      const path = join(r.jobDir, 'inputs', `${i}-${key.split('/').at(-1)}`);
      await this.d.transfers.download(r.state, key, path, 'input');
      files[key] = path;
    }
    return files;
  }
}
