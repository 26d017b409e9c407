import type { Logger, Redis } from '@kiln/runtime';

/**
 * Cancellations arrive on a Redis pub/sub channel, on a connection of their own. It subscribes
 * only once the connection is `ready`: a SUBSCRIBE sent between connect and ready puts the
 * connection in subscriber mode before ioredis's ready check, the check fails ("Connection in
 * subscriber mode") and the subscription is silently lost. It subscribes again on every
 * `ready`, so a reconnect after a Redis restart never leaves the agent deaf (SUBSCRIBE is
 * idempotent, whatever ioredis's own resubscription did). A cancel missed meanwhile still
 * lands through the next progress write, which reads `cancel_requested`.
 *
 * Resolves once the first subscription is confirmed.
 */
export function listenForCancels(sub: Redis, channel: string, onCancel: (jobId: string) => void, log: Logger): Promise<void> {
  sub.on('message', (ch: string, jobId: string) => {
    if (ch === channel) onCancel(jobId);
  });
  return new Promise((resolve) => {
    const subscribe = () => {
      sub.subscribe(channel).then(
        () => resolve(),
        // the connection dropped again before it answered: the next `ready` tries again
        (err: Error) => log.warn({ err: err.message }, 'could not subscribe to cancellations yet; retrying on reconnect'),
      );
    };
    sub.on('ready', subscribe);
    if (sub.status === 'ready') subscribe();
  });
}
