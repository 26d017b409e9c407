import { mkdtempSync, rmSync } from 'node:fs';
import { createServer, type Server, type Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, expect, it } from 'vitest';
import { Storage } from './storage.js';
import { startEmbeddedS3 } from '../../../scripts/farm-lib.js';

const servers: Server[] = [];
afterEach(async () => {
  await Promise.all(servers.splice(0).map((s) => new Promise((r) => s.close(r))));
});

/** A loopback "S3" that accepts connections, reads what it is sent, and never answers. */
async function silentServer(): Promise<{ port: number; sockets: Socket[] }> {
  const sockets: Socket[] = [];
  const server = createServer((s) => {
    sockets.push(s);
    s.on('error', () => {});
    s.resume();
  });
  servers.push(server);
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  server.on('close', () => sockets.forEach((s) => s.destroy()));
  return { port: (server.address() as { port: number }).port, sockets };
}

const env = (endpoint: string, stallMs: number, keys = { accessKey: 'kiln', secretKey: 'kiln-secret' }) => ({
  S3_ENDPOINT: endpoint,
  S3_ACCESS_KEY: keys.accessKey,
  S3_SECRET_KEY: keys.secretKey,
  S3_BUCKET: 'kiln-test',
  S3_REGION: 'us-east-1',
  S3_PRESIGN_EXPIRY_S: 60,
  S3_STALL_TIMEOUT_MS: stallMs,
});

it('fails a call to an S3 that accepts the connection and goes silent, once it moved no byte for S3_STALL_TIMEOUT_MS, instead of waiting forever', async () => {
  const silent = await silentServer();
  const storage = new Storage(env(`http://127.0.0.1:${silent.port}`, 300));
  const started = Date.now();
  const outcome = await Promise.race([
    storage.putBuffer('outputs/x/a1/0.png', Buffer.alloc(1024), 'image/png').then(
      () => 'answered',
      (err: Error) => err.message,
    ),
    new Promise((r) => setTimeout(() => r('still waiting after 20 s'), 20_000)),
  ]);
  expect(outcome).toMatch(/S3 moved no byte for 300 ms/);
  expect(silent.sockets.length).toBeGreaterThan(0); // it did reach the server
  expect(Date.now() - started).toBeGreaterThanOrEqual(300);
}, 30_000);

it('does not cut a working S3: calls that keep moving succeed, and an idle pooled connection cut past the stall timeout is no error', async () => {
  const dir = mkdtempSync(join(tmpdir(), 'kiln-s3-'));
  const s3 = await startEmbeddedS3(dir);
  try {
    const storage = new Storage(env(s3.endpoint, 2_000, s3));
    await storage.ensureBucket();
    const body = Buffer.alloc(8 * 1024 * 1024, 7);
    await storage.putBuffer('outputs/x/a1/0.bin', body, 'application/octet-stream');
    expect((await storage.getBuffer('outputs/x/a1/0.bin', body.length))?.equals(body)).toBe(true);
    // an idle kept-alive connection outliving the timeout is not an error for the next call
    await new Promise((r) => setTimeout(r, 2_500));
    expect(await storage.stat('outputs/x/a1/0.bin')).toEqual({ size: body.length });
  } finally {
    await s3.stop();
    rmSync(dir, { recursive: true, force: true });
  }
}, 30_000);
