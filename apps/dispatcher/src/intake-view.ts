import { activationVramMb, type StoredJob, suiteOf, trainingVramMb } from '@kiln/contracts';
import { entryName, type IntakeData, type JobWork, type Keys, modelOf, workOf } from '@kiln/runtime';
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
    case 'self_test':
      // agent tasks go straight to their agent's queue; one in intake has lost its agent
      return { model: `agent:${job.request.target_agent}`, adapters: [], activationMb: 0 };
  }
}

/** A job waiting in intake, as placement needs it: what it costs never changes, so it is read once. */
export interface Waiting {
  entryId: string;
  job: Pick<StoredJob, 'id' | 'client' | 'attempt' | 'created_at' | 'kind'>;
  demand: Pick<Candidate, 'model' | 'adapters' | 'activationMb'>;
  work: JobWork | undefined;
  /** its agent-queue entry's name (entryName) */
  name: string;
  /** the model its log lines name (lifecycle) */
  model: string | undefined;
  /** BullMQ priority rank of the entry */
  rank: number;
  /** when the entry was queued (ms) */
  timestamp: number;
}

/** The fields of a job record placement reads (HMGET), in this order. */
const PLACEMENT_FIELDS = ['id', 'status', 'attempt', 'client', 'created_at', 'kind', 'request'] as const;

/**
 * The dispatcher's incremental view of waiting work. It reads the ids of the intake window (one
 * script call) only when intake may have changed behind it — a wake that says work was queued,
 * a generic wake, the periodic tick, or a window it filled and has since taken entries from;
 * an entry it has not seen is read once, with the fields of its job's record placement needs,
 * in one round trip (the record's id is in the entry's id), and kept until it leaves intake. So
 * a tick costs the new arrivals, not a full read, decode and validation of every waiting job.
 * The record was validated by the API that wrote it; placement decodes only what it needs.
 *
 * A job canceled or re-queued after it was read is caught by the guarded claim (its status or
 * attempt no longer match) and its entry dropped then; a canceled job's entry leaves intake.
 */
export class IntakeView {
  private readonly known = new Map<string, Waiting>();
  private ids: string[] = [];
  private dirty = true;
  /** the last read filled the window: entries beyond it come into view as placed ones leave */
  private full = false;
  /** entries forgotten since the last read */
  private taken = 0;

  constructor(
    private readonly intake: Queue<IntakeData>,
    private readonly redis: Redis,
    private readonly keys: Keys,
    private readonly window: number,
  ) {}

  /** Intake may have changed (a job was queued, or anything else): the next refresh reads its ids. */
  changed(): void {
    this.dirty = true;
  }

  /** Waiting jobs in intake order (priority, then arrival), and entries to drop (their job moved on). */
  async refresh(): Promise<{ waiting: Waiting[]; stale: string[] }> {
    const stale: string[] = [];
    if (this.dirty || (this.full && this.taken > 0)) {
      this.dirty = false;
      this.taken = 0;
      this.ids = [...new Set(await this.intake.getRanges(['prioritized', 'waiting'], 0, this.window - 1, true))].slice(0, this.window);
      this.full = this.ids.length >= this.window;
      const present = new Set(this.ids);
      for (const id of this.known.keys()) if (!present.has(id)) this.known.delete(id);
      const fresh = this.ids.filter((id) => !this.known.has(id));
      if (fresh.length) await this.read(fresh, stale);
    }
    const waiting: Waiting[] = [];
    for (const id of this.ids) {
      const w = this.known.get(id);
      if (w) waiting.push(w);
    }
    return { waiting, stale };
  }

  /** Reads new entries and their jobs' placement fields (readWaiting). */
  private async read(fresh: string[], stale: string[]): Promise<void> {
    const read = await readWaiting(this.redis, this.keys, this.intake, fresh);
    for (const [id, w] of read.waiting) this.known.set(id, w);
    stale.push(...read.stale);
  }

  /** The entry left intake (placed, failed, or stale). */
  forget(entryId: string): void {
    if (this.known.delete(entryId)) this.taken++;
  }

  get size(): number {
    return this.known.size;
  }
}

/** Entries read per round trip by readWaiting: a chunk is decoded in one turn of the event loop. */
const READ_CHUNK = 200;

/**
 * Intake entries and their jobs' placement fields (HMGET of the entry and of the record, in
 * one round trip per READ_CHUNK entries, giving the event loop back between chunks): what
 * placement and the queue gauges need of a waiting job. An entry whose job is gone, moved on or
 * re-queued since is `stale`; one removed meanwhile is neither.
 */
export async function readWaiting(redis: Redis, keys: Keys, intake: Queue<IntakeData>, ids: string[]): Promise<{ waiting: Map<string, Waiting>; stale: string[] }> {
  const waiting = new Map<string, Waiting>();
  const stale: string[] = [];
  for (let at = 0; at < ids.length; at += READ_CHUNK) {
    if (at > 0) await new Promise((r) => setImmediate(r));
    const chunk = ids.slice(at, at + READ_CHUNK);
    const pipe = redis.pipeline();
    for (const id of chunk) {
      pipe.hmget(intake.toKey(id), 'data', 'timestamp', 'priority');
      pipe.hmget(keys.job(id.replace(/-q\d+$/, '')), ...PLACEMENT_FIELDS);
    }
    const res = ((await pipe.exec()) ?? []).map(([, v]) => v as (string | null)[]);
    chunk.forEach((id, i) => {
      const entry = res[2 * i];
      if (!entry?.[0]) return; // removed between the two reads
      const d = JSON.parse(entry[0]) as IntakeData;
      const raw = res[2 * i + 1];
      const job = raw?.[1] && raw[0] ? (Object.fromEntries(PLACEMENT_FIELDS.map((f, k) => [f, JSON.parse(raw[k] ?? 'null') as unknown])) as unknown as StoredJob) : null;
      if (!job || job.id !== d.job_id || job.status !== 'queued' || job.attempt !== d.attempt) return void stale.push(id);
      waiting.set(id, {
        entryId: id,
        job: { id: job.id, client: job.client, attempt: job.attempt, created_at: job.created_at, kind: job.kind },
        demand: demandOf(job),
        work: workOf(job),
        name: entryName(job),
        model: modelOf(job),
        rank: Number(entry[2] ?? 5) || 5,
        timestamp: Number(entry[1] ?? Date.now()),
      });
    });
  }
  return { waiting, stale };
}
