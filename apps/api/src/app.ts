import Fastify, { type FastifyBaseLogger, type FastifyInstance, LogController } from "fastify";
import { serializerCompiler, validatorCompiler } from 'fastify-type-provider-zod';
import type { ApiContext } from './context.js';
import { registerAuth } from './plugins/auth.js';
import { registerBullBoard } from './plugins/bull-board.js';
import { registerErrorHandling } from './plugins/errors.js';
import { registerJsonBody } from './plugins/json-body.js';
import { registerMetrics } from './plugins/metrics.js';
import { agentRoutes } from './routes/agents.js';
import { batchRoutes } from './routes/batches.js';
import { cacheRoutes } from './routes/cache.js';
import { trainingRoutes } from './routes/trainings.js';
import { generationRoutes } from './routes/generations.js';
import { healthRoutes } from './routes/health.js';
import { jobRoutes } from './routes/jobs.js';
import { serverOptions } from './server-options.js';

/** Builds the API (no listening here: main.ts and the tests do that). */
export async function buildApp(ctx: ApiContext): Promise<{ app: FastifyInstance; close: () => Promise<void> }> {
  const app: FastifyInstance = Fastify({
    loggerInstance: ctx.log as FastifyBaseLogger,
    bodyLimit: ctx.env.BODY_LIMIT_BYTES,
    // one line per request, after it is answered, at a level set by its status (plugins/metrics.ts)
    logController: new LogController({ disableRequestLogging: true }),
    ...serverOptions(ctx.env),
  });
  registerErrorHandling(app);
  registerJsonBody(app);
  registerAuth(app, ctx.env.API_KEYS);
  await registerMetrics(app, ctx);
  const closeBoard = await registerBullBoard(app, ctx);
  await app.register(async (v1) => {
    v1.setValidatorCompiler(validatorCompiler);
    v1.setSerializerCompiler(serializerCompiler);
    await v1.register(generationRoutes(ctx));
    await v1.register(jobRoutes(ctx));
    await v1.register(agentRoutes(ctx));
    await v1.register(healthRoutes(ctx));
    await v1.register(batchRoutes(ctx));
    await v1.register(cacheRoutes(ctx));
    await v1.register(trainingRoutes(ctx));
  });
  return {
    app,
    close: async () => {
      await closeBoard();
      await app.close();
    },
  };
}
