import { coerceError, KilnError, type Logger, Storage } from '@kiln/runtime';
import type { Attempt } from './attempt.js';

/** Waits between in-place retries of a transfer: doubling, capped, with full jitter. */
const TRANSFER_BACKOFF_MS = { first: 250, max: 4_000 };

/**
 * Uploads and downloads for a job's run, each retried in place while storage is unreachable:
 * backoff with jitter for up to TRANSFER_RETRY_MS (an upload goes again from the file still on
 * disk). Then it fails as `storage_failed`, an infrastructure fault: the job is re-placed
 * without spending an attempt. A stop of the attempt (cancel, timeout, hand-back) ends the wait.
 */
export class Transfers {
  constructor(
    private readonly storage: Storage,
    private readonly retryMs: number,
    private readonly log: Logger,
  ) {}

  upload(a: Attempt, key: string, path: string, contentType: string, meta: Record<string, string> = {}): Promise<void> {
    return this.transfer(a, `upload of ${key}`, () => this.storage.putFile(key, path, contentType, meta));
  }

  download(a: Attempt, key: string, path: string, what: string): Promise<void> {
    return this.transfer(a, `download of ${what} ${key}`, () => this.storage.getFile(key, path));
  }

  /** Best effort: objects of a run that did not become the job's result. */
  async discard(keys: string[]): Promise<void> {
    if (!keys.length) return;
    await this.storage.remove(keys).catch((err) => this.log.warn({ keys, err: coerceError(err).message }, 'could not delete the objects of a dropped result'));
  }

  /** Best effort, after a retried job succeeded: what earlier runs left under its prefix. */
  async discardLeftovers(prefix: string, keep: Set<string>): Promise<void> {
    const left = await this.storage.list(prefix).catch(() => []);
    await this.discard(left.map((o) => o.key).filter((k) => !keep.has(k)));
  }

  private async transfer(a: Attempt, what: string, op: () => Promise<void>): Promise<void> {
    const started = Date.now();
    let delay = TRANSFER_BACKOFF_MS.first;
    for (let tries = 1; ; tries++) {
      const stopping = a.cancel;
      if (stopping) throw new KilnError('canceled', `${what} abandoned: the job is being stopped (${stopping})`);
      try {
        await op();
        if (tries > 1) this.log.info({ what, tries, ms: Date.now() - started }, 'storage reachable again; transfer done');
        return;
      } catch (err) {
        const message = coerceError(err).message;
        const left = this.retryMs - (Date.now() - started);
        if (Storage.isNotFound(err) || left <= 0) {
          throw new KilnError('storage_failed', `${what} failed after ${tries} ${tries === 1 ? 'try' : 'tries'}: ${message}`, { cause: err });
        }
        if (tries === 1) this.log.warn({ what, err: message, retryForMs: this.retryMs }, 'storage unreachable; retrying in place');
        // the last wait is cut to the window, so the final try comes at its end
        await a.pause(Math.min(left, delay * (0.5 + Math.random() / 2)));
        delay = Math.min(delay * 2, TRANSFER_BACKOFF_MS.max);
      }
    }
  }
}
