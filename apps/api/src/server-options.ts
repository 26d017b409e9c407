import type { Server } from 'node:http';
import type { FastifyHttpOptions } from 'fastify';
import type { HttpServerEnv } from './env.js';
import { frameworkErrorOptions } from './plugins/errors.js';

/** Fastify's options for the HTTP timeouts (HttpServerEnv), and for errors in Kiln's shape before any route runs. */
export function serverOptions(env: HttpServerEnv): FastifyHttpOptions<Server> {
  const headersTimeout = Math.min(env.HTTP_HEADERS_TIMEOUT_MS, env.HTTP_REQUEST_TIMEOUT_MS);
  return {
    requestTimeout: env.HTTP_REQUEST_TIMEOUT_MS,
    connectionTimeout: env.HTTP_CONNECTION_TIMEOUT_MS,
    keepAliveTimeout: env.HTTP_KEEP_ALIVE_TIMEOUT_MS,
    http: {
      headersTimeout,
      // Node checks the two timeouts above on this interval (30 s by default): check often
      // enough that a slow client is cut off close to its deadline
      connectionsCheckingInterval: Math.max(50, Math.min(1_000, Math.floor(headersTimeout / 4))),
    },
    ...frameworkErrorOptions(env.HTTP_REQUEST_TIMEOUT_MS),
  };
}
