import { contextOf, requestContext, type Span, SpanKind, SpanStatusCode, tracer, tracingOn } from '@kiln/runtime';
import type { FastifyInstance } from 'fastify';

declare module 'fastify' {
  interface FastifyRequest {
    /** this request's span, while tracing is on */
    span?: Span;
  }
}

/**
 * With tracing on (OTEL_EXPORTER_OTLP_ENDPOINT), each request is a server span continuing the
 * client's `traceparent` header, named by its route pattern. The rest of the request runs in
 * its async scope (`requestContext`), so a job it creates records this span as its parent and
 * the job's spans in every other process join the client's trace.
 */
export function registerTracing(app: FastifyInstance): void {
  if (!tracingOn()) return;
  app.addHook('onRequest', (req, _reply, done) => {
    const header = req.headers.traceparent;
    const span = tracer().startSpan(
      `${req.method} ${req.routeOptions.url ?? '(unmatched)'}`,
      { kind: SpanKind.SERVER, attributes: { 'http.request.method': req.method, 'http.route': req.routeOptions.url ?? '', 'url.path': req.url.split('?')[0] } },
      contextOf(typeof header === 'string' ? header : undefined),
    );
    req.span = span;
    // the hooks after this one and the handler run inside the scope: done() is called in it
    requestContext.run({ span }, done);
  });
  app.addHook('onResponse', async (req, reply) => {
    const span = req.span;
    if (!span) return;
    span.setAttribute('http.response.status_code', reply.statusCode);
    if (req.principal) span.setAttribute('kiln.tenant', req.principal.tenant);
    if (reply.statusCode >= 500) span.setStatus({ code: SpanStatusCode.ERROR });
    span.end();
  });
}
