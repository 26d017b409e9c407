import { randomUUID } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { connect, createServer, type AddressInfo } from 'node:net';
import { resolve } from 'node:path';
import { deflateSync } from 'node:zlib';
import { ApiError } from '@kiln/contracts';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ENTRY } from '../scripts/farm-lib.js';
import { basicRequest, Farm, sleep } from './support/farm.js';

/**
 * Bad input never reaches Redis, the worker or the stack, and nothing sensitive leaks: tried
 * against a real farm the way a careless or hostile client would, over real sockets.
 */

const REQUEST_TIMEOUT_MS = 1_500;
const HEADERS_TIMEOUT_MS = 1_000;
const STDERR_MARKER = 'stray print from a library'; // the synthetic worker's KILN_SYNTHETIC_STRAY_PRINT line

const farm = new Farm({
  agents: 1,
  env: {
    HTTP_REQUEST_TIMEOUT_MS: String(REQUEST_TIMEOUT_MS),
    HTTP_HEADERS_TIMEOUT_MS: String(HEADERS_TIMEOUT_MS),
    BODY_LIMIT_BYTES: String(2 * 1024 * 1024),
    // one attempt: a crashed worker fails its job, and the test reads that failure
    MAX_ATTEMPTS: '1',
  },
  // the worker writes a recognisable line to stderr on every generation; slow steps leave time to kill it mid-run
  agentEnv: () => ({ KILN_SYNTHETIC_STRAY_PRINT: '1', KILN_SYNTHETIC_STEP_MS: '200' }),
});
beforeAll(() => farm.start());
afterAll(() => farm.close());

const port = () => Number(new URL(farm.api).port);

/** Writes `chunks` to a fresh loopback socket (each after `gapMs`) and reads until the server closes it. */
function rawExchange(chunks: string[], opts: { gapMs?: number; giveUpMs?: number } = {}): Promise<{ response: string; closedAfterMs: number; closedByServer: boolean }> {
  return new Promise((done, fail) => {
    const t0 = Date.now();
    const socket = connect(port(), '127.0.0.1');
    let response = '';
    let finished = false;
    const finish = (closedByServer: boolean) => {
      if (finished) return;
      finished = true;
      clearTimeout(giveUp);
      socket.destroy();
      done({ response, closedAfterMs: Date.now() - t0, closedByServer });
    };
    const giveUp = setTimeout(() => finish(false), opts.giveUpMs ?? 10_000);
    socket.on('data', (d) => (response += d.toString('utf8')));
    socket.on('end', () => finish(true));
    socket.on('close', () => finish(true));
    socket.on('error', (err) => (finished ? undefined : fail(err)));
    socket.on('connect', async () => {
      for (const [i, c] of chunks.entries()) {
        if (i > 0) await sleep(opts.gapMs ?? 0);
        if (finished || socket.destroyed) return;
        socket.write(c);
      }
    });
  });
}

/** A loopback port nothing listens on (it was free a moment ago). */
async function freePort(): Promise<number> {
  const server = createServer();
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  const { port } = server.address() as AddressInfo;
  await new Promise<void>((r) => server.close(() => r()));
  return port;
}

/** Status line and JSON body of a raw HTTP/1.1 response. */
function parseRaw(response: string): { status: number; body: any } {
  const status = Number(/^HTTP\/1\.1 (\d{3})/.exec(response)?.[1] ?? 0);
  const text = response.slice(response.indexOf('\r\n\r\n') + 4);
  return { status, body: JSON.parse(text) };
}

/** A PNG that declares width × height in its header and holds no pixels: a decoder would refuse it, a header reader would not. */
function pngHeaderOnly(width: number, height: number): Buffer {
  const crc32 = (buf: Buffer) => {
    let crc = 0xffffffff;
    for (const b of buf) {
      crc ^= b;
      for (let k = 0; k < 8; k++) crc = crc & 1 ? 0xedb88320 ^ (crc >>> 1) : crc >>> 1;
    }
    return (crc ^ 0xffffffff) >>> 0;
  };
  const chunk = (type: string, data: Buffer) => {
    const head = Buffer.alloc(4);
    head.writeUInt32BE(data.length);
    const body = Buffer.concat([Buffer.from(type, 'latin1'), data]);
    const crc = Buffer.alloc(4);
    crc.writeUInt32BE(crc32(body));
    return Buffer.concat([head, body, crc]);
  };
  const ihdr = Buffer.alloc(13);
  ihdr.writeUInt32BE(width, 0);
  ihdr.writeUInt32BE(height, 4);
  ihdr[8] = 8; // bit depth
  ihdr[9] = 2; // RGB
  const signature = Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]);
  return Buffer.concat([signature, chunk('IHDR', ihdr), chunk('IDAT', deflateSync(Buffer.alloc(0))), chunk('IEND', Buffer.alloc(0))]);
}

describe('request bodies: nesting depth and text', () => {
  it('a batch body nested 10,000 levels deep → 400 too_deep (was a 500 stack overflow merging defaults), and the API carries on', async () => {
    const deep = '{"x":'.repeat(10_000) + '1' + '}'.repeat(10_000);
    const res = await farm.request('POST', '/v1/batches', `{"defaults":${deep},"items":[${deep}]}`);
    expect(res.status).toBe(400);
    expect(ApiError.parse(res.body).error).toMatchObject({ code: 'validation_failed', details: [{ field: '', rule: 'too_deep' }] });
    expect((await farm.get('/healthz')).status).toBe(200);
  });

  it('a generation nesting 40 levels inside a field → 400 too_deep; a real request with every nested section passes', async () => {
    const deep = '['.repeat(40) + ']'.repeat(40);
    const res = await farm.request('POST', '/v1/validate', `{"model":{"base":"stabilityai/stable-diffusion-xl-base-1.0"},"conditioning":{"prompt":"x"},"loras":${deep}}`);
    expect(res.status).toBe(400);
    expect(res.body.error.details[0].rule).toBe('too_deep');
    const item = basicRequest({ controlnets: [{ type: 'canny', image: { s3_key: 'none/x.png' } }] });
    const batch = await farm.request('POST', '/v1/batches', { defaults: { scheduler: { steps: 4 } }, items: [item] });
    // deep enough to reach the image check: the depth rule did not refuse it
    expect(batch.body.error?.details?.[0]?.rule).not.toBe('too_deep');
  });

  it('a body poisoning __proto__ → 400 in Kiln’s shape', async () => {
    const res = await farm.request('POST', '/v1/validate', '{"__proto__":{"admin":true},"model":{"base":"b"},"conditioning":{"prompt":"x"}}');
    expect(res.status).toBe(400);
    expect(ApiError.parse(res.body).error.code).toBe('validation_failed');
  });

  it.each([
    ['a prompt with a lone surrogate', { conditioning: { prompt: 'a kiln \uD800 at dusk' } }, 'conditioning.prompt', 'lone_surrogate'],
    ['a negative prompt with an escape sequence', { conditioning: { prompt: 'ok', negative_prompt: 'red\u001b[31m' } }, 'conditioning.negative_prompt', 'control_character'],
    ['a model name with NUL', { model: { base: 'stabilityai/stable-diffusion-xl-base-1.0\u0000' } }, 'model.base', 'control_character'],
    ['a LoRA name with a lone low surrogate', { loras: [{ name: '\uDC00lora' }] }, 'loras.0.name', 'lone_surrogate'],
  ])('%s → 400 naming the field (it used to reach the worker and fail as internal)', async (_what, over, field, rule) => {
    const res = await farm.request('POST', '/v1/generations', basicRequest(over));
    expect(res.status).toBe(400);
    expect(res.body.error.details).toEqual(expect.arrayContaining([expect.objectContaining({ field, rule })]));
    expect(res.body.error.message).toContain(field);
  });

  it('a batch item with a control character → 400 naming items.<i>.<field>', async () => {
    const res = await farm.request('POST', '/v1/batches', { items: [basicRequest(), basicRequest({ conditioning: { prompt: 'bell\u0007' } })] });
    expect(res.status).toBe(400);
    expect(res.body.error.details[0]).toMatchObject({ field: 'items.1.conditioning.prompt', rule: 'control_character' });
  });

  it('newlines, tabs and emoji are text: such a prompt runs', async () => {
    const job = await farm.submit(basicRequest({ conditioning: { prompt: 'a kiln 🔥\n\tat dusk' }, hyperparameters: { seed: 3, width: 64, height: 64 }, scheduler: { steps: 1 } }));
    const done = await farm.waitForDone(job.id);
    expect(done.status).toBe('succeeded');
    expect(done.request.conditioning.prompt).toBe('a kiln 🔥\n\tat dusk');
  });
});

describe('slow clients: the request timeout', () => {
  it('a body shorter than its Content-Length → 408 in Kiln’s shape and the socket closes, within the request timeout', async () => {
    const head = 'POST /v1/generations HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n';
    const { response, closedAfterMs, closedByServer } = await rawExchange([head + '{"model":']);
    expect(closedByServer).toBe(true);
    const res = parseRaw(response);
    expect(res.status).toBe(408);
    expect(ApiError.parse(res.body).error.code).toBe('request_timeout');
    expect(response).toMatch(/\r\nConnection: close\r\n/i);
    expect(closedAfterMs).toBeGreaterThanOrEqual(REQUEST_TIMEOUT_MS - 100);
    expect(closedAfterMs).toBeLessThan(REQUEST_TIMEOUT_MS + 3_000);
  });

  it('headers dripped a line at a time (slowloris) → 408 and closed near the headers timeout', async () => {
    const lines = ['GET /v1/agents HTTP/1.1\r\n', 'Host: 127.0.0.1\r\n', ...Array.from({ length: 30 }, (_, i) => `X-Drip-${i}: ${i}\r\n`)];
    const { response, closedAfterMs, closedByServer } = await rawExchange(lines, { gapMs: 200 });
    expect(closedByServer).toBe(true);
    expect(parseRaw(response)).toMatchObject({ status: 408, body: { error: { code: 'request_timeout' } } });
    expect(closedAfterMs).toBeLessThan(HEADERS_TIMEOUT_MS + 3_000);
  });

  it('an idle keep-alive connection between two prompt requests is not cut by the request timeout', async () => {
    const get = 'GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n';
    const { response, closedByServer } = await rawExchange([get, get], { gapMs: REQUEST_TIMEOUT_MS + 1_000, giveUpMs: REQUEST_TIMEOUT_MS + 2_000 });
    expect(closedByServer).toBe(false);
    expect(response.match(/HTTP\/1\.1 200/g)).toHaveLength(2);
  });
});

describe('every error is in Kiln’s shape, the framework’s own included', () => {
  const id = randomUUID();
  it.each([
    ['an unknown route', 'GET', '/v1/nothing-here', {}, undefined, 404, 'not_found'],
    ['a method a path does not have', 'PUT', '/v1/generations', {}, undefined, 404, 'not_found'],
    ['an id longer than any Kiln issues', 'GET', `/v1/jobs/${'a'.repeat(300)}`, {}, undefined, 414, 'uri_too_long'],
    ['a path that is not valid percent-encoding', 'GET', '/v1/jobs/%E0%A4%A', {}, undefined, 400, 'validation_failed'],
    ['a body that is not JSON', 'POST', '/v1/generations', { 'content-type': 'text/xml' }, '<x/>', 415, 'unsupported_media_type'],
    ['an empty JSON body on DELETE', 'DELETE', `/v1/jobs/${id}`, { 'content-type': 'application/json' }, '', 400, 'validation_failed'],
    ['a body over the size limit', 'POST', '/v1/generations', { 'content-type': 'application/json' }, JSON.stringify({ pad: 'x'.repeat(3 * 1024 * 1024) }), 413, 'payload_too_large'],
    ['invalid JSON', 'POST', '/v1/generations', { 'content-type': 'application/json' }, '{"model": ', 400, 'validation_failed'],
  ])('%s → %s %s', async (_what, method, path, headers, body, status, code) => {
    const res = await fetch(`${farm.api}${path}`, { method, headers, body });
    expect(res.status).toBe(status);
    const json = ApiError.parse(await res.json());
    expect(json.error.code).toBe(code);
  });

  it('a request line and headers over the server limit → 431 in Kiln’s shape', async () => {
    const { response } = await rawExchange([`GET /v1/jobs/${'a'.repeat(20_000)} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n`]);
    const res = parseRaw(response);
    expect(res.status).toBe(431);
    expect(ApiError.parse(res.body).error.code).toBe('headers_too_large');
  });

  it('bytes that are not HTTP → 400 in Kiln’s shape', async () => {
    const { response } = await rawExchange(['HELLO THERE\r\n\r\n']);
    const res = parseRaw(response);
    expect(res.status).toBe(400);
    expect(ApiError.parse(res.body).error.code).toBe('validation_failed');
  });
});

describe('input images', () => {
  it('a PNG declaring 30000×30000 → 413 payload_too_large from its header, before decoding', async () => {
    const init = { base64: pngHeaderOnly(30_000, 30_000).toString('base64') };
    for (const path of ['/v1/validate', '/v1/generations']) {
      const res = await farm.request('POST', path, basicRequest({ image: { init } }));
      expect(res.status).toBe(413);
      expect(res.body.error.code).toBe('payload_too_large');
      expect(res.body.error.details[0]).toMatchObject({ field: 'image.init.base64', rule: 'image_too_large' });
      expect(res.body.error.details[0].message).toContain('30000×30000');
    }
  });
});

describe('multi-image seeds', () => {
  it('seed 4294967295 with 8 images: image i uses (seed + i) mod 2^32, every reported seed within 0..2^32−1', async () => {
    const job = await farm.submit(basicRequest({ hyperparameters: { seed: 4294967295, num_images: 8, width: 64, height: 64 }, scheduler: { steps: 1 } }));
    const done = await farm.waitForDone(job.id);
    expect(done.status).toBe('succeeded');
    expect(done.outputs.map((o) => o.seed)).toEqual([4294967295, 0, 1, 2, 3, 4, 5, 6]);
  });
});

describe('nothing sensitive leaks', () => {
  it('a worker killed mid-job: the job’s error and events carry a Kiln code and the signal, never its stderr; the agent log has the stderr', async () => {
    const submitted = await farm.submit(basicRequest({ scheduler: { steps: 30 }, hyperparameters: { seed: 11, width: 1024, height: 1024 } }));
    const running = await farm.waitForJob(submitted.id, (j) => j.stage === 'running' && (j.progress?.step ?? 0) >= 1);
    const agent = (await farm.agents()).find((a) => a.agent_id === running.agent)!;
    process.kill(agent.worker.pid!, 'SIGKILL');

    const job = await farm.waitForDone(submitted.id, 30_000);
    expect(job.status).toBe('failed');
    expect(job.error!.message).toContain('worker_crashed');
    expect(job.error!.message).toContain('signal SIGKILL');
    const record = JSON.stringify(job);
    expect(record).not.toContain(STDERR_MARKER);
    expect(record).not.toContain('kiln_worker[');
    // the operator still has it
    await farm.waitFor(async () => readFileSync(resolve(farm.logDir, `${running.agent}.log`), 'utf8').includes(STDERR_MARKER), 5_000, 'stderr tail in the agent log');
    await farm.waitForAgents(1);
  });

  it('/readyz names the failing check in one word; the raw error (address, port, driver text) stays in the API log', async () => {
    const [deadPort, apiPort] = [await freePort(), await freePort()];
    farm.spawn('api-no-storage', ENTRY.api, { PORT: String(apiPort), S3_ENDPOINT: `http://127.0.0.1:${deadPort}` });
    const api = `http://127.0.0.1:${apiPort}`;
    await farm.waitFor(async () => (await fetch(`${api}/healthz`)).ok, 30_000, 'second API up');

    const res = await fetch(`${api}/readyz`);
    const text = await res.text();
    expect(res.status).toBe(503);
    expect(JSON.parse(text)).toEqual({ status: 'unavailable', checks: { redis: { ok: true }, storage: { ok: false, error: 'unreachable' } } });
    expect(text).not.toContain(String(deadPort));
    expect(text).not.toMatch(/ECONN|127\.0\.0\.1/);
    const log = readFileSync(resolve(farm.logDir, 'api-no-storage.log'), 'utf8');
    expect(log).toContain('readiness check failed');
    expect(log).toContain(String(deadPort));

    // the healthy API says ok with no error text at all
    expect(await (await fetch(`${farm.api}/readyz`)).json()).toEqual({ status: 'ok', checks: { redis: { ok: true }, storage: { ok: true } } });
  });

  it('the embedded S3 server (npm start, and these tests) listens on loopback only', () => {
    expect(farm.s3.host).toBe('127.0.0.1');
    expect(new URL(farm.s3.endpoint).hostname).toBe('127.0.0.1');
  });
});
