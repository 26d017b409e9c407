import { Counter, Histogram, metricsText, registry, serveMetrics } from '@kiln/runtime';
import type { FastifyInstance } from 'fastify';
import type { ApiContext } from '../context.js';

const httpRequests = new Counter({
  name: 'kiln_http_requests_total',
  help: 'API requests answered, by method, route pattern (never the raw path) and status code',
  labelNames: ['method', 'route', 'status'] as const,
  registers: [registry],
});

const httpSeconds = new Histogram({
  name: 'kiln_http_request_duration_seconds',
  help: 'Time to answer an API request, by method and route pattern',
  labelNames: ['method', 'route'] as const,
  buckets: [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10],
  registers: [registry],
});

/**
 * The API's metrics and request log.
 *
 * `GET /metrics` on the API's own port needs an admin key when keys are set (Prometheus sends
 * it as a bearer token); with `METRICS_PORT` the same text is also served on a port of its own
 * (METRICS_HOST, loopback by default) without a key, for a scraper on a private network.
 *
 * One log line per request, after it is answered: debug for a success, info for a 4xx, warn for
 * a 5xx — a polling client no longer floods the terminal, and a refusal still shows.
 */
export async function registerMetrics(app: FastifyInstance, ctx: ApiContext): Promise<void> {
  app.addHook('onResponse', async (req, reply) => {
    const route = req.routeOptions.url ?? '(unmatched)';
    const status = reply.statusCode;
    const seconds = reply.elapsedTime / 1000;
    httpRequests.inc({ method: req.method, route, status: String(status) });
    httpSeconds.observe({ method: req.method, route }, seconds);
    const level = status >= 500 ? 'warn' : status >= 400 ? 'info' : 'debug';
    req.log[level]({ method: req.method, url: req.url, status, ms: Math.round(reply.elapsedTime), tenant: req.principal?.tenant }, `${req.method} ${route} ${status}`);
  });

  app.get('/metrics', { config: { auth: 'admin' }, schema: { hide: true } }, async (_req, reply) => {
    const { contentType, body } = await metricsText();
    return reply.type(contentType).send(body);
  });

  const own = await serveMetrics(ctx.env, ctx.log);
  app.addHook('onClose', async () => own.close());
}
