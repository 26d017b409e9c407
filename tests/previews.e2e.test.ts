import { mkdtempSync, readdirSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { PreviewEvent } from '@kiln/contracts';
import { execa } from 'execa';
import sharp from 'sharp';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ENTRY, REPO_ROOT } from '../scripts/farm-lib.js';
import { basicRequest, Farm } from './support/farm.js';
import { OpenApiChecker } from './support/openapi.js';
import { events, openSse, type SseFrame } from './support/sse.js';

/**
 * Live previews against the real farm (API, dispatcher, an agent, its synthetic worker): a job
 * that asks for `output.previews` gets a small image every n steps on its event stream, its
 * batch's stream carries them too, the record and its history never hold one, a job that does
 * not ask gets none, another tenant cannot follow, a follower who joins mid-run gets the
 * current image, and `kiln submit --wait --previews` keeps the latest. Streams are opened while
 * the jobs wait (no dispatcher yet), so none is missed.
 */

const KEY_A = 'acme-previews-key-0123456789';
const KEY_B = 'bravo-previews-key-0123456789';
const bearer = (k: string) => ({ authorization: `Bearer ${k}` });

const request = (seed: number, steps: number, side: number, previews?: { every_n_steps: number; max_size?: number }) =>
  basicRequest({
    scheduler: { type: 'EulerDiscreteScheduler', steps },
    hyperparameters: { seed, width: side, height: side, num_images: 1 },
    ...(previews ? { output: { previews } } : {}),
  });

/** Decodes a preview's image as a client would; what it is, as the image itself says. */
async function decoded(p: PreviewEvent): Promise<{ format: string; width: number; height: number; pixels: number }> {
  const buf = Buffer.from(p.data, 'base64');
  const { data, info } = await sharp(buf).raw().toBuffer({ resolveWithObject: true });
  const meta = await sharp(buf).metadata();
  return { format: meta.format!, width: info.width, height: info.height, pixels: data.length / info.channels };
}

describe('live previews', () => {
  const farm = new Farm({ agents: 1, dispatcher: false, apiKey: KEY_A, env: { API_KEYS: `acme:${KEY_A},bravo:${KEY_B}`, KILN_SYNTHETIC_STEP_MS: '40' } });
  let checker: OpenApiChecker;
  const sse = (path: string, key = KEY_A) => openSse(`${farm.api}${path}`, bearer(key));
  const previewsOf = (frames: SseFrame[]) => events(frames, 'preview').map((f) => ({ frame: f, p: PreviewEvent.parse(f.data) }));

  beforeAll(async () => {
    await farm.start();
    checker = new OpenApiChecker(await (await fetch(`${farm.api}/openapi.json`)).json());
  }, 120_000);
  afterAll(() => farm.close());

  it('every n steps on the job and batch streams, small decodable images, never on the record; none unless asked; not for another tenant', async () => {
    const wanted = await farm.submit(request(1, 12, 512, { every_n_steps: 3, max_size: 128 }));
    const plain = await farm.submit(request(2, 6, 512));
    const batch = await farm.request('POST', '/v1/batches', {
      defaults: request(3, 4, 256, { every_n_steps: 2 }),
      items: [{}, { hyperparameters: { seed: 4, width: 256, height: 384, num_images: 1 } }],
    });
    expect(batch.status).toBe(202);
    // the OpenAPI document shows the field, as the schema the API validates with
    const doc = JSON.stringify(await (await fetch(`${farm.api}/openapi.json`)).json());
    expect(doc).toContain('every_n_steps');

    // followed while everything waits (no dispatcher yet): nothing can be missed
    const streams = {
      wanted: await sse(`/v1/jobs/${wanted.id}/events`),
      plain: await sse(`/v1/jobs/${plain.id}/events`),
      batch: await sse(`/v1/batches/${batch.body.id}/events`),
    };
    for (const s of Object.values(streams)) await s.until((f) => events(f, 'state').length >= 1);
    expect((await farm.job(wanted.id)).status).toBe('queued');
    // another tenant: the same 404 as an unknown id, no stream at all
    const other = await fetch(`${farm.api}/v1/jobs/${wanted.id}/events`, { headers: bearer(KEY_B) });
    expect(other.status).toBe(404);
    expect(((await other.json()) as any).error.code).toBe('not_found');
    expect((await fetch(`${farm.api}/v1/batches/${batch.body.id}/events`, { headers: bearer(KEY_B) })).status).toBe(404);

    farm.spawn('dispatcher', ENTRY.dispatcher);
    const frames = {
      wanted: await streams.wanted.finished(60_000),
      plain: await streams.plain.finished(60_000),
      batch: await streams.batch.finished(60_000),
    };

    // the job that asked: after steps 3, 6, 9 and 12 of its base stage, each a WebP of at most 128 px
    const got = previewsOf(frames.wanted);
    expect(got.map(({ p }) => [p.stage, p.step, p.total])).toEqual([['base', 3, 12], ['base', 6, 12], ['base', 9, 12], ['base', 12, 12]]);
    for (const { frame, p } of got) {
      expect(frame.id).toBeUndefined(); // live only: an id would move a client's Last-Event-ID
      expect(p).toMatchObject({ job_id: wanted.id, attempt: 1, content_type: 'image/webp', width: 128, height: 128 });
      expect(await decoded(p)).toEqual({ format: 'webp', width: 128, height: 128, pixels: 128 * 128 });
    }
    // all before the end, which is last
    const all = events(frames.wanted);
    expect(all.at(-1)!.event).toBe('end');
    expect(all.findIndex((f) => f.event === 'preview')).toBeGreaterThan(all.findIndex((f) => f.event === 'state' && f.data.status === 'running'));
    // later previews are closer to the final image: the last one is not the first one
    expect(got.at(-1)!.p.data).not.toBe(got[0]!.p.data);

    // the record and its history hold no preview; nor does Redis beside the short-lived latest
    const record = await farm.job(wanted.id);
    expect(record.status).toBe('succeeded');
    checker.check('GET', `/v1/jobs/${wanted.id}`, 200, record);
    const text = JSON.stringify(record);
    for (const { p } of got) expect(text).not.toContain(p.data.slice(0, 64));
    expect(record.request.output.previews).toEqual({ every_n_steps: 3, max_size: 128 });
    expect(record.events.every((e: any) => !('data' in e))).toBe(true);
    const stored = JSON.stringify([await farm.redis.hgetall(`${farm.prefix}:job:${wanted.id}`), await farm.redis.lrange(`${farm.prefix}:job:${wanted.id}:events`, 0, -1)]);
    expect(stored).not.toContain(got[0]!.p.data.slice(0, 64));
    const ttl = await farm.redis.pttl(`${farm.prefix}:job:${wanted.id}:preview`);
    expect(ttl === -2 || (ttl > 0 && ttl <= 30_000)).toBe(true); // gone, or going

    // a job that did not ask gets none
    expect(events(frames.plain, 'preview')).toEqual([]);
    expect(events(frames.plain, 'end')[0]!.data.status).toBe('succeeded');

    // the batch's stream: each child's previews, steps 2 and 4, naming the child; its own shape
    const children: string[] = batch.body.children.map((c: { id: string }) => c.id);
    const fromBatch = previewsOf(frames.batch);
    for (const [i, id] of children.entries()) {
      const mine = fromBatch.filter(({ p }) => p.job_id === id);
      expect(mine.map(({ p }) => p.step), id).toEqual([2, 4]);
      for (const { p } of mine) {
        const img = await decoded(p);
        expect(img.format).toBe('webp');
        expect([img.width, img.height]).toEqual(i === 0 ? [256, 256] : [171, 256]); // 256 × 384 shrunk to 256 on its long side
      }
    }
    expect(events(frames.batch, 'end')[0]!.data.status).toBe('succeeded');
  }, 120_000);

  it('a follower who connects mid-run gets the current image first', async () => {
    // 150 steps at 2048² (0.16 s each here), a preview every 50: the second follower connects
    // right after the first preview, some 8 s before the next one
    const job = await farm.submit(request(5, 150, 2048, { every_n_steps: 50, max_size: 64 }));
    const first = await sse(`/v1/jobs/${job.id}/events`);
    await first.until((f) => events(f, 'preview').length >= 1, 60_000);
    const late = await sse(`/v1/jobs/${job.id}/events`);
    const frames = await late.until((f) => events(f, 'preview').length >= 1, 60_000);
    const [current] = previewsOf(frames).map(({ p }) => p);
    // the current image (step 50, kept since), replayed once after the states, not the next one (step 100)
    expect(current).toMatchObject({ job_id: job.id, attempt: 1, stage: 'base', step: 50, total: 150 });
    expect(current!.data).toBe(previewsOf(first.frames)[0]!.p.data);
    expect(frames.findIndex((f) => f.event === 'preview')).toBeGreaterThan(frames.findIndex((f) => f.event === 'state'));
    expect((await decoded(current!)).width).toBe(64);
    first.close();
    late.close();
    expect((await farm.request('DELETE', `/v1/jobs/${job.id}`)).status).toBeLessThan(300);
    expect((await farm.waitForDone(job.id, 30_000)).status).toBe('canceled');
  }, 120_000);

  it('kiln submit --wait --previews N keeps the latest preview beside the outputs', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'kiln-previews-'));
    try {
      const r = await execa('node', [resolve(REPO_ROOT, 'packages/client/bin/kiln.mjs'), 'submit', 'a kiln at dusk', '--steps', '6', '--size', '256x256', '--seed', '9', '--previews', '2', '--wait', '-o', dir], {
        env: { KILN_URL: farm.api, KILN_API_KEY: KEY_A },
        reject: false,
        timeout: 120_000,
      });
      expect(r.exitCode, r.stderr).toBe(0);
      const files = readdirSync(dir).sort();
      expect(files).toHaveLength(2);
      const preview = files.find((f) => f.endsWith('-preview.webp'))!;
      expect(files).toContain(preview.replace('-preview.webp', '-0.png'));
      expect(r.stderr).toContain(`latest preview in ${join(dir, preview)}`);
      const meta = await sharp(readFileSync(join(dir, preview))).metadata();
      expect([meta.format, meta.width, meta.height]).toEqual(['webp', 256, 256]);
      const job = await farm.job(preview.replace('-preview.webp', ''));
      expect(job.request.output.previews).toEqual({ every_n_steps: 2, max_size: 256 });
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it('a request whose previews are out of bounds is refused, naming the field', async () => {
    const res = await farm.request('POST', '/v1/generations', request(6, 4, 256, { every_n_steps: 0, max_size: 4096 }));
    expect(res.status).toBe(400);
    expect(res.body.error.details.map((d: { field: string }) => d.field).sort()).toEqual(['output.previews.every_n_steps', 'output.previews.max_size']);
  });
});
