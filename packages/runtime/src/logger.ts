import { pino, type Logger } from 'pino';

export type { Logger };

let first: Logger | null = null;

/**
 * Readable logs in a terminal, JSON lines otherwise (`LOG_FORMAT=json` or `pretty` forces one).
 * Pretty is one line per entry — time, level, process, message, then the entry's fields — so a
 * terminal running the whole farm reads as a story rather than a wall. The first logger a
 * process makes is its process logger: the runtime's background reporters (Redis health, the
 * last-resort handler for escaped rejections, job lifecycle lines) write through it, so their
 * lines carry the process's name.
 */
export function createLogger(name: string, level = process.env.LOG_LEVEL ?? 'info'): Logger {
  const format = process.env.LOG_FORMAT;
  const pretty = format === 'pretty' || (process.stdout.isTTY === true && format !== 'json');
  const log = pino({
    name,
    level,
    ...(pretty
      ? {
          transport: {
            target: 'pino-pretty',
            options: { colorize: process.stdout.isTTY === true, singleLine: true, translateTime: 'HH:MM:ss.l', ignore: 'pid,hostname' },
          },
        }
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
