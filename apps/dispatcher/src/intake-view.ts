import { activationVramMb, type StoredJob, suiteOf, trainingVramMb } from '@kiln/contracts';
import type { AgentJobData, IntakeData, JobStore, JobWork } from '@kiln/runtime';
import type { Queue } from 'bullmq';
import type { Redis } from 'ioredis';
import type { Candidate } from './placement.js';

/** The models a job needs resident and the working VRAM on top, by kind. */
export function demandOf(job: StoredJob): Pick<Candidate, 'model' | 'adapters' | 'activationMb'> {
  switch (job.kind) {
    case 'generation':
      return { model: job.request.model.base, adapters: suiteOf(job.request).slice(1).map((m) => m.name), activationMb: activationVramMb(job.request.hyperparameters) };
    case 'training':
      return { model: job.request.base_model, adapters: [], activationMb: trainingVramMb(job.request) };
    case 'cache':
      // cache tasks go straight to their agent's queue; one in intake has lost its agent
      return { model: `agent:${job.request.target_agent}`, adapters: [], activationMb: 0 };
  }
}

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
      return undefined;
  }
}

/**
 * Expected run time of `work` on an agent: its steps × the agent's measured time of one step
 * per megapixel for that kind and model (heartbeat step_ms) × megapixels; `fallbackMs` (the
 * agent's average job) when the agent has not measured it.
 */
export function runMsOf(work: JobWork | undefined, stepMs: Record<string, number>, fallbackMs: number): number {
  const v = work ? stepMs[work.key] : undefined;
  return work && v !== undefined ? work.steps * v * (work.pixels / 1_000_000) : fallbackMs;
}

/** A job waiting in intake, as placement needs it: what it costs never changes, so it is read once. */
export interface Waiting {
  entryId: string;
  job: Pick<StoredJob, 'id' | 'client' | 'attempt' | 'created_at' | 'kind'>;
  demand: Pick<Candidate, 'model' | 'adapters' | 'activationMb'>;
  work: JobWork | undefined;
  /** BullMQ priority rank of the entry */
  rank: number;
  /** when the entry was queued (ms) */
  timestamp: number;
}

/**
 * The dispatcher's incremental view of waiting work. Each tick it reads only the ids of the
 * intake window (one script call); an entry it has not seen is read once — its entry and its
 * job's record — and kept until it leaves intake. So a tick costs one id read plus the new
 * arrivals, not a full read, decode and validation of every waiting job's record.
 *
 * A job canceled or re-queued after it was read is caught by the guarded claim (its status or
 * attempt no longer match) and its entry dropped then; a canceled job's entry leaves intake.
 */
export class IntakeView {
  private readonly known = new Map<string, Waiting>();

  constructor(
    private readonly intake: Queue<IntakeData>,
    private readonly store: JobStore,
    private readonly redis: Redis,
    private readonly window: number,
  ) {}

  /** Waiting jobs in intake order (priority, then arrival), and entries to drop (their job moved on). */
  async refresh(): Promise<{ waiting: Waiting[]; stale: string[] }> {
    const ids = [...new Set(await this.intake.getRanges(['prioritized', 'waiting'], 0, this.window - 1, true))].slice(0, this.window);
    const present = new Set(ids);
    for (const id of this.known.keys()) if (!present.has(id)) this.known.delete(id);
    const fresh = ids.filter((id) => !this.known.has(id));
    const stale: string[] = [];
    if (fresh.length) {
      const pipe = this.redis.pipeline();
      for (const id of fresh) pipe.hmget(this.intake.toKey(id), 'data', 'timestamp', 'priority');
      const entries = ((await pipe.exec()) ?? []).map(([, v]) => v as (string | null)[]);
      const data = entries.map((e) => (e?.[0] ? (JSON.parse(e[0]) as IntakeData) : null));
      const records = await this.store.getMany(data.map((d) => d?.job_id ?? ''));
      fresh.forEach((id, i) => {
        const d = data[i];
        const job = records[i];
        if (!d) return; // removed between the two reads
        if (!job || job.status !== 'queued' || job.attempt !== d.attempt) return void stale.push(id);
        this.known.set(id, {
          entryId: id,
          job: { id: job.id, client: job.client, attempt: job.attempt, created_at: job.created_at, kind: job.kind },
          demand: demandOf(job),
          work: workOf(job),
          rank: Number(entries[i]![2] ?? 5) || 5,
          timestamp: Number(entries[i]![1] ?? Date.now()),
        });
      });
    }
    const waiting: Waiting[] = [];
    for (const id of ids) {
      const w = this.known.get(id);
      if (w) waiting.push(w);
    }
    return { waiting, stale };
  }

  /** The entry left intake (placed, failed, or stale). */
  forget(entryId: string): void {
    this.known.delete(entryId);
  }

  get size(): number {
    return this.known.size;
  }
}

/** An entry on an agent's queue, as placement needs it (read once per entry). */
export interface Held {
  id: string;
  data: AgentJobData;
  timestamp: number;
  /** when the agent took it (ms), once it has */
  processedOn: number | null;
}

/**
 * What each agent's queue holds (the running job and the next), kept like IntakeView: each
 * tick reads the ids on every agent's queue (one script call each, sent together), and an
 * entry's data once; the time the agent took it is read until it has.
 */
export class HeldView {
  private readonly known = new Map<string, Held>();

  constructor(private readonly redis: Redis) {}

  async read(queues: Map<string, Queue<AgentJobData>>): Promise<Map<string, Held[]>> {
    const agents = [...queues.keys()];
    const ids = await Promise.all(agents.map((a) => queues.get(a)!.getRanges(['active', 'waiting', 'prioritized', 'delayed'], 0, -1, true)));
    const out = new Map<string, Held[]>();
    const reads: Promise<void>[] = [];
    const present = new Set<string>();
    agents.forEach((agent, i) => {
      const queue = queues.get(agent)!;
      const held: Held[] = [];
      for (const id of new Set(ids[i])) {
        const key = queue.toKey(id);
        present.add(key);
        let h = this.known.get(key);
        if (!h) {
          const entry: Held = { id, data: { job_id: '', attempt: 0, client: '' }, timestamp: 0, processedOn: null };
          reads.push(
            this.redis.hmget(key, 'data', 'timestamp', 'processedOn').then(([data, ts, on]) => {
              if (!data) return;
              entry.data = JSON.parse(data) as AgentJobData;
              entry.timestamp = Number(ts ?? 0);
              entry.processedOn = on ? Number(on) : null;
              this.known.set(key, entry);
            }),
          );
          h = entry;
        } else if (h.processedOn === null) {
          const entry = h;
          reads.push(
            this.redis.hget(key, 'processedOn').then((on) => {
              entry.processedOn = on ? Number(on) : null;
            }),
          );
        }
        held.push(h);
      }
      out.set(agent, held);
    });
    await Promise.all(reads);
    for (const key of this.known.keys()) if (!present.has(key)) this.known.delete(key);
    for (const [agent, held] of out) out.set(agent, held.filter((h) => h.data.job_id !== '').sort((x, y) => x.timestamp - y.timestamp));
    return out;
  }
}
