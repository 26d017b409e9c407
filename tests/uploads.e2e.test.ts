import { mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { execa } from 'execa';
import { Client } from 'minio';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { REPO_ROOT } from '../scripts/farm-lib.js';
import { basicRequest, Farm } from './support/farm.js';
import { gradientPng, shapesPng } from './support/images.js';
import { OpenApiChecker } from './support/openapi.js';

/**
 * Uploads: POST /v1/uploads gives a presigned PUT URL and an s3_key in the caller's area; the
 * README's training example (upload a dataset, train, generate with the LoRA) runs verbatim;
 * limits are checked at the request and again when the object is used; uploads expire.
 */

const KEY_A = 'acme-uploads-key-0123456789';
const KEY_B = 'bravo-uploads-key-0123456789';
const bearer = (k: string) => ({ authorization: `Bearer ${k}` });

describe('uploads', () => {
  const farm = new Farm({
    agents: 1,
    apiKey: KEY_A,
    env: { API_KEYS: `acme:${KEY_A},bravo:${KEY_B}`, KILN_SYNTHETIC_TRAIN_STEP_MS: '1', RETENTION_SWEEP_MS: '200' },
  });
  let checker: OpenApiChecker;
  let s3: Client;
  const upload = async (body: unknown, key = KEY_A) => {
    const res = await farm.request('POST', '/v1/uploads', body, bearer(key));
    checker.check('POST', '/v1/uploads', res.status, res.body);
    return res;
  };
  const put = (url: string, type: string, bytes: Buffer) => fetch(url, { method: 'PUT', headers: { 'content-type': type }, body: new Uint8Array(bytes) });
  const exists = (key: string) => s3.statObject('kiln-test', key).then(() => true, () => false);

  beforeAll(async () => {
    await farm.start();
    checker = new OpenApiChecker(await (await fetch(`${farm.api}/openapi.json`)).json());
    s3 = new Client({ endPoint: '127.0.0.1', port: Number(new URL(farm.s3.endpoint).port), useSSL: false, accessKey: farm.s3.accessKey, secretKey: farm.s3.secretKey, pathStyle: true, region: 'us-east-1' });
  }, 120_000);
  afterAll(() => farm.close());

  it("runs the README's training example verbatim: upload a dataset, train a LoRA on it, generate with it", async () => {
    const cwd = mkdtempSync(join(tmpdir(), 'kiln-readme-training-'));
    try {
      mkdirSync(join(cwd, 'kilns'));
      writeFileSync(join(cwd, 'kilns/1.png'), await gradientPng(64, 64));
      writeFileSync(join(cwd, 'kilns/1.txt'), 'a kiln, glowing');
      writeFileSync(join(cwd, 'kilns/2.png'), await shapesPng(64, 64));
      writeFileSync(join(cwd, 'kilns/2.txt'), 'a kiln, at night');
      const readme = readFileSync(resolve(REPO_ROOT, 'README.md'), 'utf8');
      const block = readme.split('<!-- training:start -->')[1]!.split('<!-- training:end -->')[0]!.replace(/^```sh\n|```\s*$/gm, '');
      const run = await execa('bash', ['-euo', 'pipefail', '-c', block], { cwd, env: { KILN: farm.api, KILN_API_KEY: KEY_A }, reject: false, timeout: 120_000, all: true });
      expect(run.exitCode, run.all).toBe(0);
      const lines = run.stdout.trim().split('\n');
      const training = JSON.parse(lines.find((l) => l.includes('"lora"'))!);
      expect(training).toMatchObject({ status: 'succeeded', step: 1500, lora: 'acme/team/kiln-style' });
      const generation = JSON.parse(lines.find((l) => l.includes('"loras"'))!);
      expect(generation.loras[0].name).toBe('acme/team/kiln-style');
      expect((await farm.waitForDone(generation.id)).status).toBe('succeeded');
      // the dataset landed in acme's area, under the names given
      for (const f of ['1.png', '1.txt', '2.png', '2.txt']) expect(await exists(`tenants/acme/uploads/datasets/kilns/${f}`), f).toBe(true);
    } finally {
      rmSync(cwd, { recursive: true, force: true });
    }
  }, 150_000);

  it('an uploaded image is an input image; another tenant cannot name it', async () => {
    const png = await gradientPng(128, 128);
    const res = await upload({ content_type: 'image/png', bytes: png.length });
    expect(res.status).toBe(201);
    expect(res.body.s3_key).toMatch(/^tenants\/acme\/uploads\/[0-9a-f-]{36}\.png$/);
    expect(res.body).toMatchObject({ method: 'PUT', headers: { 'content-type': 'image/png' }, max_bytes: 10 * 1024 * 1024 });
    expect(new URL(res.body.url).searchParams.get('X-Amz-Expires')).toBe('3600');
    expect(Date.parse(res.body.expires_at) - Date.now()).toBeGreaterThan(6 * 24 * 3600 * 1000);
    expect((await put(res.body.url, 'image/png', png)).status).toBe(200);
    const img2img = basicRequest({ image: { init: { s3_key: res.body.s3_key }, strength: 0.5 }, hyperparameters: { seed: 1, width: 128, height: 128 } });
    const job = await farm.submit(img2img);
    expect((await farm.waitForDone(job.id)).status).toBe('succeeded');
    const theirs = await farm.request('POST', '/v1/generations', img2img, bearer(KEY_B));
    expect(theirs.status).toBe(400);
    expect(theirs.body.error.details[0]).toMatchObject({ field: 'image.init.s3_key', rule: 'outside_tenant_area' });
  });

  it('refuses what it cannot take, naming the field: too large, wrong extension, a path that climbs, an unknown type', async () => {
    const cases: [unknown, string, string][] = [
      [{ content_type: 'image/png', bytes: 10 * 1024 * 1024 + 1 }, 'bytes', 'too_large'],
      [{ content_type: 'text/plain', bytes: 65 * 1024, path: 'd/1.txt' }, 'bytes', 'too_large'],
      [{ content_type: 'image/png', bytes: 10, path: 'd/1.jpg' }, 'path', 'extension_mismatch'],
      [{ content_type: 'image/png', bytes: 10, path: 'd/../../bravo/x.png' }, 'path', 'invalid_format'],
      [{ content_type: 'image/png', bytes: 10, path: '/abs.png' }, 'path', 'invalid_format'],
      [{ content_type: 'application/x-sh', bytes: 10 }, 'content_type', 'invalid_value'],
      [{ content_type: 'image/png', bytes: 0 }, 'bytes', 'too_small'],
    ];
    for (const [body, field, rule] of cases) {
      const res = await upload(body);
      expect(res.status, JSON.stringify(body)).toBe(400);
      expect(res.body.error.details.map((d: { field: string; rule: string }) => `${d.field} ${d.rule}`), JSON.stringify(body)).toContain(`${field} ${rule}`);
    }
    expect((await farm.request('POST', '/v1/uploads', { content_type: 'image/png', bytes: 10 }, { authorization: '' })).status).toBe(401);
  });

  it('a file larger than it said is refused when it is used', async () => {
    const res = await upload({ content_type: 'image/png', bytes: 1000, path: 'big.png' });
    const big = Buffer.concat([await gradientPng(64, 64), Buffer.alloc(10 * 1024 * 1024 + 10)]);
    expect((await put(res.body.url, 'image/png', big)).status).toBe(200); // a presigned PUT cannot bind a size
    const job = await farm.request('POST', '/v1/generations', basicRequest({ image: { init: { s3_key: res.body.s3_key } } }));
    expect(job.status).toBe(413);
  });

  it('an upload is deleted when its retention ends; asking again for it keeps it', async () => {
    const png = await gradientPng(32, 32);
    const a = (await upload({ content_type: 'image/png', bytes: png.length, path: 'old.png' })).body;
    const b = (await upload({ content_type: 'image/png', bytes: png.length, path: 'kept.png' })).body;
    await put(a.url, 'image/png', png);
    await put(b.url, 'image/png', png);
    // UPLOAD_RETENTION_S passing, now, for the first only
    await farm.redis.zadd(`${farm.prefix}:uploads`, Date.now() - 1, a.s3_key);
    await farm.waitFor(async () => !(await exists(a.s3_key)), 10_000, 'the expired upload deleted');
    expect(await farm.redis.zscore(`${farm.prefix}:uploads`, a.s3_key)).toBeNull();
    expect(await exists(b.s3_key)).toBe(true);
  });
});
