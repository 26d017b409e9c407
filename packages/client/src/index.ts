import type {
  AgentHeartbeat,
  ApiError,
  BatchList,
  BatchRequest,
  CacheRequest,
  CapabilitiesResponse,
  GenerationRequest,
  GroupEvent,
  GroupRecord,
  JobEvent,
  PreviewEvent,
  JobList,
  JobRecord,
  JobStatus,
  LorasResponse,
  ModelsResponse,
  QueueSummary,
  TrainingRequest,
  UploadRequest,
  UploadResponse,
  ValidateResponse,
} from '@kiln/contracts';
import { createParser } from 'eventsource-parser';
import type { z } from 'zod';
import type { SelfTestRequest } from '@kiln/contracts';

/**
 * A typed client for Kiln's API: fetch-based (Node 20+, browsers), its types from the contracts
 * package, so a request the client accepts is the request the API validates. Every method
 * answers the API's own records; every refusal is a KilnApiError with the API's code, message
 * and details. Live progress comes from the server-sent event streams, resumed with
 * Last-Event-ID when a connection drops.
 */

export type GenerationInput = z.input<typeof GenerationRequest>;
export type BatchInput = z.input<typeof BatchRequest>;
export type TrainingInput = z.input<typeof TrainingRequest>;
export type CacheInput = z.input<typeof CacheRequest>;
export type SelfTestInput = z.input<typeof SelfTestRequest>;
export type UploadInput = z.input<typeof UploadRequest>;
export type Job = JobRecord;
export type Batch = GroupRecord;
export type Page<T> = { data: T[]; next_cursor: string | null };

export interface ListQuery {
  status?: JobStatus | JobStatus[];
  kind?: 'generation' | 'training' | 'cache' | 'self_test';
  batch?: string;
  created_after?: string;
  created_before?: string;
  tenant?: string;
  limit?: number;
  cursor?: string;
}

/** One event of a job's (or batch's) live stream: see GET /v1/jobs/:id/events. */
export type KilnEvent =
  | { event: 'state'; id: string; data: JobEvent | GroupEvent }
  | { event: 'progress'; id: string; data: { stage: string; step: number; total: number; loss?: number } | Record<string, number> }
  | { event: 'child'; id: string; data: { index: number; id: string; status: JobStatus } }
  /** live only (no id, never replayed): a small image of the first image as it forms, when the request asked for output.previews */
  | { event: 'preview'; id: ''; data: PreviewEvent }
  | { event: 'end'; id: string; data: JobRecord | GroupRecord };

export interface KilnClientOptions {
  /** the API's base URL; default KILN_URL, else http://127.0.0.1:8080 */
  url?: string;
  /** an API key; default KILN_API_KEY (none on an open farm) */
  apiKey?: string;
  fetch?: typeof fetch;
}

/** A refusal from the API: its HTTP status and Kiln's `{ error: { code, message, details } }`. */
export class KilnApiError extends Error {
  readonly code: string;
  readonly details: { field: string; rule: string; message: string }[];
  constructor(
    readonly status: number,
    body: unknown,
  ) {
    const e = (body as Partial<ApiError> | null)?.error;
    super(e?.message ?? `HTTP ${status}`);
    this.name = 'KilnApiError';
    this.code = e?.code ?? 'unknown';
    this.details = e?.details ?? [];
  }
}

const env = (name: string) => (typeof process !== 'undefined' ? process.env[name] : undefined) || undefined;
const TERMINAL = ['succeeded', 'failed', 'canceled', 'partially_succeeded'];

export class KilnClient {
  readonly url: string;
  private readonly apiKey: string | undefined;
  private readonly fetch: typeof fetch;

  constructor(opts: KilnClientOptions = {}) {
    this.url = (opts.url ?? env('KILN_URL') ?? 'http://127.0.0.1:8080').replace(/\/+$/, '');
    this.apiKey = opts.apiKey ?? env('KILN_API_KEY');
    this.fetch = opts.fetch ?? globalThis.fetch.bind(globalThis);
  }

  /** One API call: JSON in and out; a 4xx or 5xx is thrown as a KilnApiError. */
  async call<T>(method: string, path: string, body?: unknown, headers: Record<string, string> = {}): Promise<{ status: number; body: T; headers: Headers }> {
    const res = await this.fetch(`${this.url}${path}`, {
      method,
      headers: { ...this.auth(), ...(body === undefined ? {} : { 'content-type': 'application/json' }), ...headers },
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    const text = await res.text();
    let parsed: unknown = text;
    try {
      parsed = text ? JSON.parse(text) : null;
    } catch {
      // not JSON: kept as text
    }
    if (!res.ok) throw new KilnApiError(res.status, parsed);
    return { status: res.status, body: parsed as T, headers: res.headers };
  }

  private auth(): Record<string, string> {
    return this.apiKey ? { authorization: `Bearer ${this.apiKey}` } : {};
  }

  // ---- generations and jobs --------------------------------------------------------------

  /** Submits a generation. `wait`: seconds (or true: 60) to hold the answer for the job to end (Prefer: wait). */
  async submit(request: GenerationInput, opts: { idempotencyKey?: string; wait?: number | true } = {}): Promise<Job> {
    const headers: Record<string, string> = {};
    if (opts.idempotencyKey) headers['idempotency-key'] = opts.idempotencyKey;
    if (opts.wait) headers.prefer = opts.wait === true ? 'wait' : `wait=${opts.wait}`;
    return (await this.call<Job>('POST', '/v1/generations', request, headers)).body;
  }

  async validate(request: GenerationInput): Promise<z.infer<typeof ValidateResponse>> {
    return (await this.call<z.infer<typeof ValidateResponse>>('POST', '/v1/validate', request)).body;
  }

  async get(id: string): Promise<Job> {
    return (await this.call<Job>('GET', `/v1/jobs/${encodeURIComponent(id)}`)).body;
  }

  /** One page of jobs, newest first. */
  async list(query: ListQuery = {}): Promise<Page<Job>> {
    return (await this.call<z.infer<typeof JobList>>('GET', `/v1/jobs${qs(query)}`)).body;
  }

  /** Every job the query matches, newest first, page after page. */
  async *listAll(query: ListQuery = {}): AsyncGenerator<Job> {
    let cursor: string | undefined = query.cursor;
    do {
      const page: Page<Job> = await this.list({ ...query, cursor });
      yield* page.data;
      cursor = page.next_cursor ?? undefined;
    } while (cursor);
  }

  /** Cancels a job: queued ones at once, running ones within about a second (a finished one is a 409). */
  async cancel(id: string): Promise<Job> {
    return (await this.call<Job>('DELETE', `/v1/jobs/${encodeURIComponent(id)}`)).body;
  }

  /** A new job with an ended job's request. */
  async retry(id: string): Promise<Job> {
    return (await this.call<Job>('POST', `/v1/jobs/${encodeURIComponent(id)}/retry`)).body;
  }

  // ---- batches, trainings, cache ------------------------------------------------------------

  async submitBatch(request: BatchInput): Promise<Batch> {
    return (await this.call<Batch>('POST', '/v1/batches', request)).body;
  }

  async getBatch(id: string): Promise<Batch> {
    return (await this.call<Batch>('GET', `/v1/batches/${encodeURIComponent(id)}`)).body;
  }

  async listBatches(query: Omit<ListQuery, 'kind' | 'batch'> = {}): Promise<z.infer<typeof BatchList>> {
    return (await this.call<z.infer<typeof BatchList>>('GET', `/v1/batches${qs(query)}`)).body;
  }

  async cancelBatch(id: string): Promise<Batch> {
    return (await this.call<Batch>('DELETE', `/v1/batches/${encodeURIComponent(id)}`)).body;
  }

  async train(request: TrainingInput): Promise<Job> {
    return (await this.call<Job>('POST', '/v1/trainings', request)).body;
  }

  async listTrainings(query: Omit<ListQuery, 'kind' | 'batch'> = {}): Promise<Page<Job>> {
    return (await this.call<Page<Job>>('GET', `/v1/trainings${qs(query)}`)).body;
  }

  async loras(): Promise<z.infer<typeof LorasResponse>> {
    return (await this.call<z.infer<typeof LorasResponse>>('GET', '/v1/loras')).body;
  }

  async cache(request: CacheInput): Promise<Batch> {
    return (await this.call<Batch>('POST', '/v1/cache', request)).body;
  }

  /** The GPU self-test on agents (admin key): the request's record; each task's report is on its job record. */
  async selfTest(request: SelfTestInput = {}): Promise<Batch> {
    return (await this.call<Batch>('POST', '/v1/admin/self-tests', request)).body;
  }

  async getSelfTest(id: string): Promise<Batch> {
    return (await this.call<Batch>('GET', `/v1/admin/self-tests/${encodeURIComponent(id)}`)).body;
  }

  // ---- the farm -----------------------------------------------------------------------------

  async agents(): Promise<AgentHeartbeat[]> {
    return (await this.call<{ agents: AgentHeartbeat[] }>('GET', '/v1/agents')).body.agents;
  }

  async models(): Promise<z.infer<typeof ModelsResponse>['models']> {
    return (await this.call<z.infer<typeof ModelsResponse>>('GET', '/v1/models')).body.models;
  }

  async capabilities(): Promise<z.infer<typeof CapabilitiesResponse>> {
    return (await this.call<z.infer<typeof CapabilitiesResponse>>('GET', '/v1/capabilities')).body;
  }

  async queue(): Promise<QueueSummary> {
    return (await this.call<QueueSummary>('GET', '/v1/queue')).body;
  }

  // ---- uploads and downloads ----------------------------------------------------------------

  /** Puts a file in the caller's area of the bucket (POST /v1/uploads, then the presigned PUT); answers its s3_key and more. */
  async upload(bytes: Uint8Array, opts: { contentType: UploadInput['content_type']; path?: string }): Promise<UploadResponse> {
    const upload = (await this.call<UploadResponse>('POST', '/v1/uploads', { content_type: opts.contentType, bytes: bytes.byteLength, ...(opts.path ? { path: opts.path } : {}) })).body;
    const put = await this.fetch(upload.url, { method: 'PUT', headers: upload.headers, body: bytes as unknown as NonNullable<RequestInit["body"]> });
    if (!put.ok) throw new KilnApiError(put.status, { error: { code: 'storage_failed', message: `the upload to storage answered ${put.status}: ${(await put.text()).slice(0, 200)}` } });
    return upload;
  }

  /** An output (or any presigned URL): its bytes. */
  async download(url: string): Promise<Uint8Array> {
    const res = await this.fetch(url);
    if (!res.ok) throw new KilnApiError(res.status, { error: { code: 'storage_failed', message: `download answered ${res.status}` } });
    return new Uint8Array(await res.arrayBuffer());
  }

  // ---- live progress --------------------------------------------------------------------------

  /**
   * A job's (or, with `batch`, a batch's) live events until the end event. A dropped connection
   * is reopened with Last-Event-ID, so no event is lost or repeated.
   */
  async *events(id: string, opts: { batch?: boolean; lastEventId?: string; signal?: AbortSignal } = {}): AsyncGenerator<KilnEvent> {
    const path = `/v1/${opts.batch ? 'batches' : 'jobs'}/${encodeURIComponent(id)}/events`;
    let last = opts.lastEventId;
    for (let tries = 0; ; tries++) {
      let res: Response;
      try {
        res = await this.fetch(`${this.url}${path}`, { headers: { ...this.auth(), accept: 'text/event-stream', ...(last ? { 'last-event-id': last } : {}) }, signal: opts.signal });
      } catch (err) {
        if (opts.signal?.aborted || tries >= 5) throw err;
        await sleep(500 * (tries + 1));
        continue;
      }
      if (!res.ok) throw new KilnApiError(res.status, await res.json().catch(() => null));
      const queue: KilnEvent[] = [];
      const parser = createParser({
        onEvent: (e) => {
          if (e.event) queue.push({ event: e.event, id: e.id ?? '', data: JSON.parse(e.data) } as KilnEvent);
        },
      });
      const decoder = new TextDecoder();
      try {
        for await (const chunk of res.body as unknown as AsyncIterable<Uint8Array>) {
          parser.feed(decoder.decode(chunk, { stream: true }));
          while (queue.length) {
            const e = queue.shift()!;
            if (e.id) last = e.id;
            yield e;
            if (e.event === 'end') return;
          }
        }
      } catch (err) {
        if (opts.signal?.aborted) throw err;
      }
      // the stream ended before its end event: reopen where it stopped
      if (tries >= 5) throw new Error(`the event stream of ${id} kept closing before its end`);
      await sleep(200);
    }
  }

  /** Waits for a job to end, following its live events; answers its final record. */
  async wait(id: string, opts: { onEvent?: (e: KilnEvent) => void; signal?: AbortSignal } = {}): Promise<Job> {
    for await (const e of this.events(id, { signal: opts.signal })) {
      opts.onEvent?.(e);
      if (e.event === 'end') return e.data as Job;
    }
    const job = await this.get(id);
    if (TERMINAL.includes(job.status)) return job;
    throw new Error(`job ${id} did not end`);
  }
}

function qs(query: object): string {
  const params = new URLSearchParams();
  for (const [k, v] of Object.entries(query)) {
    if (v === undefined || v === null || v === '') continue;
    params.set(k, Array.isArray(v) ? v.join(',') : String(v));
  }
  const s = params.toString();
  return s ? `?${s}` : '';
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
