import { type ErrorCode, type ErrorDetail, type JobError, isRetryable } from '@kiln/contracts';

/** The one error type Kiln throws on purpose. `retryable` comes from the code, never ad hoc. */
export class KilnError extends Error {
  readonly retryable: boolean;
  constructor(
    readonly code: ErrorCode,
    message: string,
    options: { cause?: unknown; details?: ErrorDetail[] } = {},
  ) {
    super(message, { cause: options.cause });
    this.name = 'KilnError';
    this.retryable = isRetryable(code);
    this.details = options.details;
  }
  readonly details: ErrorDetail[] | undefined;

  toJobError(): JobError {
    return { code: this.code, message: this.message, retryable: this.retryable };
  }
}

/** Whatever was thrown, as a KilnError (unknown errors become `internal`, cause kept). */
export function coerceError(err: unknown, fallback: ErrorCode = 'internal'): KilnError {
  if (err instanceof KilnError) return err;
  if (err instanceof Error) return new KilnError(fallback, err.message, { cause: err });
  return new KilnError(fallback, String(err));
}
