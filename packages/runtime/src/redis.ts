import { Redis } from 'ioredis';

/** A connection BullMQ can share (it requires maxRetriesPerRequest: null for workers). */
export function createRedis(url: string, name?: string): Redis {
  return new Redis(url, { maxRetriesPerRequest: null, connectionName: name, lazyConnect: false });
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
