import { createServer, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { Counter, collectDefaultMetrics, Gauge, Histogram, Registry } from 'prom-client';
import { z } from 'zod';
import type { Logger } from './logger.js';
import { TracingEnv } from './tracing.js';

/**
 * Prometheus metrics: one registry per process, the families every process shares (job ends,
 * stage times, Redis and S3 errors, webhook deliveries), and the small HTTP server the
 * dispatcher and the agents expose them on. Each process adds its own families in
 * `apps/<process>/src/metrics.ts`, on this registry.
 *
 * Conventions: names carry base units (`_seconds`, `_bytes`, `_total`); every label has a
 * bounded set of values (kinds, outcomes, error codes, stages, tiers — never a job id); a
 * counter counts in the process that did the thing, so a farm-wide figure is a `sum()`.
 */

export const registry = new Registry();
collectDefaultMetrics({ register: registry });

export { Counter, Gauge, Histogram };

/** Seconds-scale buckets shared by the job-time histograms (50 ms … 1 h). */
export const JOB_SECONDS_BUCKETS = [0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600];

export const jobsSubmitted = new Counter({
  name: 'kiln_jobs_submitted_total',
  help: 'Jobs accepted, by kind (a batch counts each of its generations)',
  labelNames: ['kind', 'priority'] as const,
  registers: [registry],
});

export const jobsEnded = new Counter({
  name: 'kiln_jobs_ended_total',
  help: 'Jobs that reached a terminal status, by kind, outcome (succeeded, failed, canceled) and error code ("none" on success)',
  labelNames: ['kind', 'outcome', 'code'] as const,
  registers: [registry],
});

export const jobStageSeconds = new Histogram({
  name: 'kiln_job_stage_seconds',
  help: "Time a job spent in each stage, observed when it ends: queued (waiting for a GPU), model_load, inference, upload",
  labelNames: ['kind', 'stage'] as const,
  buckets: JOB_SECONDS_BUCKETS,
  registers: [registry],
});

export const jobSeconds = new Histogram({
  name: 'kiln_job_duration_seconds',
  help: 'Submit to end, by kind and outcome',
  labelNames: ['kind', 'outcome'] as const,
  buckets: JOB_SECONDS_BUCKETS,
  registers: [registry],
});

export const redisErrors = new Counter({
  name: 'kiln_redis_errors_total',
  help: 'Redis errors seen by this process: connection (unreachable, reconnecting) or other',
  labelNames: ['kind'] as const,
  registers: [registry],
});

export const s3Errors = new Counter({
  name: 'kiln_s3_errors_total',
  help: 'S3 operations that failed (a missing object on a read is not counted), by operation',
  labelNames: ['operation'] as const,
  registers: [registry],
});

export const webhookDeliveries = new Counter({
  name: 'kiln_webhook_deliveries_total',
  help: 'Webhook delivery tries, by outcome: delivered (2xx), rejected (another status), failed (timeout, connection), refused (target not allowed)',
  labelNames: ['outcome'] as const,
  registers: [registry],
});

export const webhookSeconds = new Histogram({
  name: 'kiln_webhook_delivery_seconds',
  help: 'Time of one webhook delivery try, by outcome',
  labelNames: ['outcome'] as const,
  buckets: [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30],
  registers: [registry],
});

/**
 * METRICS_HOST / METRICS_PORT: where a process serves /metrics of its own (off without a port);
 * with them, every process's tracing variables (OTEL_EXPORTER_OTLP_ENDPOINT: tracing.ts).
 */
export const MetricsEnv = z
  .object({
    METRICS_HOST: z.string().min(1).default('127.0.0.1').describe('address the metrics server listens on'),
    METRICS_PORT: z.coerce.number().int().min(0).max(65535).optional().describe('port of this process’s /metrics server; unset: none'),
  })
  .extend(TracingEnv.shape);
export type MetricsEnv = z.infer<typeof MetricsEnv>;

/** The text Prometheus scrapes, and its content type. */
export async function metricsText(): Promise<{ contentType: string; body: string }> {
  return { contentType: registry.contentType, body: await registry.metrics() };
}

/**
 * A small HTTP server answering `GET /metrics` (anything else is a 404), for processes without
 * an HTTP API. A port that cannot be bound is logged, not fatal: metrics must not stop a GPU
 * from working. Returns its close function and the bound port (null when not listening).
 */
export async function serveMetrics(env: MetricsEnv, log: Logger): Promise<{ port: number | null; close: () => Promise<void> }> {
  if (env.METRICS_PORT === undefined) return { port: null, close: async () => {} };
  const server: Server = createServer((req, res) => {
    const path = (req.url ?? '').split('?')[0];
    if (req.method !== 'GET' || path !== '/metrics') {
      res.writeHead(404, { 'content-type': 'text/plain' }).end('not found\n');
      return;
    }
    metricsText().then(
      ({ contentType, body }) => res.writeHead(200, { 'content-type': contentType }).end(body),
      (err) => res.writeHead(500, { 'content-type': 'text/plain' }).end(`metrics failed: ${err instanceof Error ? err.message : String(err)}\n`),
    );
  });
  const port = await new Promise<number | null>((resolve) => {
    server.once('error', (err) => {
      log.error({ err: err.message, host: env.METRICS_HOST, port: env.METRICS_PORT }, 'metrics server could not listen; this process runs without /metrics');
      resolve(null);
    });
    server.listen(env.METRICS_PORT, env.METRICS_HOST, () => resolve((server.address() as AddressInfo).port));
  });
  if (port !== null) log.debug({ url: `http://${env.METRICS_HOST}:${port}/metrics` }, 'metrics served');
  return {
    port,
    close: () => new Promise<void>((resolve) => (port === null ? resolve() : server.close(() => resolve()))),
  };
}
