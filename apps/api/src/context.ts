import type { JobServices, Logger } from '@kiln/runtime';
import type { ApiEnv } from './env.js';

/** What the API's routes and plugins share; built once in main.ts (or by a test). */
export interface ApiContext extends Omit<JobServices, 'close'> {
  env: ApiEnv;
  log: Logger;
}

declare module 'fastify' {
  interface FastifyRequest {
    /** who is calling: an API key fingerprint, or "anonymous" when keys are off */
    client: string;
  }
}
