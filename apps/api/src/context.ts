import type { JobServices, Logger } from '@kiln/runtime';
import type { ApiEnv } from './env.js';
import type { KeyRing } from './keys.js';

/** What the API's routes and plugins share; built once in main.ts (or by a test). */
export interface ApiContext extends Omit<JobServices, 'close'> {
  env: ApiEnv;
  log: Logger;
  /** API keys: tenants, roles and per-tenant limits */
  ring: KeyRing;
}
