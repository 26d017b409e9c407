import http from 'node:http';
import https from 'node:https';
import type { Socket } from 'node:net';
import { Client } from 'minio';
import type { StorageEnv } from './env.js';
import { KilnError } from './errors.js';
import { s3Errors } from './metrics.js';

/**
 * S3-compatible storage through the minio client. Each run of a job uploads under keys of its
 * own (`outputKey`), so an attempt that lost its job can never replace the objects the job's
 * record describes: only the guarded write that ends the job makes a run's objects its outputs.
 * Presigned URLs are signed for S3_PUBLIC_ENDPOINT when set (the address clients reach),
 * which can differ from the address Kiln's processes use.
 */
export class Storage {
  private readonly client: Client;
  private readonly signer: Client;
  readonly bucket: string;

  constructor(private readonly env: StorageEnv) {
    this.bucket = env.S3_BUCKET;
    this.client = clientFor(env.S3_ENDPOINT, env);
    this.signer = env.S3_PUBLIC_ENDPOINT ? clientFor(env.S3_PUBLIC_ENDPOINT, env) : this.client;
  }

  /** Where one run of a job puts output `index`; `run` names the attempt (see the agent). */
  static outputKey(jobId: string, run: string, index: number, ext: string): string {
    return `outputs/${jobId}/${run}/${index}.${ext}`;
  }

  /** Whether an error says the object is not there (retrying cannot help), not that S3 is unreachable. */
  static isNotFound(err: unknown): boolean {
    const code = (err as { code?: unknown } | null)?.code;
    return code === 'NoSuchKey' || code === 'NotFound' || code === 'NoSuchBucket';
  }

  async ensureBucket(): Promise<void> {
    await counted('ensure_bucket', async () => {
      if (!(await this.client.bucketExists(this.bucket))) {
        try {
          await this.client.makeBucket(this.bucket, this.env.S3_REGION);
        } catch (err) {
          // another process may have created it in between
          if (!(await this.client.bucketExists(this.bucket))) throw err;
        }
      }
    });
  }

  /** Uploads a file of known size (s3rver and some gateways lack multipart listing). */
  async putFile(key: string, path: string, contentType: string, meta: Record<string, string> = {}): Promise<void> {
    await counted('put', () => this.client.fPutObject(this.bucket, key, path, { 'Content-Type': contentType, ...meta }));
  }

  async putBuffer(key: string, body: Buffer, contentType: string): Promise<void> {
    await counted('put', () => this.client.putObject(this.bucket, key, body, body.length, { 'Content-Type': contentType }));
  }

  /** Downloads an object to a local file. */
  async getFile(key: string, path: string): Promise<void> {
    await counted('get', () => this.client.fGetObject(this.bucket, key, path));
  }

  /** Reads an object of at most `maxBytes` (checked before reading). */
  async getBuffer(key: string, maxBytes: number): Promise<Buffer | null> {
    const st = await this.stat(key);
    if (!st) return null;
    if (st.size > maxBytes) throw new KilnError('payload_too_large', `${key} is ${st.size} bytes; the limit is ${maxBytes}`);
    const stream = await counted('get', () => this.client.getObject(this.bucket, key));
    const chunks: Buffer[] = [];
    for await (const c of stream) chunks.push(c as Buffer);
    return Buffer.concat(chunks);
  }

  /** Keys and sizes under a prefix (ListObjectsV2). */
  async list(prefix: string, max = 20_000): Promise<{ key: string; size: number }[]> {
    const out: { key: string; size: number }[] = [];
    return counted('list', async () => {
      const stream = this.client.listObjectsV2(this.bucket, prefix, true);
      for await (const o of stream as AsyncIterable<{ name?: string; size?: number }>) {
        if (o.name) out.push({ key: o.name, size: o.size ?? 0 });
        if (out.length > max) break;
      }
      return out;
    });
  }

  /** Deletes objects; a key that is not there is not an error. */
  async remove(keys: string[]): Promise<void> {
    for (const key of keys) await counted('remove', () => this.client.removeObject(this.bucket, key));
  }

  async presign(key: string): Promise<string> {
    return this.signer.presignedGetObject(this.bucket, key, this.env.S3_PRESIGN_EXPIRY_S);
  }

  /** A URL a client may PUT one object to, at `key`, for `expiryS` seconds (uploads). */
  async presignPut(key: string, expiryS: number): Promise<string> {
    return this.signer.presignedPutObject(this.bucket, key, expiryS);
  }

  async stat(key: string): Promise<{ size: number } | null> {
    try {
      const s = await this.client.statObject(this.bucket, key);
      return { size: s.size };
    } catch (err) {
      if (!Storage.isNotFound(err)) s3Errors.inc({ operation: 'stat' });
      return null;
    }
  }

  /** Readiness: the bucket answers. */
  async ping(): Promise<void> {
    await counted('ping', () => this.client.bucketExists(this.bucket));
  }
}

/** Runs one S3 operation, counting its failure (kiln_s3_errors_total) unless the object was simply not there. */
async function counted<T>(operation: string, op: () => Promise<T>): Promise<T> {
  try {
    return await op();
  } catch (err) {
    if (!Storage.isNotFound(err)) s3Errors.inc({ operation });
    throw err;
  }
}

/**
 * Connections to S3 that are cut when they stall: the minio client sets no timeout, so a server
 * that accepts a connection and then goes silent (a hung gateway, a network partition) would
 * hold an upload — and the job — forever. A socket that moves no byte for S3_STALL_TIMEOUT_MS is
 * destroyed, which fails the call in flight like any outage (the agent's transfers retry it); a
 * large transfer that keeps moving is never cut.
 */
function stallingAgent(useSSL: boolean, stallMs: number): http.Agent {
  const Base = useSSL ? https.Agent : http.Agent;
  const agent = new Base({ keepAlive: true });
  const create = agent.createConnection.bind(agent) as (...args: unknown[]) => Socket;
  agent.createConnection = ((...args: unknown[]) => {
    const socket = create(...args);
    socket.setTimeout(stallMs, () => socket.destroy(Object.assign(new Error(`S3 moved no byte for ${stallMs} ms (S3_STALL_TIMEOUT_MS)`), { code: 'ETIMEDOUT' })));
    return socket;
  }) as typeof agent.createConnection;
  return agent;
}

function clientFor(endpoint: string, env: StorageEnv): Client {
  const u = new URL(endpoint);
  const useSSL = u.protocol === 'https:';
  return new Client({
    transportAgent: stallingAgent(useSSL, env.S3_STALL_TIMEOUT_MS),
    endPoint: u.hostname,
    port: u.port ? Number(u.port) : useSSL ? 443 : 80,
    useSSL,
    accessKey: env.S3_ACCESS_KEY,
    secretKey: env.S3_SECRET_KEY,
    region: env.S3_REGION, // set, so presigning never asks the server for the region
    pathStyle: true,
  });
}
