import { randomUUID } from 'node:crypto';
import type { AddressInfo } from 'node:net';
import { ResolvedGenerationRequest } from '@kiln/contracts';
import { createJobServices, createLogger, newJobFields, parseEnvOrThrow } from '@kiln/runtime';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { buildApp } from '../apps/api/src/app.js';
import { ApiEnv } from '../apps/api/src/env.js';
import { KeyRing } from '../apps/api/src/keys.js';
import { basicRequest, Farm, REDIS_URL } from './support/farm.js';
import { OpenApiChecker } from './support/openapi.js';
import { events, openSse } from './support/sse.js';

/**
 * Live progress as server-sent events, read as a browser's EventSource would: every state
 * change and progress step of a job, a batch's children and counts, resumable with
 * Last-Event-ID, keep-alive comments, closed after the terminal event, the record's auth.
 */

const KEY_A = 'acme-events-key-0123456789';
const KEY_B = 'bravo-events-key-0123456789';
const bearer = (k: string) => ({ authorization: `Bearer ${k}` });

describe('live progress (SSE)', () => {
  const farm = new Farm({ agents: 1, apiKey: KEY_A, env: { API_KEYS: `acme:${KEY_A},bravo:${KEY_B}`, SSE_KEEPALIVE_MS: '300', KILN_SYNTHETIC_STEP_MS: '20' } });
  let checker: OpenApiChecker;
  const sse = (path: string, headers: Record<string, string> = {}) => openSse(`${farm.api}${path}`, { ...bearer(KEY_A), ...headers });
  const request = (seed: number, steps: number, side = 256) => basicRequest({ scheduler: { type: 'EulerDiscreteScheduler', steps }, hyperparameters: { seed, width: side, height: side } });

  beforeAll(async () => {
    await farm.start();
    checker = new OpenApiChecker(await (await fetch(`${farm.api}/openapi.json`)).json());
  }, 120_000);
  afterAll(() => farm.close());

  it("a job's stream: every state change in order, each step, then the record, then it closes", async () => {
    const job = await farm.submit(request(1, 12));
    const stream = await sse(`/v1/jobs/${job.id}/events`);
    expect(stream.res.status).toBe(200);
    expect(stream.res.headers.get('content-type')).toContain('text/event-stream');
    const frames = await stream.finished();
    const states = events(frames, 'state');
    // ids are the events' numbers (seq), from 1 (submitted) up, each once
    expect(states.map((s) => s.id)).toEqual(states.map((s) => String(s.data.seq)));
    expect(states[0]!.id).toBe('1');
    expect(states.map((s) => s.data.seq)).toEqual([...new Set(states.map((s) => s.data.seq))].sort((a, b) => a - b));
    expect(states[0]!.data).toMatchObject({ status: 'queued', message: 'submitted' });
    expect(states.map((s) => s.data.status)).toContain('running');
    expect(states.at(-1)!.data.status).toBe('succeeded');
    // the record's events are the stream's, exactly, less those compaction dropped as it ended
    // (the start of the succeeding attempt); a stream read after the end is the record's
    const record = await farm.job(job.id);
    const streamed = new Map(states.map((s) => [s.data.seq, s.data]));
    for (const e of record.events) expect(streamed.get(e.seq)).toEqual(e);
    expect(record.events.map((e) => e.status)).toEqual(expect.arrayContaining(['queued', 'running', 'succeeded']));
    expect(record.events.some((e) => e.message?.startsWith('stage base:'))).toBe(true);
    const replay = events(await (await sse(`/v1/jobs/${job.id}/events`)).finished(5_000), 'state');
    expect(replay.map((s) => s.data)).toEqual(record.events);
    expect(replay.map((s) => s.id)).toEqual(record.events.map((e) => String(e.seq)));
    const progress = events(frames, 'progress').filter((p) => p.data.total === 12);
    expect(progress.length).toBeGreaterThanOrEqual(3);
    const steps = progress.map((p) => p.data.step);
    expect([...steps].sort((a, b) => a - b)).toEqual(steps); // never backwards
    expect(Math.max(...steps)).toBe(12);
    // the end: once, last, the whole record (as documented)
    const ends = events(frames, 'end');
    expect(ends).toHaveLength(1);
    expect(frames.filter((f) => f.type === 'event').at(-1)).toBe(ends[0]);
    expect(ends[0]!.data).toMatchObject({ id: job.id, status: 'succeeded' });
    expect(ends[0]!.data.outputs[0].url).toMatch(/^http/);
    checker.check('GET', `/v1/jobs/${job.id}`, 200, ends[0]!.data);
  });

  it('a finished job replays its states and the end at once', async () => {
    const job = await farm.submit(request(2, 2));
    await farm.waitForDone(job.id);
    const frames = await (await sse(`/v1/jobs/${job.id}/events`)).finished(5_000);
    expect(events(frames, 'state').at(-1)!.data.status).toBe('succeeded');
    expect(events(frames, 'end')).toHaveLength(1);
  });

  it('resumes after Last-Event-ID without repeating anything, sends keep-alives while nothing happens, and ends on cancel', async () => {
    // the agent is busy with a long job; with its slots full, the next one waits in intake
    // (150 steps at 1024²: 3 s each)
    const busy = await farm.submit(request(3, 150, 1024));
    const next = await farm.submit(request(4, 150, 1024));
    const waiting = await farm.submit(request(5, 150, 1024));
    const first = await sse(`/v1/jobs/${busy.id}/events`);
    await first.until((f) => events(f, 'progress').length >= 2);
    first.close();
    const last = first.frames.filter((f) => f.type === 'event').at(-1)!;
    const seenStates = events(first.frames, 'state').length;
    const again = await sse(`/v1/jobs/${busy.id}/events`, { 'last-event-id': last.id! });
    await again.until((f) => events(f, 'progress').length >= 1);
    // no state event repeated; progress carries on from where it was
    expect(events(again.frames, 'state').map((s) => Number(s.id)).every((n) => n > seenStates)).toBe(true);
    expect(events(again.frames, 'progress')[0]!.data.step).toBeGreaterThanOrEqual(last.data.step);
    again.close();

    // a queued job: one state, then only keep-alive comments
    const quiet = await sse(`/v1/jobs/${waiting.id}/events`);
    await quiet.until((f) => f.filter((x) => x.type === 'comment' && x.comment === 'keep-alive').length >= 2, 5_000);
    expect(events(quiet.frames).map((e) => e.event)).toEqual(['state']);
    expect((await farm.request('DELETE', `/v1/jobs/${waiting.id}`)).status).toBe(200);
    const frames = await quiet.finished(10_000);
    expect(events(frames, 'state').at(-1)!.data.status).toBe('canceled');
    expect(events(frames, 'end')[0]!.data.status).toBe('canceled');
    for (const id of [busy.id, next.id]) await farm.request('DELETE', `/v1/jobs/${id}`);
    for (const id of [busy.id, next.id]) await farm.waitForDone(id);
  });

  it('resumes across the end: a Last-Event-ID from while it ran gets exactly the events after it, compacted or not, none twice', async () => {
    const job = await farm.submit(request(10, 30, 1024));
    const first = await sse(`/v1/jobs/${job.id}/events`);
    // usually mid-run (its start has been sent; compaction drops it at the end); if the job is
    // over already, what follows still holds
    await first.until((f) => events(f, 'progress').length >= 1 || events(f, 'end').length > 0);
    first.close();
    const seen = events(first.frames, 'state');
    const lastId = first.frames.filter((f) => f.type === 'event' && f.id).at(-1)!.id!;
    const done = await farm.waitForDone(job.id);
    expect(done.status).toBe('succeeded');
    const record = await farm.job(job.id);
    const n = Number(lastId.split(':')[0]);
    for (const id of [lastId, '2', '1']) {
      const after = Number(id.split(':')[0]);
      const frames = await (await sse(`/v1/jobs/${job.id}/events`, { 'last-event-id': id })).finished(5_000);
      const states = events(frames, 'state');
      // exactly the record's events after it, in order, with their numbers as ids
      expect(states.map((s) => s.data), `after ${id}`).toEqual(record.events.filter((e) => e.seq > after));
      expect(states.map((s) => s.id)).toEqual(states.map((s) => String(s.data.seq)));
      expect(events(frames, 'end')).toHaveLength(1);
      if (id === lastId) {
        // nothing the first connection had is sent again, and together they hold the whole record
        const all = [...seen, ...states].map((s) => s.data.seq);
        expect(new Set(all).size).toBe(all.length);
        for (const e of record.events) expect(all).toContain(e.seq);
        expect([...seen, ...states].at(-1)!.data.status).toBe('succeeded'); // the end is never skipped
        expect(states.every((s) => s.data.seq > n)).toBe(true);
      }
    }
  });

  it("a batch's stream: its states, each child's, the counts, then the record", async () => {
    const batch = await farm.request('POST', '/v1/batches', { defaults: request(6, 4), items: [{}, { hyperparameters: { seed: 7 } }, { hyperparameters: { seed: 8 } }] });
    expect(batch.status).toBe(202);
    const frames = await (await sse(`/v1/batches/${batch.body.id}/events`)).finished();
    const children = events(frames, 'child');
    for (const c of batch.body.children) {
      const mine = children.filter((e) => e.data.id === c.id).map((e) => e.data.status);
      expect(mine.at(-1), c.id).toBe('succeeded');
      expect(new Set(mine).size).toBe(mine.length); // each status once
    }
    expect(events(frames, 'progress').at(-1)!.data).toEqual({ total: 3, queued: 0, running: 0, succeeded: 3, failed: 0, canceled: 0 });
    expect(events(frames, 'state').at(-1)!.data.status).toBe('succeeded');
    const end = events(frames, 'end');
    expect(end).toHaveLength(1);
    checker.check('GET', `/v1/batches/${batch.body.id}`, 200, end[0]!.data);
  });

  it('the same auth as the record: no key 401, another tenant 404 like an unknown id', async () => {
    const job = await farm.submit(request(9, 2));
    const none = await fetch(`${farm.api}/v1/jobs/${job.id}/events`);
    expect(none.status).toBe(401);
    for (const path of [`/v1/jobs/${job.id}/events`, `/v1/jobs/${randomUUID()}/events`]) {
      const res = await fetch(`${farm.api}${path}`, { headers: bearer(KEY_B) });
      expect(res.status).toBe(404);
      expect(((await res.json()) as any).error.code).toBe('not_found');
      checker.check('GET', path, 404, ((await (await fetch(`${farm.api}${path}`, { headers: bearer(KEY_B) })).json()) as unknown));
    }
    await farm.waitForDone(job.id);
  });
});

describe('shutdown', () => {
  it('closing the API ends its open streams at once (a stream never holds a shutdown)', async () => {
    const env = parseEnvOrThrow(ApiEnv, { REDIS_URL, KILN_PREFIX: `kiln-test-${randomUUID().slice(0, 8)}`, S3_ENDPOINT: 'http://127.0.0.1:9' });
    const services = createJobServices(env, 'kiln-events-test');
    const built = await buildApp({ env, log: createLogger('api', 'silent'), ring: KeyRing.from(env), ...services });
    try {
      await built.app.listen({ host: '127.0.0.1', port: 0 });
      const id = randomUUID();
      const request = ResolvedGenerationRequest.parse({ ...basicRequest(), hyperparameters: { seed: 1 } });
      await services.store.create({ ...newJobFields(id, 'default', 'normal'), kind: 'generation', request });
      const stream = await openSse(`http://127.0.0.1:${(built.app.server.address() as AddressInfo).port}/v1/jobs/${id}/events`);
      await stream.until((f) => events(f, 'state').length === 1);
      const started = Date.now();
      await built.close();
      await stream.finished(5_000);
      expect(Date.now() - started).toBeLessThan(3_000);
    } finally {
      const keys = await services.redis.keys(`${env.KILN_PREFIX}:*`);
      if (keys.length) await services.redis.del(...keys);
      await services.close();
    }
  });
});
