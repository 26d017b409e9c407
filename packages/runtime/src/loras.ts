import type { Redis } from 'ioredis';
import { z } from 'zod';
import type { Keys } from './keys.js';

/**
 * Trained LoRAs by name: where the weights live in S3, and for which base model. A generation
 * naming one runs on any agent: the agent fetches the file before the job.
 */
export const RegisteredLora = z.object({
  name: z.string(),
  key: z.string(),
  sha256: z.string(),
  bytes: z.number().int(),
  base_model: z.string(),
  rank: z.number().int(),
  job_id: z.string(),
  created_at: z.string(),
});
export type RegisteredLora = z.infer<typeof RegisteredLora>;

export class LoraRegistry {
  constructor(
    private readonly redis: Redis,
    private readonly keys: Keys,
  ) {}

  async register(l: RegisteredLora): Promise<void> {
    await this.redis.hset(this.keys.loras(), l.name, JSON.stringify(l));
  }

  async get(name: string): Promise<RegisteredLora | null> {
    const raw = await this.redis.hget(this.keys.loras(), name);
    return raw ? RegisteredLora.parse(JSON.parse(raw)) : null;
  }

  async getMany(names: string[]): Promise<Map<string, RegisteredLora>> {
    if (!names.length) return new Map();
    const raws = await this.redis.hmget(this.keys.loras(), ...names);
    const out = new Map<string, RegisteredLora>();
    raws.forEach((raw, i) => raw && out.set(names[i]!, RegisteredLora.parse(JSON.parse(raw))));
    return out;
  }

  async list(): Promise<RegisteredLora[]> {
    const all = await this.redis.hvals(this.keys.loras());
    return all.map((r) => RegisteredLora.parse(JSON.parse(r))).sort((a, b) => a.name.localeCompare(b.name));
  }
}

/** A LoRA name as a file name (no "/"). */
export const loraFileName = (name: string) => `${name.replaceAll('/', '--')}.safetensors`;
