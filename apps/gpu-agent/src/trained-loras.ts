import { createHash } from 'node:crypto';
import { createReadStream } from 'node:fs';
import { access, mkdir, rename, rm } from 'node:fs/promises';
import { join } from 'node:path';
import type { GenerationJob } from '@kiln/contracts';
import { coerceError, KilnError, type LoraRegistry, loraFileName, type Storage } from '@kiln/runtime';

async function sha256File(path: string): Promise<string> {
  const hash = createHash('sha256');
  for await (const chunk of createReadStream(path)) hash.update(chunk as Buffer);
  return hash.digest('hex');
}

const exists = (path: string) => access(path).then(
  () => true,
  () => false,
);

/**
 * Trained LoRAs a request names are fetched from S3 into KILN_LORA_DIR (which the worker scans)
 * before it runs, and used only if their bytes have the sha256 the registry recorded: a file
 * replaced in the bucket (or on this disk) is refused, never silently used. A file already here
 * is hashed once per content and reused while the registry still names that content.
 */
export class TrainedLoras {
  /** LoRA files in the directory whose bytes were checked, with the sha256 they had */
  private readonly verified = new Map<string, string>();
  /** one fetch per file at a time: two jobs naming the same LoRA share it */
  private readonly fetching = new Map<string, Promise<void>>();

  constructor(
    private readonly dir: string,
    private readonly registry: LoraRegistry,
    private readonly storage: Storage,
  ) {}

  async fetchFor(job: GenerationJob): Promise<void> {
    const registered = await this.registry.getMany((job.request.loras ?? []).map((l) => l.name));
    if (!registered.size) return;
    await mkdir(this.dir, { recursive: true });
    for (const [name, l] of registered) {
      const path = join(this.dir, loraFileName(name));
      for (;;) {
        const inFlight = this.fetching.get(path);
        if (!inFlight) break;
        await inFlight.catch(() => {});
      }
      if (this.verified.get(path) === l.sha256) continue;
      const fetch = this.fetchOne(name, path, l.key, l.sha256);
      this.fetching.set(path, fetch);
      try {
        await fetch;
      } finally {
        this.fetching.delete(path);
      }
    }
  }

  private async fetchOne(name: string, path: string, key: string, sha256: string): Promise<void> {
    if ((await exists(path)) && (await sha256File(path)) === sha256) {
      this.verified.set(path, sha256);
      return;
    }
    try {
      await this.storage.getFile(key, `${path}.part`);
    } catch (err) {
      throw new KilnError('storage_failed', `download of LoRA ${name} failed: ${coerceError(err).message}`, { cause: err });
    }
    const got = await sha256File(`${path}.part`);
    if (got !== sha256) {
      await rm(`${path}.part`, { force: true });
      throw new KilnError('integrity_failed', `LoRA ${name} in storage does not match its registered sha256 (expected ${sha256.slice(0, 12)}…, got ${got.slice(0, 12)}…); refusing to use it`);
    }
    await rename(`${path}.part`, path);
    this.verified.set(path, sha256);
  }
}
