import { STATUS_CODES } from 'node:http';
import type { Socket } from 'node:net';
import { type ErrorCode, httpStatusFor, issuesToDetails, type ApiError } from '@kiln/contracts';
import { KilnError } from '@kiln/runtime';
import type { FastifyError, FastifyInstance, FastifyReply, FastifyRequest, FastifyServerOptions } from 'fastify';
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
    if (status >= 400 && status < 500) return sendFrameworkError(err, req, reply);
    req.log.error({ err }, 'unhandled error');
    return reply.code(500).send(body('internal', 'internal error; see the API logs'));
  });
  app.setNotFoundHandler((req, reply) => reply.code(404).send(body('not_found', `no route ${req.method} ${clip(req.url)}`)));
}

export function body(code: ErrorCode, message: string, details?: ApiError['error']['details']): ApiError {
  return { error: { code, message, ...(details?.length ? { details } : {}) } };
}

/** Fastify's own 4xx errors, by its code: Kiln's code, the rule a detail names, a clearer message. */
const FASTIFY_ERRORS: Record<string, { code: ErrorCode; rule: string; message?: (req: FastifyRequest) => string }> = {
  FST_ERR_CTP_INVALID_MEDIA_TYPE: {
    code: 'unsupported_media_type',
    rule: 'unsupported_media_type',
    message: (req) => `content-type ${JSON.stringify(clip(req.headers['content-type'] ?? ''))} is not accepted here; send application/json`,
  },
  FST_ERR_CTP_EMPTY_JSON_BODY: { code: 'validation_failed', rule: 'required' },
  FST_ERR_CTP_INVALID_JSON_BODY: { code: 'validation_failed', rule: 'invalid_json' },
  FST_ERR_CTP_INVALID_CONTENT_LENGTH: { code: 'validation_failed', rule: 'invalid_content_length' },
  FST_ERR_CTP_BODY_TOO_LARGE: { code: 'payload_too_large', rule: 'too_large' },
  FST_ERR_BAD_URL: { code: 'validation_failed', rule: 'invalid_url', message: () => 'the path is not valid percent-encoding' },
  FST_ERR_MAX_PARAM_LENGTH: { code: 'uri_too_long', rule: 'too_long', message: () => 'a path segment is longer than any id Kiln issues' },
};

/** Kiln's code for an HTTP status a plugin or the framework chose without saying more. */
function codeForStatus(status: number): ErrorCode {
  switch (status) {
    case 401:
      return 'unauthorized';
    case 403:
      return 'forbidden';
    case 404:
      return 'not_found';
    case 408:
      return 'request_timeout';
    case 413:
      return 'payload_too_large';
    case 414:
      return 'uri_too_long';
    case 415:
      return 'unsupported_media_type';
    case 429:
      return 'rate_limited';
    case 431:
      return 'headers_too_large';
    default:
      return 'validation_failed';
  }
}

function sendFrameworkError(err: FastifyError, req: FastifyRequest, reply: FastifyReply) {
  const known = FASTIFY_ERRORS[err.code];
  const code = known?.code ?? codeForStatus(err.statusCode ?? 400);
  const message = known?.message?.(req) ?? err.message;
  // a code Kiln knows decides the status; anything else keeps the status the framework chose
  const status = known ? httpStatusFor(code) : (err.statusCode ?? 400);
  return reply.code(status).send(body(code, message, [{ field: '', rule: known?.rule ?? code, message }]));
}

/**
 * Server options that make the errors Fastify and Node's HTTP server produce before any route
 * runs use Kiln's shape too: a malformed or over-long path (`frameworkErrors`), and a request
 * that is malformed, has too many header bytes or does not arrive in time (`clientErrorHandler`,
 * which writes to the socket itself and closes it, as Node does).
 */
export function frameworkErrorOptions(requestTimeoutMs: number): Pick<FastifyServerOptions, 'frameworkErrors' | 'clientErrorHandler'> {
  return {
    frameworkErrors: (err, req, res) => {
      const reply = res as FastifyReply;
      if ((err.statusCode ?? 500) >= 500) {
        req.log.error({ err }, 'framework error');
        return reply.code(500).send(body('internal', 'internal error; see the API logs'));
      }
      return sendFrameworkError(err, req as FastifyRequest, reply);
    },
    clientErrorHandler(this: FastifyInstance, err, socket: Socket) {
      if (err.code === 'ECONNRESET' || socket.destroyed) return;
      const [status, code, message]: [number, ErrorCode, string] =
        err.code === 'ERR_HTTP_REQUEST_TIMEOUT'
          ? [408, 'request_timeout', `the request did not arrive in full within ${requestTimeoutMs} ms`]
          : err.code === 'HPE_HEADER_OVERFLOW'
            ? [431, 'headers_too_large', 'the request line and headers are larger than the server accepts']
            : [400, 'validation_failed', 'the request is not well-formed HTTP'];
      this.log.debug({ err: err.message, code: err.code }, 'client error');
      const res = (socket as Socket & { _httpMessage?: { headersSent?: boolean } })._httpMessage;
      if (socket.writable && !res?.headersSent) {
        const json = JSON.stringify(body(code, message));
        socket.write(`HTTP/1.1 ${status} ${STATUS_CODES[status]}\r\nContent-Type: application/json; charset=utf-8\r\nContent-Length: ${Buffer.byteLength(json)}\r\nConnection: close\r\n\r\n${json}`);
      }
      socket.destroy(err);
    },
  };
}

const clip = (s: string, max = 200) => (s.length > max ? `${s.slice(0, max)}…` : s);
