import { EventEmitter } from 'node:events';
import { Cluster, Redis } from 'ioredis';
import { processLogger } from './logger.js';
import { redisErrors } from './metrics.js';

/**
 * Redis connections, and how a process tells its operator about Redis going away.
 *
 * An outage is expected to heal: every client retries on its own (quickly, so every process
 * is back within about a second of Redis), and commands wait in the client's queue meanwhile.
 * So a process says two things about it: one warning when the first connection drops, one
 * when every dropped connection is back, with how long it took. Connection errors in between
 * are not news and are not logged; any other Redis error is, as one line without a stack.
 */

const CONNECTION_CODES = new Set(['ECONNREFUSED', 'ECONNRESET', 'ECONNABORTED', 'ETIMEDOUT', 'EPIPE', 'ENOTFOUND', 'EHOSTUNREACH', 'ENETUNREACH', 'EAI_AGAIN']);
const CONNECTION_MESSAGES = /Connection is closed|Stream isn't writeable|Socket closed unexpectedly|connect ETIMEDOUT|^LOADING|CLUSTERDOWN|TRYAGAIN|Failed to refresh slots cache|None of startup nodes is available|Reached the max retries per request/;

/** Whether an error only says that Redis is unreachable or restarting (expected in an outage). */
export function isConnectionError(err: unknown): boolean {
  const e = err as { code?: unknown; message?: unknown } | null;
  if (typeof e?.code === 'string' && CONNECTION_CODES.has(e.code)) return true;
  return typeof e?.message === 'string' && CONNECTION_MESSAGES.test(e.message);
}

/** The process's view of its Redis connections: lost, restored, and the time between. */
export class RedisHealth extends EventEmitter<{ lost: []; restored: [downMs: number] }> {
  private readonly down = new Set<object>();
  private since = 0;
  private lastError = '';

  get connected(): boolean {
    return this.down.size === 0;
  }

  /** Reports this client's outages and errors; called for every client a process makes. */
  watch(client: Redis, name: string): Redis {
    client.on('error', (err: Error) => this.error(err, name));
    // 'reconnecting' only follows a connection ioredis did not mean to close (not quit())
    client.on('reconnecting', () => this.lose(client, name));
    client.on('ready', () => this.restore(client));
    client.on('end', () => this.restore(client));
    return client;
  }

  /** The `error` listener for BullMQ objects and Redis clients: quiet for connection trouble. */
  error(err: unknown, source: string): void {
    const message = err instanceof Error ? err.message : String(err);
    if (isConnectionError(err)) {
      redisErrors.inc({ kind: 'connection' });
      this.lastError = message;
      return;
    }
    redisErrors.inc({ kind: 'other' });
    processLogger().warn({ source, err: message }, 'Redis error');
  }

  private lose(client: object, name: string): void {
    if (this.down.has(client)) return;
    if (this.down.size === 0) {
      this.since = Date.now();
      processLogger().warn({ connection: name, err: this.lastError || undefined }, 'lost the connection to Redis; retrying');
      this.emit('lost');
    }
    this.down.add(client);
  }

  private restore(client: object): void {
    if (!this.down.delete(client) || this.down.size > 0) return;
    const downMs = Date.now() - this.since;
    processLogger().warn({ down_ms: downMs }, `Redis is back after ${(downMs / 1000).toFixed(1)} s`);
    this.lastError = '';
    this.emit('restored', downMs);
  }
}

/** This process's Redis health: every client from createRedis reports to it. */
export const redisHealth = new RedisHealth();

/** Attaches the quiet `error` listener to a BullMQ Queue, Worker or QueueEvents (BullMQ prints with console.error otherwise). */
export function quietErrors<T extends { on(event: 'error', listener: (err: Error) => void): unknown }>(emitter: T, source: string): T {
  emitter.on('error', (err) => redisHealth.error(err, source));
  return emitter;
}

/** Reconnect every few hundred ms, at most a second apart: every process is back within about a second of Redis. */
const retryStrategy = (times: number) => Math.min(100 * times, 1_000);

/**
 * A connection BullMQ can share (it requires maxRetriesPerRequest: null for workers); after an
 * outage every process is back within about a second of Redis — failover waits on that (see
 * the dispatcher). `?cluster=true` on the URL (any node's address) makes a Redis Cluster
 * client; with a hash-tagged KILN_PREFIX every key a farm uses is in one slot, so every
 * command and script Kiln and BullMQ send is one a single node answers. It is typed as Redis:
 * Kiln uses only commands both clients have.
 */
export function createRedis(url: string, name?: string): Redis {
  const parsed = new URL(url);
  if (parsed.searchParams.get('cluster') === 'true') {
    const cluster = new Cluster([{ host: parsed.hostname, port: Number(parsed.port || 6379) }], {
      clusterRetryStrategy: retryStrategy,
      redisOptions: {
        maxRetriesPerRequest: null,
        connectionName: name,
        username: decodeURIComponent(parsed.username) || undefined,
        password: decodeURIComponent(parsed.password) || undefined,
        ...(parsed.protocol === 'rediss:' ? { tls: {} } : {}),
      },
    });
    return redisHealth.watch(cluster as unknown as Redis, name ?? 'redis');
  }
  const client = new Redis(url, {
    maxRetriesPerRequest: null,
    connectionName: name,
    lazyConnect: false,
    retryStrategy,
  });
  return redisHealth.watch(client, name ?? 'redis');
}

/** Pings Redis once without retrying forever; resolves to an error message or null. */
export async function probeRedis(url: string, timeoutMs = 2_000): Promise<string | null> {
  const r = new Redis(url, { lazyConnect: true, maxRetriesPerRequest: 0, retryStrategy: () => null, connectTimeout: timeoutMs });
  r.on('error', () => {});
  try {
    await r.connect();
    await r.ping();
    return null;
  } catch (err) {
    return err instanceof Error ? err.message : String(err);
  } finally {
    r.disconnect();
  }
}

export type { Redis };
