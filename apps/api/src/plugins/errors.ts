import { type ErrorCode, httpStatusFor, issuesToDetails, type ApiError } from '@kiln/contracts';
import { KilnError } from '@kiln/runtime';
import type { FastifyError, FastifyInstance } from 'fastify';
import { hasZodFastifySchemaValidationErrors } from 'fastify-type-provider-zod';

/** One error handler: every failure leaves as `{ error: { code, message, details? } }`. */
export function registerErrorHandling(app: FastifyInstance): void {
  app.setErrorHandler((err: FastifyError, req, reply) => {
    if (hasZodFastifySchemaValidationErrors(err)) {
      const where = err.validationContext && err.validationContext !== 'body' ? [err.validationContext] : [];
      const issues = err.validation.map((v) => ({
        ...(v.params as object),
        code: v.keyword,
        message: v.message,
        path: v.instancePath.split('/').filter(Boolean),
      }));
      const details = issuesToDetails(issues as never, where);
      return reply.code(400).send(body('validation_failed', `invalid request: ${details.map((d) => `${d.field || '(body)'}: ${d.message}`).join('; ')}`, details));
    }
    if (err instanceof KilnError) {
      return reply.code(httpStatusFor(err.code)).send(body(err.code, err.message, err.details));
    }
    const status = err.statusCode ?? 500;
    if (status === 413) return reply.code(413).send(body('payload_too_large', err.message));
    if (status >= 400 && status < 500) {
      const rule = err.code === 'FST_ERR_CTP_INVALID_MEDIA_TYPE' ? 'unsupported_media_type' : err.code === 'FST_ERR_CTP_EMPTY_JSON_BODY' ? 'required' : 'invalid_json';
      return reply.code(status === 415 ? 415 : 400).send(body('validation_failed', err.message, [{ field: '', rule, message: err.message }]));
    }
    req.log.error({ err }, 'unhandled error');
    return reply.code(500).send(body('internal', 'internal error; see the API logs'));
  });
  app.setNotFoundHandler((req, reply) => reply.code(404).send(body('not_found', `no route ${req.method} ${req.url}`)));
}

export function body(code: ErrorCode, message: string, details?: ApiError['error']['details']): ApiError {
  return { error: { code, message, ...(details?.length ? { details } : {}) } };
}
