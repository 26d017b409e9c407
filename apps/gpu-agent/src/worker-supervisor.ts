import { coerceError, type Logger } from '@kiln/runtime';
import { agentMetrics } from './metrics.js';
import { type WorkerCommand, WorkerProcess } from './worker-process.js';

const RESTART_BACKOFF_MS = [0, 1_000, 2_000, 5_000, 10_000, 30_000];

/**
 * Keeps one Python worker alive for the agent: starts it, waits for its ready message, and
 * starts a fresh one whenever it exits (unless the agent is stopping), backing off while it
 * keeps failing to start. `defunct` is true while the last start failed.
 */
export class WorkerSupervisor {
  worker: WorkerProcess | null = null;
  restarts = 0;
  defunct = false;
  private starting: Promise<void> | null = null;
  private consecutiveFailures = 0;

  constructor(
    private readonly command: WorkerCommand,
    private readonly agentId: string,
    private readonly opts: { gpuId: string; startTimeoutMs: number },
    private readonly log: Logger,
    /** the agent is stopping: an exit is not followed by a restart */
    private readonly stopping: () => boolean,
    /** the worker's state changed (started, ready, failed): the agent heartbeats */
    private readonly changed: () => void,
  ) {}

  /** Starts a worker unless one is running or starting. */
  ensure(): void {
    if (this.starting) return;
    const delay = RESTART_BACKOFF_MS[Math.min(this.consecutiveFailures, RESTART_BACKOFF_MS.length - 1)]!;
    this.starting = (async () => {
      if (delay) await new Promise((r) => setTimeout(r, delay));
      const w = new WorkerProcess(this.command, this.log.child({ component: 'worker' }));
      this.worker = w;
      agentMetrics.watch(w);
      w.on('exit', (err) => {
        if (this.worker !== w) return;
        if (err && err.code !== 'canceled') this.log.error({ err: err.message }, 'worker exited');
        this.worker = null;
        this.starting = null;
        if (!this.stopping()) {
          this.restarts += 1;
          this.ensure();
        }
      });
      try {
        const ready = await w.start(this.agentId, this.opts.gpuId, this.opts.startTimeoutMs);
        this.consecutiveFailures = 0;
        this.defunct = false;
        this.log.info({ pid: w.pid, backend: ready.capabilities.backend, models: ready.capabilities.models.length, device: ready.device.name }, 'worker ready');
      } catch (err) {
        this.consecutiveFailures += 1;
        this.defunct = true;
        this.log.error({ err: coerceError(err).message, retryInMs: RESTART_BACKOFF_MS[Math.min(this.consecutiveFailures, RESTART_BACKOFF_MS.length - 1)] }, 'worker failed to start');
        throw err;
      }
    })();
    this.starting.catch(() => {}); // the exit handler schedules the next try
    this.changed();
  }

  /** Resolves once the worker is started. */
  async started(): Promise<void> {
    await this.starting;
  }

  /** A worker ready to take a request, starting (and restarting) one as needed. */
  async ready(): Promise<WorkerProcess> {
    for (;;) {
      this.ensure();
      try {
        await this.starting;
      } catch {
        await new Promise((r) => setTimeout(r, 200));
        continue;
      }
      if (this.worker?.state === 'ready') return this.worker;
      await new Promise((r) => setTimeout(r, 50));
    }
  }

  async stop(): Promise<void> {
    await this.worker?.stop();
  }
}
