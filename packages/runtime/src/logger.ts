import { pino, type Logger } from 'pino';

export type { Logger };

let first: Logger | null = null;

/**
 * Readable logs in a terminal, JSON lines otherwise. The first logger a process makes is its
 * process logger: the runtime's background reporters (Redis health, the last-resort handler
 * for escaped rejections) write through it, so their lines carry the process's name.
 */
export function createLogger(name: string, level = process.env.LOG_LEVEL ?? 'info'): Logger {
  const pretty = process.stdout.isTTY && process.env.LOG_FORMAT !== 'json';
  const log = pino({
    name,
    level,
    ...(pretty
      ? { transport: { target: 'pino-pretty', options: { colorize: true, translateTime: 'HH:MM:ss.l', ignore: 'pid,hostname' } } }
      : {}),
  });
  first ??= log;
  return log;
}

/** The process logger (see createLogger); a plain one if the process has made none yet. */
export function processLogger(): Logger {
  first ??= createLogger('kiln');
  return first;
}
