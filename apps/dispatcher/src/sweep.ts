import type { AgentHeartbeat } from '@kiln/contracts';
import { agentJobId, type IntakeData, intakeJobId, isConnectionError, type Jobs, type JobStanding, KilnError, type Logger } from '@kiln/runtime';
import type { Queue } from 'bullmq';
import type { Redis } from 'ioredis';
import type { AgentQueues } from './agent-queues.js';

/** Records checked between two returns to the event loop: the sweep never holds it for long. */
const CHUNK = 200;

/**
 * The repair sweep (every SWEEP_INTERVAL_MS, by the lease holder): repairs anything a crash left
 * half-done — ends whose announcement was interrupted (webhooks, group ends) are announced, a
 * queued job missing from intake is added again, a running job whose (live) agent no longer
 * holds it is retried. It walks every unfinished job, CHUNK at a time, reading only where each
 * stands (status, attempt, agent) and a whole record only where something must be done.
 */
export class Sweep {
  constructor(
    private readonly log: Logger,
    private readonly jobs: Jobs,
    private readonly redis: Redis,
    private readonly intake: Queue<IntakeData>,
    private readonly queues: AgentQueues,
  ) {}

  async run(live: AgentHeartbeat[]): Promise<void> {
    const announced = await this.jobs.drainAnnouncements().catch((err) => {
      if (!isConnectionError(err)) this.log.warn({ err: err instanceof Error ? err.message : String(err) }, 'could not announce every ended job; next sweep retries');
      return 0;
    });
    if (announced > 0) this.log.info({ announced }, 'announced ends a crash or outage had left in the outbox');
    const liveIds = new Set(live.map((a) => a.agent_id));
    const ids = await this.jobs.store.activeIds();
    for (let i = 0; i < ids.length; i += CHUNK) {
      if (i > 0) await new Promise((r) => setImmediate(r));
      await this.check(ids.slice(i, i + CHUNK), liveIds);
    }
  }

  private async check(ids: string[], liveIds: Set<string>): Promise<void> {
    // status, attempt and agent only: the whole record is read where something must be done
    const standings = await this.jobs.store.standings(ids);
    // whether each queued job has its intake entry: one EXISTS each, sent together
    const queued = standings.filter((j): j is JobStanding => j?.status === 'queued');
    const pipe = this.redis.pipeline();
    for (const job of queued) pipe.exists(this.intake.toKey(intakeJobId(job.id, job.attempt)));
    const inIntake = new Map(((await pipe.exec()) ?? []).map(([, n], i) => [queued[i]!.id, n === 1]));
    for (const job of standings) {
      if (!job) continue;
      if (job.status === 'queued') {
        if (!inIntake.get(job.id)) {
          const now = await this.jobs.store.get(job.id);
          if (now?.status !== 'queued') continue; // placed or ended since
          this.log.warn({ job: job.id }, 'queued job was missing from intake: adding it again');
          await this.jobs.enqueue(now);
        }
      } else if (job.status === 'running' && job.agent && liveIds.has(job.agent)) {
        const entry = await this.queues.get(job.agent).getJob(agentJobId(job.id, job.attempt));
        // a finished entry kept for Bull Board is not held either: its processor is done with it
        if (!entry || entry.finishedOn) {
          // re-read: the agent may have finished it between our two reads
          const now = await this.jobs.store.get(job.id);
          if (now?.status === 'running' && now.attempt === job.attempt) {
            await this.jobs.retryOrFail(now, new KilnError('agent_lost', `agent ${job.agent} no longer holds the job`), job.attempt);
          }
        }
      }
    }
  }
}
