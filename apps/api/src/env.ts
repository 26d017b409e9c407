import { boolFromEnv, CommonEnv, JobEnv, StorageEnv, WebhookEnv } from '@kiln/runtime';
import { z } from 'zod';

export const ApiEnv = CommonEnv.extend(StorageEnv.shape)
  .extend(WebhookEnv.shape)
  .extend(JobEnv.shape)
  .extend({
    HOST: z.string().default('127.0.0.1'),
    PORT: z.coerce.number().int().min(0).max(65535).default(8080),
    API_KEYS: z
      .string()
      .transform((s) => s.split(',').map((k) => k.trim()).filter(Boolean))
      .pipe(z.array(z.string().min(16, 'each API key must be at least 16 characters')))
      .default([]),
    BODY_LIMIT_BYTES: z.coerce.number().int().min(1024).default(48 * 1024 * 1024).describe('room for a few base64 input images'),
    INPUT_ALLOW_PRIVATE: boolFromEnv.default(false).describe('allow input image URLs on private/loopback addresses'),
    INPUT_FETCH_TIMEOUT_MS: z.coerce.number().int().min(100).default(15_000),
    IDEMPOTENCY_TTL_S: z.coerce.number().int().min(60).default(24 * 3600),
  });
export type ApiEnv = z.infer<typeof ApiEnv>;
