import { z } from 'zod';

/**
 * Every error Kiln reports — on the API, on a job record, from the worker — carries one of
 * these codes. Whether a failure is worth another attempt, and what it costs, is decided once, in
 * `faultClass`.
 */
export const ErrorCode = z.enum([
  // API-level
  'validation_failed',
  'unauthorized',
  'forbidden',
  'rate_limited',
  'quota_exceeded',
  'idempotency_mismatch',
  'not_found',
  // the HTTP layer's own refusals: slow, oversized or unparseable requests
  'request_timeout',
  'uri_too_long',
  'headers_too_large',
  'unsupported_media_type',
  'conflict',
  'payload_too_large',
  'unschedulable',
  'unavailable',
  'internal',
  // job-level
  'invalid_request',
  'model_not_found',
  'out_of_memory',
  'worker_crashed',
  'worker_protocol',
  'agent_lost',
  'storage_failed',
  'timeout',
  'canceled',
  'max_attempts_exceeded',
  'integrity_failed',
]);
export type ErrorCode = z.infer<typeof ErrorCode>;

/**
 * Whose fault a failed attempt was, which decides what it costs:
 *  - `job`: the job itself (the worker crashed or ran out of memory on it): another attempt,
 *    counted against MAX_ATTEMPTS;
 *  - `infra`: the infrastructure (storage or Redis unavailable, the agent lost): retried,
 *    then re-placed without spending an attempt, until INFRA_RETRY_DEADLINE_S;
 *  - `final`: another attempt cannot help (bad input, its own timeout, canceled).
 */
export type FaultClass = 'job' | 'infra' | 'final';

/** Exhaustive: adding a code without deciding here is a type error. */
export function faultClass(code: ErrorCode): FaultClass {
  switch (code) {
    case 'out_of_memory': // another agent (or a fresh worker) may have room
    case 'worker_crashed':
    case 'worker_protocol':
      return 'job';
    case 'agent_lost':
    case 'storage_failed':
    case 'unavailable':
      return 'infra';
    case 'validation_failed':
    case 'unauthorized':
    case 'forbidden':
    case 'rate_limited':
    case 'quota_exceeded':
    case 'idempotency_mismatch':
    case 'integrity_failed': // the stored object is not what the registry recorded: another try reads the same bytes
    case 'not_found':
    case 'request_timeout':
    case 'uri_too_long':
    case 'headers_too_large':
    case 'unsupported_media_type':
    case 'conflict':
    case 'payload_too_large':
    case 'unschedulable':
    case 'internal':
    case 'invalid_request':
    case 'model_not_found':
    case 'timeout':
    case 'canceled':
    case 'max_attempts_exceeded':
      return 'final';
  }
}

/** Whether a failure is worth another attempt at all (a job or infrastructure fault). */
export function isRetryable(code: ErrorCode): boolean {
  return faultClass(code) !== 'final';
}

/** HTTP status for an error code when the API reports it directly. */
export function httpStatusFor(code: ErrorCode): number {
  switch (code) {
    case 'validation_failed':
    case 'invalid_request':
      return 400;
    case 'unauthorized':
      return 401;
    case 'forbidden':
      return 403;
    case 'rate_limited':
    case 'quota_exceeded':
      return 429;
    case 'idempotency_mismatch':
      return 422;
    case 'not_found':
    case 'model_not_found':
      return 404;
    case 'request_timeout':
      return 408;
    case 'conflict':
    case 'canceled':
      return 409;
    case 'payload_too_large':
      return 413;
    case 'uri_too_long':
      return 414;
    case 'unsupported_media_type':
      return 415;
    case 'headers_too_large':
      return 431;
    case 'unschedulable':
      return 422;
    case 'unavailable':
    case 'storage_failed':
    case 'agent_lost':
      return 503;
    case 'timeout':
      return 504;
    case 'out_of_memory':
    case 'worker_crashed':
    case 'worker_protocol':
    case 'max_attempts_exceeded':
    case 'integrity_failed':
    case 'internal':
      return 500;
  }
}

export const JobError = z.object({
  code: ErrorCode,
  message: z.string(),
  retryable: z.boolean(),
});
export type JobError = z.infer<typeof JobError>;

export const ErrorDetail = z.object({
  field: z.string().describe('dotted path of the offending field; "" for the body itself'),
  rule: z.string().describe('the rule that failed, e.g. too_small, invalid_type, unrecognized_keys'),
  message: z.string(),
});
export type ErrorDetail = z.infer<typeof ErrorDetail>;

export const ApiError = z.object({
  error: z.object({
    code: ErrorCode,
    message: z.string(),
    details: z.array(ErrorDetail).optional(),
  }),
});
export type ApiError = z.infer<typeof ApiError>;

/** Turns zod issues into details that name each field and rule. */
export function issuesToDetails(issues: readonly z.core.$ZodIssue[], prefix: (string | number)[] = []): ErrorDetail[] {
  const out: ErrorDetail[] = [];
  for (const issue of issues) {
    const path = [...prefix, ...issue.path.map((p) => (typeof p === 'symbol' ? String(p) : p))];
    if (issue.code === 'unrecognized_keys') {
      for (const key of issue.keys) {
        out.push({
          field: [...path, key].join('.'),
          rule: 'unrecognized_keys',
          message: `"${key}" is not a field Kiln accepts here`,
        });
      }
      continue;
    }
    if (issue.code === 'invalid_union' && issue.errors.length > 0) {
      // keep the shortest branch explanation: it is the one the caller most likely meant
      const best = [...issue.errors].sort((a, b) => a.length - b.length)[0]!;
      out.push(...issuesToDetails(best, path));
      continue;
    }
    const custom = issue.code === 'custom' ? (issue.params as { rule?: string } | undefined)?.rule : undefined;
    out.push({ field: path.join('.'), rule: custom ?? issue.code, message: issue.message });
  }
  return out;
}
