import type { ChainableCommander, Redis } from 'ioredis';

/**
 * A Lua script sent by its SHA1 (EVALSHA), not its text: ioredis `defineCommand` on the
 * client, which loads the script on the first NOSCRIPT (a restarted or flushed Redis, a new
 * cluster node) and retries. Pipelines and MULTIs made from a client the script is defined on
 * send it the same way (ioredis loads the missing ones before exec).
 */
export class LuaScript {
  constructor(
    /** unique among Kiln's scripts: the name of the command it becomes on the client */
    readonly name: string,
    readonly lua: string,
  ) {}

  /** Defines the script on `redis` (once per client); call before making a pipeline that uses it. */
  define(redis: Redis): void {
    const client = redis as unknown as { scriptsSet?: Record<string, unknown> };
    if (!client.scriptsSet?.[this.name]) redis.defineCommand(this.name, { lua: this.lua });
  }

  async run<T = unknown>(redis: Redis, keys: readonly string[], args: readonly (string | number)[]): Promise<T> {
    this.define(redis);
    const call = (redis as unknown as Record<string, (...a: (string | number)[]) => Promise<T>>)[this.name]!;
    return call.call(redis, keys.length, ...keys, ...args);
  }

  /** Queues the script on a pipeline or MULTI made from a client it is `define`d on. */
  queue(pipe: ChainableCommander, keys: readonly string[], args: readonly (string | number)[]): ChainableCommander {
    const call = (pipe as unknown as Record<string, ((...a: (string | number)[]) => ChainableCommander) | undefined>)[this.name];
    if (!call) throw new Error(`script ${this.name} is not defined on the client this pipeline was made from`);
    return call.call(pipe, keys.length, ...keys, ...args);
  }
}
