import { boolFromEnv, CommonEnv, JobEnv, MetricsEnv, StorageEnv, WebhookEnv } from '@kiln/runtime';
import { z } from 'zod';
import { KeyList, KeysFilePath } from './keys.js';

/**
 * How long the HTTP server waits for a client. Without them a client that sends fewer bytes than
 * its Content-Length, or headers a byte at a time, holds a connection for as long as it likes.
 */
export const HttpServerEnv = z.object({
  HTTP_REQUEST_TIMEOUT_MS: z.coerce.number().int().min(100).default(60_000).describe('a request (headers and body) must arrive in full within this, else 408 and the socket closes'),
  HTTP_HEADERS_TIMEOUT_MS: z.coerce.number().int().min(100).default(10_000).describe('the headers must arrive within this (capped at HTTP_REQUEST_TIMEOUT_MS), else 408'),
  HTTP_CONNECTION_TIMEOUT_MS: z.coerce.number().int().min(100).default(120_000).describe('a socket with no bytes either way for this long is closed'),
  HTTP_KEEP_ALIVE_TIMEOUT_MS: z.coerce.number().int().min(100).default(72_000).describe('an idle keep-alive connection is closed after this; keep it above a load balancer idle timeout'),
});
export type HttpServerEnv = z.infer<typeof HttpServerEnv>;

export const ApiEnv = CommonEnv.extend(StorageEnv.shape)
  .extend(WebhookEnv.shape)
  .extend(JobEnv.shape)
  .extend(HttpServerEnv.shape)
  .extend(MetricsEnv.shape)
  .extend({
    HOST: z.string().default('127.0.0.1'),
    PORT: z.coerce.number().int().min(0).max(65535).default(8080),
    API_KEYS: KeyList('client').default([]).describe('comma-separated client keys, `tenant:key` (a bare key is its own tenant)'),
    ADMIN_API_KEYS: KeyList('admin').default([]).describe('comma-separated admin keys, `name:key`'),
    API_KEYS_FILE: KeysFilePath.optional().describe('JSON file of keys (or their sha-256), roles and per-tenant limits'),
    RATE_LIMIT_PER_MINUTE: z.coerce.number().int().min(1).default(3000).describe('requests per minute per tenant (when keys are set)'),
    MAX_QUEUED_JOBS: z.coerce.number().int().min(1).default(5000).describe('unfinished jobs a tenant may have (when keys are set)'),
    SHARED_S3_PREFIXES: z
      .string()
      .transform((s) => s.split(',').map((k) => k.trim()).filter(Boolean))
      .pipe(z.array(z.string().regex(/^[A-Za-z0-9_.-]+(\/[A-Za-z0-9_.-]+)*\/$/, 'each shared prefix is a key prefix ending in "/"')))
      .default(['shared/'])
      .describe('bucket prefixes every tenant may read (admins fill them)'),
    BODY_LIMIT_BYTES: z.coerce.number().int().min(1024).default(48 * 1024 * 1024).describe('room for a few base64 input images'),
    INPUT_ALLOW_PRIVATE: boolFromEnv.default(false).describe('allow input image URLs on private/loopback addresses'),
    INPUT_FETCH_TIMEOUT_MS: z.coerce.number().int().min(100).default(15_000),
    IDEMPOTENCY_TTL_S: z.coerce.number().int().min(60).default(24 * 3600),
    CORS_ORIGINS: z
      .string()
      .transform((s) => s.split(',').map((o) => o.trim()).filter(Boolean))
      .pipe(z.array(z.union([z.literal('*'), z.string().regex(/^https?:\/\/[^/\s?#]+$/, 'each origin is scheme://host[:port], or *')])))
      .default([])
      .describe('origins a browser app may call the API from (CORS), comma-separated; * for any; none by default'),
    UPLOAD_URL_EXPIRY_S: z.coerce.number().int().min(60).max(7 * 24 * 3600).default(3600).describe('how long a presigned upload URL works'),
    UPLOAD_RETENTION_S: z.coerce.number().int().min(60).default(7 * 24 * 3600).describe('an upload is deleted this long after it was last asked for'),
    SSE_KEEPALIVE_MS: z.coerce.number().int().min(100).default(15_000).describe('a comment on every live progress stream this often, so proxies keep it open'),
    RETENTION_SWEEP_MS: z.coerce.number().int().min(100).default(10_000).describe('how often the API looks for expired records whose objects to delete'),
  });
export type ApiEnv = z.infer<typeof ApiEnv>;
