import { mkdtempSync, rmSync } from 'node:fs';
import { connect, createServer, type Server, type Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { execa, type ResultPromise } from 'execa';
import { Redis } from 'ioredis';

/**
 * A redis-server of a test's own, on a loopback port, so the test can take it away: stop it
 * cleanly (SHUTDOWN on SIGTERM), kill it (SIGKILL), freeze it (SIGSTOP) and bring it back on the
 * same port with the same data directory. AOF is on (`everysec`, as the README recommends): a
 * Redis that forgets everything on restart loses every job whatever Kiln does.
 */
export class RedisServer {
  port = 0;
  readonly dir = mkdtempSync(join(tmpdir(), 'kiln-redis-'));
  private proc: ResultPromise | null = null;

  constructor(private readonly opts: { aof?: boolean } = {}) {}

  get url(): string {
    return `redis://127.0.0.1:${this.port}`;
  }

  get pid(): number | undefined {
    return this.proc?.pid;
  }

  async start(): Promise<this> {
    this.port ||= await freePort();
    const aof = this.opts.aof ?? true;
    this.proc = execa('redis-server', [
      '--port', String(this.port),
      '--bind', '127.0.0.1',
      '--save', '',
      '--appendonly', aof ? 'yes' : 'no',
      '--appendfsync', 'everysec',
      '--dir', this.dir,
      '--maxmemory-policy', 'noeviction',
    ], { reject: false, stdio: 'ignore' });
    const deadline = Date.now() + 10_000;
    for (;;) {
      const probe = new Redis(this.url, { lazyConnect: true, maxRetriesPerRequest: 0, retryStrategy: () => null });
      probe.on('error', () => {});
      try {
        await probe.connect();
        if ((await probe.ping()) === 'PONG') return this;
      } catch {
        if (Date.now() > deadline) throw new Error(`redis-server on port ${this.port} did not start`);
      } finally {
        probe.disconnect();
      }
      await new Promise((r) => setTimeout(r, 50));
    }
  }

  /** SIGTERM: Redis flushes its AOF and exits, as on a clean restart. */
  async stop(): Promise<void> {
    this.proc?.kill('SIGTERM');
    await this.proc;
    this.proc = null;
  }

  /** SIGKILL: gone at once; up to a second of acknowledged writes may be lost (everysec). */
  async kill(): Promise<void> {
    this.proc?.kill('SIGKILL');
    await this.proc;
    this.proc = null;
  }

  freeze(): void {
    this.proc?.kill('SIGSTOP');
  }

  thaw(): void {
    this.proc?.kill('SIGCONT');
  }

  async close(): Promise<void> {
    if (this.proc) {
      this.proc.kill('SIGCONT');
      await this.kill();
    }
    rmSync(this.dir, { recursive: true, force: true });
  }
}

/** A TCP port free on loopback right now. */
export function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const srv = createServer();
    srv.once('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const port = (srv.address() as { port: number }).port;
      srv.close(() => resolve(port));
    });
  });
}

/**
 * A TCP relay on loopback in front of a server, to cut one group of clients off (a network
 * blip on their side) while others keep their connections: `cut` drops every connection and
 * refuses new ones until `restore`.
 */
export class TcpProxy {
  port = 0;
  private server: Server | null = null;
  private readonly sockets = new Set<Socket>();

  constructor(private readonly targetPort: () => number) {}

  get url(): string {
    return `redis://127.0.0.1:${this.port}`;
  }

  async start(): Promise<this> {
    this.port ||= await freePort();
    this.server = createServer((client) => {
      const upstream = connect(this.targetPort(), '127.0.0.1');
      for (const s of [client, upstream]) {
        this.sockets.add(s);
        s.on('close', () => this.sockets.delete(s));
        s.on('error', () => {});
      }
      client.pipe(upstream).pipe(client);
      client.on('close', () => upstream.destroy());
      upstream.on('close', () => client.destroy());
    });
    await new Promise<void>((r) => this.server!.listen(this.port, '127.0.0.1', r));
    return this;
  }

  async cut(): Promise<void> {
    const closed = new Promise((r) => this.server?.close(r));
    for (const s of this.sockets) s.destroy();
    await closed;
    this.server = null;
  }

  restore(): Promise<this> {
    return this.start();
  }

  close(): Promise<void> {
    return this.cut();
  }
}
