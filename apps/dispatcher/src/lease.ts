import { LuaScript } from '@kiln/runtime';
import type { Redis } from 'ioredis';

const RENEW = new LuaScript('kilnRenewLease', `if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) else return 0 end`);
const RELEASE = new LuaScript('kilnReleaseLease', `if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) else return 0 end`);

/** Exactly one active dispatcher: whoever holds this Redis lease. Others stand by. */
export class Lease {
  held = false;
  constructor(
    private readonly redis: Redis,
    private readonly key: string,
    readonly owner: string,
    private readonly ttlMs: number,
  ) {}

  /** Takes the lease if free, renews it if ours. Returns whether we hold it now. */
  async acquireOrRenew(): Promise<boolean> {
    if (this.held) {
      this.held = (await RENEW.run(this.redis, [this.key], [this.owner, String(this.ttlMs)])) === 1;
    } else {
      this.held = (await this.redis.set(this.key, this.owner, 'PX', this.ttlMs, 'NX')) === 'OK';
    }
    return this.held;
  }

  async release(): Promise<void> {
    if (this.held) await RELEASE.run(this.redis, [this.key], [this.owner]);
    this.held = false;
  }
}
