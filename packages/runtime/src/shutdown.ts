import type { Logger } from 'pino';
import { coerceError } from './errors.js';

let guarded = false;

/**
 * The last resort for a promise nobody handled: log what escaped, as one structured line, and
 * keep running (Node would otherwise end the process on it, dropping whatever it held). Every
 * background chain should have its own handler; a line from here is a bug to fix. Idempotent;
 * onShutdown installs it too.
 */
export function guardProcess(log: Logger): void {
  if (guarded) return;
  guarded = true;
  process.on('unhandledRejection', (reason) => {
    const err = coerceError(reason);
    log.error({ err: { message: err.message, code: err.code, stack: err.stack, cause: err.cause instanceof Error ? err.cause.message : undefined } }, 'unhandled rejection: a background task failed without a handler');
  });
}

/**
 * One place per process for stopping: the first SIGINT/SIGTERM runs `drain` (stop taking
 * work, finish or hand back, close connections) under a deadline; a second signal or the
 * deadline forces exit. Every cleanup step runs even if an earlier one threw.
 */
export function onShutdown(log: Logger, deadlineMs: number, drain: () => Promise<void>): void {
  guardProcess(log);
  let stopping = false;
  const handler = (signal: NodeJS.Signals) => {
    if (stopping) {
      log.warn({ signal }, 'second signal: forcing exit');
      process.exit(130);
    }
    stopping = true;
    log.info({ signal, deadlineMs }, 'shutting down');
    const timer = setTimeout(() => {
      log.error('shutdown deadline passed: forcing exit');
      process.exit(1);
    }, deadlineMs + 1_000);
    timer.unref();
    drain().then(
      () => process.exit(0),
      (err) => {
        log.error({ err }, 'shutdown failed');
        process.exit(1);
      },
    );
  };
  process.on('SIGINT', handler);
  process.on('SIGTERM', handler);
}

/** Runs each step in order, all of them, then rethrows the first failure. */
export async function runAll(steps: Array<() => Promise<unknown> | unknown>): Promise<void> {
  let first: unknown;
  for (const step of steps) {
    try {
      await step();
    } catch (err) {
      first ??= err;
    }
  }
  if (first) throw first;
}
