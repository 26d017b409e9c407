import type { OutgoingHttpHeaders } from 'node:http';
import type { FastifyReply } from 'fastify';

/**
 * One server-sent events response: takes the socket from Fastify (the headers hooks set, CORS
 * included, are kept), writes `event`/`id`/`data` frames, a comment every `keepAliveMs` so
 * proxies and clients keep the connection, and ends when told or when the client goes away
 * (`signal` aborts then, so whoever waits on its behalf wakes up).
 */
export class SseStream {
  private readonly aborter = new AbortController();
  private readonly keepAlive: NodeJS.Timeout;
  readonly signal = this.aborter.signal;

  constructor(private readonly reply: FastifyReply, keepAliveMs: number) {
    reply.hijack();
    const raw = reply.raw;
    raw.writeHead(200, {
      ...(reply.getHeaders() as OutgoingHttpHeaders),
      'content-type': 'text/event-stream; charset=utf-8',
      'cache-control': 'no-cache, no-transform',
      connection: 'keep-alive',
      'x-accel-buffering': 'no', // nginx: do not buffer the stream
    });
    raw.write('retry: 2000\n\n');
    raw.socket?.setNoDelay(true);
    this.keepAlive = setInterval(() => this.comment('keep-alive'), keepAliveMs);
    raw.on('close', () => this.close());
  }

  get closed(): boolean {
    return this.signal.aborted;
  }

  send(event: string, id: string | null, data: unknown): void {
    if (this.closed) return;
    this.reply.raw.write(`event: ${event}\n${id === null ? '' : `id: ${id}\n`}data: ${JSON.stringify(data)}\n\n`);
  }

  comment(text: string): void {
    if (!this.closed) this.reply.raw.write(`: ${text}\n\n`);
  }

  close(): void {
    if (this.closed) return;
    clearInterval(this.keepAlive);
    this.aborter.abort();
    this.reply.raw.end();
  }
}
