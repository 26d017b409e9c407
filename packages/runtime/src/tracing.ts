import { AsyncLocalStorage } from 'node:async_hooks';
import { type Attributes, type Context, context, propagation, ROOT_CONTEXT, type Span, SpanKind, SpanStatusCode, trace } from '@opentelemetry/api';
import { W3CTraceContextPropagator } from '@opentelemetry/core';
import { OTLPTraceExporter } from '@opentelemetry/exporter-trace-otlp-http';
import { resourceFromAttributes } from '@opentelemetry/resources';
import { BatchSpanProcessor, TracerProvider } from '@opentelemetry/sdk-trace';
import { z } from 'zod';
import type { Logger } from './logger.js';

/**
 * OpenTelemetry tracing, off unless OTEL_EXPORTER_OTLP_ENDPOINT is set: then each process
 * exports its spans over OTLP/HTTP (JSON) to `<endpoint>/v1/traces`, as `kiln-<process>`.
 *
 * One trace per job, continuing the client's `traceparent`: the API's request span is the
 * job's parent, and its W3C `traceparent` is kept on the job's record (field `trace`), so every
 * process that touches the job later — the dispatcher placing it and delivering its webhooks,
 * the agent running it, the worker request and the uploads — starts its spans under it, however
 * many processes, retries and restarts lie between. Contexts are passed explicitly (no global
 * context manager); the only ambient one is the API request's, carried by `requestContext`.
 */

export const TracingEnv = z.object({
  OTEL_EXPORTER_OTLP_ENDPOINT: z.url({ protocol: /^https?$/, error: 'must be an http(s) URL (the OTLP/HTTP receiver, without /v1/traces)' }).optional(),
  OTEL_SERVICE_NAME: z.string().min(1).optional().describe('default: kiln-<process>'),
});
export type TracingEnv = z.infer<typeof TracingEnv>;

let provider: TracerProvider | null = null;

/** Starts exporting spans when OTEL_EXPORTER_OTLP_ENDPOINT is set; returns the flush-and-stop for shutdown. */
export function startTracing(processName: string, env: TracingEnv, log?: Logger): () => Promise<void> {
  if (!env.OTEL_EXPORTER_OTLP_ENDPOINT || provider) return async () => {};
  const url = `${env.OTEL_EXPORTER_OTLP_ENDPOINT.replace(/\/+$/, '')}/v1/traces`;
  provider = new TracerProvider({
    resource: resourceFromAttributes({ 'service.name': env.OTEL_SERVICE_NAME ?? `kiln-${processName}` }),
    spanProcessors: [new BatchSpanProcessor({ exporter: new OTLPTraceExporter({ url }), scheduledDelayMillis: 1_000 })],
  });
  trace.setGlobalTracerProvider(provider);
  propagation.setGlobalPropagator(new W3CTraceContextPropagator());
  log?.info({ url }, 'tracing: exporting spans over OTLP/HTTP');
  const p = provider;
  return async () => {
    await p.shutdown().catch(() => {});
  };
}

export const tracer = () => trace.getTracer('kiln');

/** Whether spans are exported (tracing configured in this process). */
export const tracingOn = () => provider !== null;

/** The context a W3C `traceparent` names (the root context when there is none or it is malformed). */
export function contextOf(traceparent: string | null | undefined): Context {
  if (!traceparent) return ROOT_CONTEXT;
  return propagation.extract(ROOT_CONTEXT, { traceparent });
}

/** The W3C `traceparent` of a span, for another process to continue from. */
export function traceparentOf(span: Span): string | undefined {
  const carrier: Record<string, string> = {};
  propagation.inject(trace.setSpan(ROOT_CONTEXT, span), carrier);
  return carrier.traceparent;
}

/**
 * Runs `fn` in a span that is a child of `parent` (a traceparent or a context); the span ends
 * when `fn` settles, marked as an error if it threw. Without tracing it costs a no-op span.
 */
export async function inSpan<T>(name: string, parent: string | null | undefined | Context, attributes: Attributes, fn: (span: Span, ctx: Context) => Promise<T>, kind: SpanKind = SpanKind.INTERNAL): Promise<T> {
  const parentCtx = typeof parent === 'object' && parent !== null ? parent : contextOf(parent);
  const span = tracer().startSpan(name, { attributes, kind }, parentCtx);
  const ctx = trace.setSpan(parentCtx, span);
  try {
    return await fn(span, ctx);
  } catch (err) {
    span.recordException(err instanceof Error ? err : String(err));
    span.setStatus({ code: SpanStatusCode.ERROR, message: err instanceof Error ? err.message : String(err) });
    throw err;
  } finally {
    span.end();
  }
}

/** The span of the API request being handled (set by the API's tracing hook for the request's async scope). */
export const requestContext = new AsyncLocalStorage<{ span: Span }>();

/** The traceparent a job created now should carry: the current API request's span, if any. */
export function currentTraceparent(): string | undefined {
  const span = requestContext.getStore()?.span;
  return span && tracingOn() ? traceparentOf(span) : undefined;
}

export { context, SpanKind, SpanStatusCode, trace, type Span };
