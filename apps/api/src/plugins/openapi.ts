import swagger from '@fastify/swagger';
import swaggerUi from '@fastify/swagger-ui';
import { AgentHeartbeat, ApiError, BatchRequest, CacheRequest, EvictRequest, GenerationRequest, GroupRecord, JobEvent, JobRecord, Output, ResolvedGenerationRequest, TrainingRequest, WebhookDelivery } from '@kiln/contracts';
import type { FastifyInstance, FastifySchema, RouteOptions } from 'fastify';
import { createJsonSchemaTransform, createJsonSchemaTransformObject } from 'fastify-type-provider-zod';
import { z } from 'zod';
import type { ApiContext } from '../context.js';
import { REQUEST_EXAMPLES } from '../openapi-examples.js';

/**
 * The OpenAPI 3.1 document, generated from the routes' zod schemas (fastify-type-provider-zod's
 * transforms under @fastify/swagger), at GET /openapi.json; and a reference page at /docs
 * (Swagger UI, its assets served from node_modules by Kiln itself, so it works offline).
 *
 * Routes declare their success responses and route-specific errors as zod schemas (so what is
 * documented is what the serializer enforces); this module adds what every route shares: the
 * auth scheme, the errors auth, validation and rate limiting produce, tags and examples.
 * Must be registered before any route, since @fastify/swagger collects routes as they are added.
 */

/**
 * Schemas documented once, under components.schemas, and referenced wherever they appear.
 * Metadata lookups fall back to zod's global registry, where `.describe()` keeps each field's
 * description; the ids live here only, so nothing else that turns zod into JSON Schema (the
 * worker's protocol schemas) sees them.
 */
const components = z.registry<{ id?: string; description?: string }>();
components._map = new (class extends WeakMap<object, unknown> {
  override get(key: object) {
    return super.get(key) ?? z.globalRegistry._map.get(key as never);
  }
  override has(key: object) {
    return super.has(key) || z.globalRegistry._map.has(key as never);
  }
})() as never;
for (const [schema, id] of [
  [JobRecord, 'JobRecord'],
  [GroupRecord, 'GroupRecord'],
  [ApiError, 'Error'],
  [GenerationRequest, 'GenerationRequest'],
  [ResolvedGenerationRequest, 'StoredGenerationRequest'],
  [BatchRequest, 'BatchRequest'],
  [CacheRequest, 'CacheRequest'],
  [EvictRequest, 'EvictRequest'],
  [TrainingRequest, 'TrainingRequest'],
  [AgentHeartbeat, 'Agent'],
  [Output, 'Output'],
  [JobEvent, 'JobEvent'],
  [WebhookDelivery, 'WebhookDelivery'],
] as const) {
  components.add(schema, { ...(z.globalRegistry.get(schema) ?? {}), id });
}

/** What each error status means on Kiln's API, with the codes that produce it. */
const ERRORS: Record<number, string> = {
  400: '`validation_failed`: the request breaks a rule; `details` names each field (dotted path) and rule',
  401: '`unauthorized`: no API key, or not a valid one (`Authorization: Bearer <key>`)',
  403: "`forbidden`: this needs an admin key (an admin route, or another tenant's list)",
  404: "`not_found`: no such id — or another tenant's, which is the same to the caller",
  409: '`conflict`: the record is not in a state that allows this (already ended, a name taken, a replay still being submitted)',
  413: '`payload_too_large`: the body (`BODY_LIMIT_BYTES`) or an input image is too large',
  415: '`unsupported_media_type`: send `application/json`',
  422: '`unschedulable`: no live agent could ever run it (the detail names the field), or `idempotency_mismatch`',
  429: '`rate_limited` (with `Retry-After`) or `quota_exceeded` (`max_queued_jobs`): per tenant, when keys are set',
  503: '`unavailable`: a dependency (Redis, storage) does not answer',
};

/**
 * Routes that are not Kiln's API: the reference page and its assets, Bull Board's own UI and
 * its internal JSON API (its page, GET /admin/queues, is documented), and CORS's preflight route.
 */
export function undocumented(url: string): boolean {
  return url === '/docs' || url.startsWith('/docs/') || (url.startsWith('/admin/queues/') && url !== '/admin/queues/') || url === '*';
}

const tagFor = (url: string): string => {
  const seg = url.split('/')[url.startsWith('/v1/') ? 2 : 1] ?? '';
  const tags: Record<string, string> = {
    generations: 'generations',
    validate: 'generations',
    jobs: 'jobs',
    batches: 'batches',
    cache: 'cache',
    trainings: 'trainings',
    loras: 'trainings',
    agents: 'farm',
    capabilities: 'farm',
    models: 'farm',
    queue: 'farm',
    uploads: 'uploads',
    healthz: 'health',
    readyz: 'health',
    'openapi.json': 'health',
    metrics: 'admin',
    admin: 'admin',
  };
  return tags[seg] ?? seg;
};

type Auth = 'public' | 'client' | 'admin';
const authOf = (route: RouteOptions): Auth =>
  route.config?.auth ?? (route.url === '/admin' || route.url.startsWith('/admin/') ? 'admin' : 'client');

/** Responses of routes that do not serialize through zod: described for the document only. */
const DOC_ONLY_RESPONSES: Record<string, Record<string, unknown>> = {
  '/openapi.json': { 200: { description: 'this document', content: { 'application/json': { schema: { type: 'object', description: 'an OpenAPI 3.1 document' } } } } },
  '/admin/queues': { 200: { description: "Bull Board's page", content: { 'text/html': { schema: { type: 'string' } } } } },
  '/metrics': { 200: { description: 'Prometheus text exposition format', content: { 'text/plain': { schema: { type: 'string' } } } } },
};
const DOC_ONLY_SUMMARIES: Record<string, string> = {
  '/admin/queues': 'Bull Board: queues, groups and every agent\'s queue (admin key; a browser may send it as the basic-auth password)',
  '/metrics': 'Prometheus metrics (admin key)',
};

/** What a success means, where the route's schema does not say. */
const SUCCESS: Record<number, string> = { 200: 'OK', 201: 'created', 202: 'accepted: queued, or a cancellation requested', 204: 'done; no body' };

/** Adds to a route's (already JSON) schema what every route shares: tags, security, common errors. */
function decorate(schema: FastifySchema, route: RouteOptions, url: string): FastifySchema {
  const auth = authOf(route);
  const response: Record<string, unknown> = { ...DOC_ONLY_RESPONSES[url], ...(schema.response as Record<string, unknown> | undefined) };
  const error = (status: number) => ({ $ref: '#/components/schemas/Error', description: ERRORS[status] ?? 'see `error.code`' });
  const add = (status: number) => (response[status] ??= error(status));
  if (auth !== 'public') [401, 429].forEach(add);
  if (auth === 'admin') add(403);
  if (schema.body) [400, 413, 415].forEach(add);
  if (schema.querystring) add(400);
  if (/\/:id\b/.test(url)) add(404);
  // route-declared responses are bare schemas from the zod transform: give each its meaning
  for (const [status, r] of Object.entries(response)) {
    const code = Number(status);
    if (r && typeof r === 'object' && !('description' in r)) response[status] = { ...r, description: (code >= 400 ? ERRORS[code] : SUCCESS[code]) ?? 'see `error.code`' };
  }
  return {
    ...(DOC_ONLY_SUMMARIES[url] ? { summary: DOC_ONLY_SUMMARIES[url] } : {}),
    ...schema,
    tags: schema.tags ?? [tagFor(url)],
    security: auth === 'public' ? [] : url.startsWith('/admin') ? [{ bearer: [] }, { basic: [] }] : [{ bearer: [] }],
    response,
  };
}

/** Request examples on each operation; components no operation references are dropped. */
function finish(doc: Record<string, any>): Record<string, any> {
  for (const [path, ops] of Object.entries<Record<string, any>>(doc.paths ?? {})) {
    for (const [method, op] of Object.entries<any>(ops)) {
      const key = `${method.toUpperCase()} ${path.replace(/\{(\w+)\}/g, ':$1')}`;
      const examples = REQUEST_EXAMPLES[key === 'POST /v1/validate' ? 'POST /v1/generations' : key];
      const media = op.requestBody?.content?.['application/json'];
      if (examples && media) media.examples = examples;
    }
  }
  const schemas: Record<string, unknown> = doc.components?.schemas ?? {};
  const used = new Set<string>();
  const walk = (v: unknown): void => {
    if (Array.isArray(v)) return v.forEach(walk);
    if (!v || typeof v !== 'object') return;
    for (const [k, child] of Object.entries(v)) {
      if (k === '$ref' && typeof child === 'string' && child.startsWith('#/components/schemas/')) {
        const name = child.slice('#/components/schemas/'.length);
        if (!used.has(name)) {
          used.add(name);
          walk(schemas[name]);
        }
      } else walk(child);
    }
  };
  walk(doc.paths);
  for (const name of Object.keys(schemas)) if (!used.has(name)) delete schemas[name];
  return doc;
}

export async function registerOpenApi(app: FastifyInstance, ctx: ApiContext): Promise<void> {
  const zodTransform = createJsonSchemaTransform({ schemaRegistry: components as never, skipList: [] });
  const zodTransformObject = createJsonSchemaTransformObject({ schemaRegistry: components as never });
  await app.register(swagger, {
    openapi: {
      openapi: '3.1.0',
      info: {
        title: 'Kiln',
        version: '1.0.0',
        description: [
          'A GPU job farm for Stable Diffusion XL on your own hardware: submit generations, batches, model-cache requests and LoRA trainings; follow them by polling, server-sent events or signed webhooks.',
          '',
          'Everything is JSON under `/v1`. Every error is `{ "error": { "code", "message", "details"? } }`; each detail names a `field` (dotted path) and the `rule` it broke.',
          '',
          "Auth: with keys configured, every route but the health checks and this documentation needs `Authorization: Bearer <key>`. A client key sees only its own tenant's work (another tenant's id is a 404, like an unknown one); admin keys see everything and alone may load, pin and evict models, share LoRAs and open Bull Board. Without keys the farm is open, as one tenant.",
        ].join('\n'),
      },
      servers: [{ url: ctx.env.PUBLIC_URL }],
      components: {
        securitySchemes: {
          bearer: { type: 'http', scheme: 'bearer', description: 'an API key: `API_KEYS`, `ADMIN_API_KEYS` or `API_KEYS_FILE`' },
          basic: { type: 'http', scheme: 'basic', description: 'Bull Board only: any user name, the API key as the password (for browsers)' },
        },
      },
      security: [{ bearer: [] }],
      tags: [
        { name: 'generations', description: 'SDXL generations: submit, validate' },
        { name: 'jobs', description: 'any job by id: read, cancel, list' },
        { name: 'batches', description: 'many generations as one unit' },
        { name: 'trainings', description: 'LoRA fine-tunes and the trained LoRAs' },
        { name: 'cache', description: 'model residency: load, pin, evict (writes need an admin key)' },
        { name: 'uploads', description: 'files (input images, datasets) into your area of the bucket' },
        { name: 'farm', description: 'agents, models and capabilities' },
        { name: 'health', description: 'liveness, readiness and this document (no key needed)' },
        { name: 'admin', description: 'Bull Board, metrics and the GPU self-test (admin key)' },
      ],
    },
    transform: (input) => {
      const { route } = input;
      const url = input.url === '/admin/queues/' ? '/admin/queues' : input.url; // Bull Board's page, registered with a slash
      // one policy for what is documented, whatever a plugin says (Bull Board hides its routes)
      if (undocumented(url)) return { schema: { hide: true }, url };
      const { hide: _hide, ...own } = (input.schema ?? {}) as FastifySchema;
      const { schema } = zodTransform({ ...input, url, schema: own } as never);
      return { schema: decorate((schema ?? {}) as FastifySchema, route, url), url };
    },
    transformObject: (input) => finish(zodTransformObject(input) as Record<string, any>),
  });

  app.get('/openapi.json', { config: { auth: 'public' }, schema: { summary: 'This OpenAPI 3.1 document', tags: ['health'] } }, async () => app.swagger());

  // Swagger UI's page, assets and its own copy of the document: public, like the document
  await app.register(async (docs) => {
    docs.addHook('onRoute', (r) => {
      r.config = { ...r.config, auth: 'public' };
    });
    await docs.register(swaggerUi, {
      routePrefix: '/docs',
      uiConfig: { deepLinking: true, docExpansion: 'list', defaultModelsExpandDepth: 0, tryItOutEnabled: false, persistAuthorization: true },
      theme: { title: 'Kiln API' },
    });
  });
}
