import type { CacheJob, LoadedMessage } from '@kiln/contracts';
import type { WorkerProcess } from '../worker-process.js';
import type { Run, Runner, RunnerDeps } from './runner.js';

/** Loads (or unloads) models on this agent's worker for a cache request. */
export class CacheRunner implements Runner<'cache', null, LoadedMessage> {
  readonly kind = 'cache';

  constructor(private readonly d: RunnerDeps) {}

  async prepare(): Promise<null> {
    return null;
  }

  infer(r: Run<CacheJob>, worker: WorkerProcess): Promise<LoadedMessage> {
    const t = r.job.request;
    return r.request(t.action === 'load' ? worker.load(t.models, t.location, t.pin) : worker.unload(t.models));
  }

  async finish(r: Run<CacheJob>, loaded: LoadedMessage): Promise<void> {
    const { job, attempt } = r;
    const t = job.request;
    await this.d.jobs.update(job.id, { status: ['running'], attempt }, {
      status: 'succeeded',
      stage: 'done',
      progress: null,
      cache: t.action === 'load' ? { loaded: loaded.models, unloaded: [] } : { loaded: [], unloaded: loaded.models },
      finished_at: new Date().toISOString(),
      timings: { ...job.timings, model_load_ms: Math.round(loaded.timings.load_ms), total_ms: Date.now() - Date.parse(job.created_at) },
    });
  }
}
