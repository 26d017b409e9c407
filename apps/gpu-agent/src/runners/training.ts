import { mkdir } from 'node:fs/promises';
import { join } from 'node:path';
import type { CheckpointMessage, TrainedMessage, TrainingJob } from '@kiln/contracts';
import { coerceError, KilnError, loraFileName, qualifiedLoraName } from '@kiln/runtime';
import type { WorkerProcess } from '../worker-process.js';
import type { Run, Runner, RunnerDeps } from './runner.js';

interface Prepared {
  datasetDir: string;
  resume: { path: string; step: number } | null;
}

/**
 * A LoRA fine-tune: fetch the dataset, resume from the last checkpoint of an earlier attempt
 * if there is one, upload every checkpoint as it is written, then upload the LoRA and
 * register it under its name so any agent can use it at once.
 */
export class TrainingRunner implements Runner<'training', Prepared, TrainedMessage> {
  readonly kind = 'training';

  constructor(private readonly d: RunnerDeps) {}

  async prepare(r: Run<TrainingJob>): Promise<Prepared> {
    const { job, attempt, jobDir } = r;
    const datasetDir = join(jobDir, 'dataset');
    await mkdir(datasetDir, { recursive: true });
    for (const [i, item] of job.request.dataset.items.entries()) {
      const ext = item.image.split('.').at(-1) ?? 'png';
      await this.d.transfers.download(r.state, item.image, join(datasetDir, `${i}.${ext}`), 'dataset image');
    }
    let resume: Prepared['resume'] = null;
    const last = job.training.last_checkpoint;
    if (last) {
      const path = join(jobDir, `resume-step-${last.step}.safetensors`);
      await this.d.transfers.download(r.state, last.key, path, 'checkpoint');
      resume = { path, step: last.step };
      await this.d.jobs.update(job.id, { status: ['running'], attempt }, {}, { message: `resuming from the checkpoint at step ${last.step}` });
    }
    return { datasetDir, resume };
  }

  async infer(r: Run<TrainingJob>, worker: WorkerProcess, { datasetDir, resume }: Prepared): Promise<TrainedMessage> {
    const { job, attempt, jobDir } = r;
    // checkpoints upload in order while training goes on, each retried in place; one that still
    // fails is skipped (the next one tries again) and never ends the training. Every link has
    // its handler, so the chain cannot reject; it is awaited before the end.
    let uploads = Promise.resolve();
    const onCheckpoint = (c: CheckpointMessage) => {
      uploads = uploads
        .then(() => this.saveCheckpoint(r, c, resume?.step ?? 0))
        .catch((err) => this.d.log.warn({ job: job.id, step: c.step, err: coerceError(err).message }, 'checkpoint not saved; training goes on'));
    };
    try {
      return await r.request(worker.train({ job_id: job.id, attempt, job_dir: jobDir, dataset_dir: datasetDir, resume, request: job.request }, r.onProgress, onCheckpoint));
    } finally {
      await uploads;
    }
  }

  async finish(r: Run<TrainingJob>, trained: TrainedMessage, { resume }: Prepared): Promise<void> {
    const { job, attempt, run, begun } = r;
    const { jobs, loras, transfers, log, stats } = this.d;
    const total = job.request.hyperparameters.steps;
    // under this run's own key, so an attempt that lost the job cannot replace the registered file
    const key = `loras/${job.id}/${run}/${loraFileName(job.request.output.name)}`;
    await transfers.upload(r.state, key, trained.path, 'application/octet-stream', { 'x-amz-meta-sha256': trained.sha256 });
    const now = (await jobs.store.get(job.id)) as TrainingJob | null;
    const name = qualifiedLoraName(job.client, job.request.output.name);
    const lora = { name, key, sha256: trained.sha256, bytes: trained.bytes, base_model: job.request.base_model, rank: job.request.hyperparameters.rank };
    if (!(await loras.register({ ...lora, tenant: job.client, job_id: job.id, created_at: new Date().toISOString() }, attempt)))
      throw new KilnError('conflict', `the LoRA ${name} was not registered: this attempt no longer holds the job, or another training holds the name`);
    const finishedAt = new Date();
    await jobs.update(job.id, { status: ['running'], attempt }, {
      status: 'succeeded',
      stage: 'done',
      progress: null,
      error: null,
      training: { step: trained.steps, total, loss: trained.final_loss, last_checkpoint: now?.training.last_checkpoint ?? null, lora },
      finished_at: finishedAt.toISOString(),
      timings: { ...begun.timings, model_load_ms: Math.round(trained.timings.model_load_ms), inference_ms: Math.round(trained.timings.train_ms), upload_ms: null, total_ms: finishedAt.getTime() - Date.parse(job.created_at) },
    });
    log.info({ job: job.id, tenant: job.client, agent: this.d.agentId, lora: lora.name, steps: trained.steps, loss: trained.final_loss }, 'LoRA registered');
    const hp = job.request.hyperparameters;
    stats.recordSteps(`training ${job.request.base_model}`, trained.timings.train_ms, trained.steps - (resume?.step ?? 0), hp.resolution * hp.resolution * hp.batch_size);
  }

  /**
   * Uploads a checkpoint under this run's keys and makes it the job's last one (a guarded
   * write). One past the step this attempt resumed from is progress: if the attempt fails
   * later, it spends no attempt.
   */
  private async saveCheckpoint(r: Run<TrainingJob>, c: CheckpointMessage, resumedFrom: number): Promise<void> {
    const { job, attempt, run } = r;
    const key = `trainings/${job.id}/checkpoints/${run}/step-${String(c.step).padStart(6, '0')}.safetensors`;
    await this.d.transfers.upload(r.state, key, c.path, 'application/octet-stream', { 'x-amz-meta-sha256': c.sha256, 'x-amz-meta-attempt': String(attempt) });
    const now = await this.d.jobs.store.get(job.id);
    if (now?.kind !== 'training') return;
    const progress = c.step > resumedFrom;
    const saved = await this.d.jobs.update(
      job.id,
      { status: ['running'], attempt },
      // progress also ends any run of failures on the record, so a later one — reported by the
      // dispatcher as well as by us — is counted afresh
      { training: { ...now.training, last_checkpoint: { step: c.step, key, sha256: c.sha256, bytes: c.bytes } }, ...(progress ? { charged_attempts: 0, infra_since: null } : {}) },
      { message: `checkpoint at step ${c.step}` },
    );
    if (saved && progress) r.state.progressed = true;
  }
}
