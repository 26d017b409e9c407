import Fastify, { type FastifyBaseLogger, type FastifyInstance, LogController } from "fastify";
import { serializerCompiler, validatorCompiler } from 'fastify-type-provider-zod';
import { ChangeFeed } from './change-feed.js';
import type { ApiContext } from './context.js';
import { registerAuth } from './plugins/auth.js';
import { registerBullBoard } from './plugins/bull-board.js';
import { registerCors } from './plugins/cors.js';
import { registerErrorHandling } from './plugins/errors.js';
import { registerJsonBody } from './plugins/json-body.js';
import { registerOpenApi } from './plugins/openapi.js';
import { registerMetrics } from './plugins/metrics.js';
import { registerTracing } from './plugins/tracing.js';
import { registerRateLimit } from './plugins/rate-limit.js';
import { agentMaintenanceRoutes } from './routes/agent-maintenance.js';
import { agentRoutes } from './routes/agents.js';
import { batchRoutes } from './routes/batches.js';
import { cacheRoutes } from './routes/cache.js';
import { selfTestRoutes } from './routes/self-tests.js';
import { trainingRoutes } from './routes/trainings.js';
import { uploadRoutes } from './routes/uploads.js';
import { generationRoutes } from './routes/generations.js';
import { healthRoutes } from './routes/health.js';
import { eventRoutes } from './routes/events.js';
import { jobRoutes } from './routes/jobs.js';
import { listRoutes } from './routes/lists.js';
import { queueRoutes } from './routes/queue.js';
import { serverOptions } from './server-options.js';

export interface RegisteredRoute {
  method: string;
  url: string;
  auth: 'public' | 'client' | 'admin' | undefined;
}

/** Builds the API (no listening here: main.ts and the tests do that); `routes` lists every route it registered. */
export async function buildApp(ctx: ApiContext): Promise<{ app: FastifyInstance; routes: RegisteredRoute[]; close: () => Promise<void> }> {
  const app: FastifyInstance = Fastify({
    loggerInstance: ctx.log as FastifyBaseLogger,
    bodyLimit: ctx.env.BODY_LIMIT_BYTES,
    // one line per request, after it is answered, at a level set by its status (plugins/metrics.ts)
    logController: new LogController({ disableRequestLogging: true }),
    ...serverOptions(ctx.env),
  });
  const routes: RegisteredRoute[] = [];
  app.addHook('onRoute', (r) => {
    // auth is read when asked: a plugin's own onRoute hook (the docs pages') may set it after this one
    for (const method of [r.method].flat()) routes.push({ method, url: r.url, get auth() { return r.config?.auth; } });
  });
  // wake-ups for whoever waits on a job (SSE streams, Prefer: wait): one subscriber connection, opened on first use
  const changes = new ChangeFeed(ctx.redis);
  app.decorate('changes', changes);
  app.addHook('onClose', () => changes.close());
  registerErrorHandling(app);
  registerJsonBody(app);
  await registerCors(app, ctx.env); // before auth: a preflight is answered before the key is asked for
  registerAuth(app, ctx.ring);
  await registerOpenApi(app, ctx); // before any route: it documents the routes as they are added
  await registerMetrics(app, ctx);
  registerTracing(app);
  await registerRateLimit(app, ctx);
  const closeBoard = await registerBullBoard(app, ctx);
  await app.register(async (v1) => {
    v1.setValidatorCompiler(validatorCompiler);
    v1.setSerializerCompiler(serializerCompiler);
    await v1.register(generationRoutes(ctx));
    await v1.register(jobRoutes(ctx));
    await v1.register(listRoutes(ctx));
    await v1.register(eventRoutes(ctx));
    await v1.register(uploadRoutes(ctx));
    await v1.register(queueRoutes(ctx));
    await v1.register(agentRoutes(ctx));
    await v1.register(agentMaintenanceRoutes(ctx));
    await v1.register(healthRoutes(ctx));
    await v1.register(batchRoutes(ctx));
    await v1.register(cacheRoutes(ctx));
    await v1.register(selfTestRoutes(ctx));
    await v1.register(trainingRoutes(ctx));
  });
  return {
    app,
    routes,
    close: async () => {
      await closeBoard();
      await app.close();
    },
  };
}
