import type { AgentRegistry, LoraRegistry, DeliveryData, GroupTrackData, IntakeData, Jobs, JobStore, Keys, Logger, Redis, Storage } from '@kiln/runtime';
import type { Queue } from 'bullmq';
import type { ApiEnv } from './env.js';

/** What the API's routes and plugins share; built once in main.ts (or by a test). */
export interface ApiContext {
  env: ApiEnv;
  log: Logger;
  redis: Redis;
  keys: Keys;
  store: JobStore;
  jobs: Jobs;
  registry: AgentRegistry;
  loras: LoraRegistry;
  storage: Storage;
  intake: Queue<IntakeData>;
  webhookQueue: Queue<DeliveryData>;
  groupsQueue: Queue<GroupTrackData>;
}

declare module 'fastify' {
  interface FastifyRequest {
    /** who is calling: an API key fingerprint, or "anonymous" when keys are off */
    client: string;
  }
}
