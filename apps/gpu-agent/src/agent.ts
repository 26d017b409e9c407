import { hostname } from 'node:os';
import type { AgentHeartbeat, AgentState, StoredJob } from '@kiln/contracts';
import { type AgentJobData, type AgentRegistry, coerceError, type Jobs, KilnError, type Logger, type LoraRegistry, QUEUES, quietErrors, type Storage } from '@kiln/runtime';
import { type ConnectionOptions, Queue } from 'bullmq';
import type { AgentEnv } from './env.js';
import { agentMetrics } from './metrics.js';
import { JobPipeline } from './pipeline.js';
import { createRunners } from './runners/index.js';
import { JobStats } from './stats.js';
import { TrainedLoras } from './trained-loras.js';
import { Transfers } from './transfers.js';
import type { WorkerCommand } from './worker-process.js';
import { WorkerSupervisor } from './worker-supervisor.js';

/**
 * One agent per GPU, and its lifecycle: it hands back what a previous run under its id held,
 * starts its worker (worker-supervisor.ts), consumes its own queue through the job pipeline
 * (pipeline.ts, one runner per kind in runners/), heartbeats its state, leaves rotation while
 * an operator has it in maintenance, and drains on shutdown.
 */
export class Agent {
  private readonly supervisor: WorkerSupervisor;
  private readonly pipeline: JobPipeline;
  private readonly stats = new JobStats();
  private heartbeatTimer: NodeJS.Timeout | null = null;
  private readonly startedAt = new Date().toISOString();
  draining = false;
  /** an operator took this agent out of rotation (registry): it finishes what it holds, gets nothing new */
  private maintenance = false;
  /** the resident models (name, place, pin) of the last heartbeat sent, to tell the dispatcher when they change */
  private lastResidency: string | null = null;

  constructor(
    private readonly env: AgentEnv,
    private readonly log: Logger,
    private readonly connection: ConnectionOptions,
    private readonly jobs: Jobs,
    private readonly registry: AgentRegistry,
    storage: Storage,
    command: WorkerCommand,
    loras: LoraRegistry,
  ) {
    const heartbeat = () => this.heartbeat();
    this.supervisor = new WorkerSupervisor(command, env.AGENT_ID, { gpuId: env.GPU_ID, startTimeoutMs: env.WORKER_START_TIMEOUT_MS }, log, () => this.draining, () => void heartbeat().catch(() => {}));
    const runners = createRunners({
      agentId: env.AGENT_ID,
      jobs,
      loras,
      // where trained LoRAs are fetched to; the worker scans it (KILN_LORA_DIR)
      trainedLoras: new TrainedLoras(command.env.KILN_LORA_DIR!, loras, storage),
      transfers: new Transfers(storage, env.TRANSFER_RETRY_MS, log),
      stats: this.stats,
      log,
      heartbeat,
    });
    this.pipeline = new JobPipeline(this, env, connection, jobs, this.supervisor, runners, log);
  }

  get id(): string {
    return this.env.AGENT_ID;
  }

  async start(): Promise<void> {
    await this.ensureIdFree();
    await this.heartbeat();
    this.heartbeatTimer = setInterval(() => void this.heartbeat().catch((err) => this.log.warn({ err: coerceError(err).message }, 'heartbeat failed')), this.env.HEARTBEAT_MS);
    await this.reclaim();
    this.supervisor.ensure();
    await this.supervisor.started();
    this.pipeline.start();
  }

  /**
   * Refuses to run under an id a live agent holds: two agents with one id would share a queue
   * and a heartbeat, and this one's start (reclaim, below) would take back the jobs the other is
   * running. A heartbeat found at start is watched for one and a half beats: a previous run of
   * this agent that died leaves its last one as it was until it lapses (or SIGSTOPped, frozen),
   * a live agent — another process given the same AGENT_ID, or the previous run still draining —
   * writes a new one every HEARTBEAT_MS.
   */
  private async ensureIdFree(): Promise<void> {
    const seen = await this.registry.heartbeatText(this.id);
    if (seen === null) return;
    this.log.info('a heartbeat under this agent id is still there: making sure no live agent holds the id');
    await new Promise((r) => setTimeout(r, Math.max(1_500, this.env.HEARTBEAT_MS * 1.5)));
    const now = await this.registry.heartbeatText(this.id);
    if (now === null || now === seen) return;
    let who = '';
    try {
      const hb = JSON.parse(now) as Partial<AgentHeartbeat>;
      who = ` (host ${hb.host}, GPU ${hb.gpu_id}, up since ${hb.started_at}, ${hb.state})`;
    } catch {
      // the id alone says enough
    }
    throw new KilnError('validation_failed', `AGENT_ID ${this.id} is held by a live agent${who}: give each agent its own AGENT_ID, or stop that one first`, {
      details: [{ field: 'AGENT_ID', rule: 'unique', message: `another live agent heartbeats as ${this.id}` }],
    });
  }

  /**
   * An agent restarting under the same id hands back what its previous incarnation held, so
   * nothing waits for that one's queue lock (60 s) to expire: a job it had started goes back
   * to placement as a lost agent (infrastructure: no attempt spent), one it had not started is
   * handed back. Its queue is emptied first, so no entry of the old incarnation runs again.
   */
  private async reclaim(): Promise<void> {
    const queue = this.queue();
    try {
      await queue.obliterate({ force: true });
    } finally {
      await queue.close();
    }
    const ids = await this.jobs.store.activeIds();
    const held = (await this.jobs.store.getMany(ids)).filter((j): j is StoredJob => j?.status === 'running' && j.agent === this.id);
    for (const job of held) {
      if (job.stage === 'dispatched') {
        await this.jobs.handBack(job, job.attempt, `agent ${this.id} restarted before starting it`);
      } else {
        await this.jobs.retryOrFail(job, new KilnError('agent_lost', `agent ${this.id} restarted while running it`), job.attempt);
      }
    }
    if (held.length) this.log.warn({ jobs: held.map((j) => j.id) }, 'restarted: handed back what the previous run of this agent held');
    await this.jobs.wake(this.id);
  }

  private queue(): Queue<AgentJobData> {
    return quietErrors(new Queue<AgentJobData>(QUEUES.agent(this.id), { connection: this.connection, prefix: this.env.KILN_PREFIX }), 'agent queue');
  }

  /**
   * Redis came back (any reconnect): heartbeat at once rather than at the next tick, so the
   * dispatcher sees this agent alive as soon as it can.
   */
  announce(): void {
    if (this.heartbeatTimer) void this.heartbeat().catch(() => {});
  }

  /** Cancellation requested for a job (pub/sub from the API). */
  onCancel(jobId: string): void {
    this.pipeline.stop(jobId, 'user');
  }

  async heartbeat(): Promise<void> {
    const w = this.supervisor.worker;
    const st = w?.lastState;
    const caps = w?.ready?.capabilities ?? null;
    const current = this.pipeline.current;
    const maintenance = await this.registry.inMaintenance(this.id).catch(() => this.maintenance);
    if (maintenance !== this.maintenance) {
      this.maintenance = maintenance;
      this.log.info({ agent: this.id, job: current?.id }, maintenance ? 'in maintenance: finishing what it holds, taking nothing new' : 'back in rotation');
    }
    const state: AgentState = this.draining || maintenance ? 'draining' : current ? 'busy' : w?.state === 'ready' ? 'ready' : this.supervisor.defunct ? 'defunct' : 'starting';
    agentMetrics.state(state);
    const hb: AgentHeartbeat = {
      agent_id: this.id,
      host: hostname(),
      gpu_id: this.env.GPU_ID,
      gpu: {
        name: w?.ready?.device.name ?? 'unknown',
        vram_total_mb: st?.vram_total_mb ?? 0,
        vram_free_mb: st ? st.vram_total_mb - st.vram_used_mb : 0,
      },
      state,
      maintenance,
      resident: st?.resident ?? [],
      current_job: current?.id ?? null,
      capabilities: w?.state === 'ready' || w?.state === 'busy' ? caps : null,
      worker: { pid: w?.pid ?? null, restarts: this.supervisor.restarts },
      jobs_done: this.stats.jobsDone,
      avg_job_ms: this.stats.avgJobMs,
      step_ms: Object.fromEntries(this.stats.stepMs),
      started_at: this.startedAt,
      heartbeat_at: new Date().toISOString(),
    };
    await this.registry.publish(hb, this.env.AGENT_TTL_MS);
    // what it holds changed: the dispatcher must not place on the heartbeat before this one
    const residency = hb.resident.map((r) => `${r.name}:${r.location}:${r.pinned}`).sort().join('|');
    if (this.lastResidency !== null && residency !== this.lastResidency) await this.jobs.residencyChanged(this.id);
    this.lastResidency = residency;
  }

  /**
   * Clean stop: advertise `draining` so nothing new is placed here, hand back at once the jobs
   * that have not reached the GPU, let the one on it finish (and its predecessor upload) until
   * the deadline (then hand them back), hand back what waits in our queue, stop the worker,
   * and leave the registry.
   */
  async drain(deadlineMs: number): Promise<void> {
    this.draining = true;
    await this.heartbeat().catch(() => {});
    // a wake naming no agent makes the dispatcher read the registry afresh: it sees this agent
    // draining before the jobs handed back here return to placement, so none comes back here
    await this.jobs.wake().catch(() => {});
    this.pipeline.handBackWaiting();
    const handBackAfter = setTimeout(() => this.pipeline.stopAll('handback'), Math.max(0, deadlineMs - 3_000));
    await this.pipeline.close();
    clearTimeout(handBackAfter);
    const queue = this.queue();
    for (const entry of await queue.getJobs(['waiting', 'prioritized', 'delayed'])) {
      if (!entry?.data) continue;
      const job = await this.jobs.store.get(entry.data.job_id);
      if (job?.status === 'running' && job.agent === this.id && job.attempt === entry.data.attempt) {
        // a cache task belongs to this agent: it ends here; anything else goes back to placement
        if (job.kind === 'cache') await this.jobs.retryOrFail(job, new KilnError('agent_lost', `agent ${this.id} shut down before loading`), entry.data.attempt);
        else await this.jobs.handBack(job, entry.data.attempt, `agent ${this.id} is shutting down`);
      }
    }
    await queue.obliterate({ force: true }).catch(() => {});
    await queue.close();
    if (this.heartbeatTimer) clearInterval(this.heartbeatTimer);
    this.heartbeatTimer = null;
    await this.supervisor.stop();
    await this.registry.remove(this.id);
  }
}
