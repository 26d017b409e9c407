import { randomBytes } from 'node:crypto';
import { createServer, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { basicRequest, Farm } from './support/farm.js';
import { WebhookReceiver } from './support/webhook-receiver.js';

interface Exported {
  service: string;
  traceId: string;
  spanId: string;
  parentSpanId: string;
  name: string;
  attributes: Record<string, unknown>;
}

/** A real OTLP/HTTP receiver (JSON encoding) on loopback: every span every process exports. */
class OtlpReceiver {
  readonly spans: Exported[] = [];
  private server: Server | null = null;
  url = '';

  async start(): Promise<this> {
    this.server = createServer((req, res) => {
      const chunks: Buffer[] = [];
      req.on('data', (c) => chunks.push(c));
      req.on('end', () => {
        if (req.method === 'POST' && req.url === '/v1/traces') {
          const body = JSON.parse(Buffer.concat(chunks).toString('utf8'));
          for (const rs of body.resourceSpans ?? []) {
            const service = rs.resource?.attributes?.find((a: { key: string }) => a.key === 'service.name')?.value?.stringValue ?? '';
            for (const ss of rs.scopeSpans ?? []) {
              for (const s of ss.spans ?? []) {
                const attributes = Object.fromEntries((s.attributes ?? []).map((a: { key: string; value: Record<string, unknown> }) => [a.key, Object.values(a.value)[0]]));
                this.spans.push({ service, traceId: s.traceId, spanId: s.spanId, parentSpanId: s.parentSpanId ?? '', name: s.name, attributes });
              }
            }
          }
        }
        res.writeHead(200, { 'content-type': 'application/json' }).end('{}');
      });
    });
    await new Promise<void>((r) => this.server!.listen(0, '127.0.0.1', r));
    this.url = `http://127.0.0.1:${(this.server!.address() as AddressInfo).port}`;
    return this;
  }

  async close(): Promise<void> {
    await new Promise((r) => this.server?.close(r));
  }
}

/**
 * OpenTelemetry: with OTEL_EXPORTER_OTLP_ENDPOINT set, one job is one trace that continues the
 * client's traceparent through the API, the dispatcher, the agent, its worker request, the
 * upload and the webhook delivery — each span parented where it belongs.
 */
describe('tracing across processes', () => {
  const otlp = new OtlpReceiver();
  const hooks = new WebhookReceiver();
  let farm: Farm;

  beforeAll(async () => {
    await otlp.start();
    await hooks.start();
    farm = new Farm({ agents: 1, env: { OTEL_EXPORTER_OTLP_ENDPOINT: otlp.url } });
    await farm.start();
  }, 90_000);
  afterAll(async () => {
    await farm?.close();
    await otlp.close();
    await hooks.close();
  });

  it("one trace per job, continuing the client's traceparent, with each process's spans where they belong", async () => {
    const traceId = randomBytes(16).toString('hex');
    const clientSpan = randomBytes(8).toString('hex');
    const job = await farm.submit(basicRequest({ webhook: { url: hooks.url, events: ['completed'] } }), { traceparent: `00-${traceId}-${clientSpan}-01` });
    expect((await farm.waitForDone(job.id)).status).toBe('succeeded');
    await farm.waitFor(async () => hooks.received.length >= 1, 10_000, 'the webhook');

    const mine = () => otlp.spans.filter((s) => s.traceId === traceId);
    const names = ['POST /v1/generations', 'dispatcher place', 'agent run', 'worker request', 'upload outputs', 'webhook deliver'];
    await farm.waitFor(async () => names.every((n) => mine().some((s) => s.name === n)), 15_000, `spans ${names.join(', ')}; got ${JSON.stringify(otlp.spans.map((s) => s.name))}`);
    const one = (name: string) => {
      const found = mine().filter((s) => s.name === name);
      expect(found, name).toHaveLength(1);
      return found[0]!;
    };
    const api = one('POST /v1/generations');
    const place = one('dispatcher place');
    const run = one('agent run');
    const worker = one('worker request');
    const upload = one('upload outputs');
    const webhook = one('webhook deliver');

    // who exported what
    expect([api.service, place.service, run.service, worker.service, webhook.service]).toEqual(['kiln-api', 'kiln-dispatcher', 'kiln-agent', 'kiln-agent', 'kiln-dispatcher']);
    // the API continues the client's span; the job's spans in the other processes hang off the API's
    expect(api.parentSpanId).toBe(clientSpan);
    expect(place.parentSpanId).toBe(api.spanId);
    expect(run.parentSpanId).toBe(api.spanId);
    expect(webhook.parentSpanId).toBe(api.spanId);
    expect(worker.parentSpanId).toBe(run.spanId);
    expect(upload.parentSpanId).toBe(run.spanId);
    expect(place.attributes['kiln.job']).toBe(job.id);
    expect(run.attributes['kiln.agent']).toBe('agent-0');
    expect(webhook.attributes['http.response.status_code']).toBe(204);

    // a request without a traceparent starts a trace of its own; polling requests are spans of their own traces
    const other = await farm.submit(basicRequest());
    await farm.waitForDone(other.id);
    await farm.waitFor(async () => otlp.spans.some((s) => s.name === 'agent run' && s.attributes['kiln.job'] === other.id), 15_000, 'the second job’s run span');
    const otherRun = otlp.spans.find((s) => s.name === 'agent run' && s.attributes['kiln.job'] === other.id)!;
    expect(otherRun.traceId).not.toBe(traceId);
    expect(otlp.spans.find((s) => s.spanId === otherRun.parentSpanId)?.name).toBe('POST /v1/generations');
  }, 60_000);
});
