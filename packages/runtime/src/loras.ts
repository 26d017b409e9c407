import type { Redis } from 'ioredis';
import { z } from 'zod';
import type { Keys } from './keys.js';
import { LuaScript } from './scripts.js';

/**
 * Trained LoRAs. Each belongs to the tenant that trained it and is named `<tenant>/<name>` (the
 * qualified name: what requests carry once resolved, what agents and workers see). Its weights
 * live in S3 under a key of their own, with the sha256 agents check before using them. A name
 * is reserved atomically when its training is submitted and becomes usable when the training
 * registers the result; LoRAs shipped on the agents are global and not in this registry.
 */
export const RegisteredLora = z.object({
  name: z.string(),
  tenant: z.string(),
  key: z.string(),
  sha256: z.string(),
  bytes: z.number().int(),
  base_model: z.string(),
  rank: z.number().int(),
  job_id: z.string(),
  created_at: z.string(),
  /** an admin shared it: every tenant may use it by its qualified name */
  shared: z.boolean().default(false),
});
export type RegisteredLora = z.infer<typeof RegisteredLora>;

const Entry = z.discriminatedUnion('state', [
  z.object({ state: z.literal('reserved'), name: z.string(), tenant: z.string(), job_id: z.string(), at: z.number().optional() }),
  RegisteredLora.extend({ state: z.literal('ready') }),
]);

/** The qualified name of a tenant's LoRA. */
export const qualifiedLoraName = (tenant: string, name: string) => `${tenant}/${name}`;

/**
 * A LoRA name as a file name in KILN_LORA_DIR: "/" becomes "~", a character names cannot hold,
 * so two names never share a file (workers-py/kiln_worker/loras.py decodes it).
 */
export const loraFileName = (name: string) => `${name.replaceAll('/', '~')}.safetensors`;

// Takes a name unless it is registered, or reserved by a job that is still queued or running
// (or still being submitted: its record may not exist for a moment after the reservation).
const RESERVE = new LuaScript('kilnReserveLora', `
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if cur then
  local e = cjson.decode(cur)
  if e.state == 'ready' then return 0 end
  local st = redis.call('HGET', ARGV[3] .. e.job_id, 'status')
  if st == '"queued"' or st == '"running"' then return 0 end
  if not st and tonumber(ARGV[4]) - (tonumber(e.at) or 0) < 600000 then return 0 end
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return 1
`);
// Registers a LoRA only under the reservation of the job that trained it, and only while the
// attempt that trained it still holds the job (a stale attempt's LoRA never becomes the name's).
const REGISTER = new LuaScript('kilnRegisterLora', `
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if cur and cjson.decode(cur).job_id ~= ARGV[3] then return 0 end
local job = redis.call('HMGET', KEYS[2], 'status', 'attempt')
if job[1] ~= '"running"' or job[2] ~= ARGV[4] then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return 1
`);
const SHARE = new LuaScript('kilnShareLora', `
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if not cur then return 0 end
local e = cjson.decode(cur)
if e.state ~= 'ready' then return 0 end
e.shared = (ARGV[2] == '1')
redis.call('HSET', KEYS[1], ARGV[1], cjson.encode(e))
return 1
`);

export class LoraRegistry {
  constructor(
    private readonly redis: Redis,
    private readonly keys: Keys,
  ) {}

  /** Reserves a qualified name for a training job; false when it is taken. */
  async reserve(qualified: string, tenant: string, jobId: string): Promise<boolean> {
    const now = Date.now();
    const entry = JSON.stringify({ state: 'reserved', name: qualified, tenant, job_id: jobId, at: now });
    return (await RESERVE.run(this.redis, [this.keys.loras()], [qualified, entry, this.keys.job(''), String(now)])) === 1;
  }

  /** Gives a reservation back (the submission failed after reserving). */
  async release(qualified: string, jobId: string): Promise<void> {
    const raw = await this.redis.hget(this.keys.loras(), qualified);
    if (raw && Entry.parse(JSON.parse(raw)).state === 'reserved' && JSON.parse(raw).job_id === jobId) await this.redis.hdel(this.keys.loras(), qualified);
  }

  /**
   * Registers a trained LoRA; false when its name is held by another job's reservation, or when
   * `attempt` no longer holds the job (the LoRA of an attempt that lost its job is not registered).
   */
  async register(l: Omit<RegisteredLora, 'shared'> & { shared?: boolean }, attempt: number): Promise<boolean> {
    const entry = JSON.stringify({ ...RegisteredLora.parse(l), state: 'ready' });
    return (await REGISTER.run(this.redis, [this.keys.loras(), this.keys.job(l.job_id)], [l.name, entry, l.job_id, JSON.stringify(attempt)])) === 1;
  }

  async share(qualified: string, shared: boolean): Promise<RegisteredLora | null> {
    if ((await SHARE.run(this.redis, [this.keys.loras()], [qualified, shared ? '1' : '0'])) !== 1) return null;
    return this.get(qualified);
  }

  /** A registered (usable) LoRA by qualified name; reservations are not LoRAs yet. */
  async get(qualified: string): Promise<RegisteredLora | null> {
    return (await this.getMany([qualified])).get(qualified) ?? null;
  }

  async getMany(names: string[]): Promise<Map<string, RegisteredLora>> {
    if (!names.length) return new Map();
    const raws = await this.redis.hmget(this.keys.loras(), ...names);
    const out = new Map<string, RegisteredLora>();
    raws.forEach((raw, i) => {
      const e = raw ? ready(raw) : null;
      if (e) out.set(names[i]!, e);
    });
    return out;
  }

  async list(): Promise<RegisteredLora[]> {
    const all = await this.redis.hvals(this.keys.loras());
    return all.flatMap((r) => ready(r) ?? []).sort((a, b) => a.name.localeCompare(b.name));
  }
}

function ready(raw: string): RegisteredLora | null {
  const obj = JSON.parse(raw);
  if (!obj.state) Object.assign(obj, { state: 'ready', tenant: obj.tenant ?? '' }); // written before tenants
  const e = Entry.parse(obj);
  if (e.state !== 'ready') return null;
  const { state: _state, ...lora } = e;
  return lora;
}
