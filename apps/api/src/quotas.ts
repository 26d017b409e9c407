import { isTerminal } from '@kiln/contracts';
import { KilnError, LuaScript } from '@kiln/runtime';
import type { ApiContext } from './context.js';
import type { Principal } from './keys.js';

/**
 * A tenant's queue quota: at most `max_queued_jobs` unfinished jobs. Each tenant has a set of
 * its job ids; admission adds to it atomically while under the limit. Ended jobs are pruned
 * only when a tenant reaches its limit, so the hot path is one script call.
 */
const ADMIT = new LuaScript('kilnAdmitJobs', `
local n = redis.call('ZCARD', KEYS[1])
if n + #ARGV - 2 > tonumber(ARGV[1]) then return n end
for i = 3, #ARGV do redis.call('ZADD', KEYS[1], ARGV[2], ARGV[i]) end
redis.call('EXPIRE', KEYS[1], 30 * 24 * 3600)
return -1
`);

export async function admitJobs(ctx: ApiContext, p: Principal, ids: string[]): Promise<void> {
  if (ctx.ring.open) return;
  const limit = ctx.ring.limitsFor(p.tenant).max_queued_jobs;
  const key = ctx.keys.tenantJobs(p.tenant);
  const tryAdmit = async () => await ADMIT.run<number>(ctx.redis, [key], [String(limit), String(Date.now()), ...ids]);
  let held = await tryAdmit();
  if (held < 0) return;
  // at the limit: drop the jobs that have ended (or expired) since, and try once more
  const members = await ctx.redis.zrange(key, 0, -1);
  const jobs = await ctx.store.getMany(members);
  const ended = members.filter((_, i) => !jobs[i] || isTerminal(jobs[i]!.status));
  if (ended.length) await ctx.redis.zrem(key, ...ended);
  held = await tryAdmit();
  if (held < 0) return;
  const message = `tenant ${p.tenant} has ${held} unfinished jobs; the limit is ${limit} (max_queued_jobs)`;
  throw new KilnError('quota_exceeded', message, { details: [{ field: '', rule: 'max_queued_jobs', message }] });
}

/** Gives back a place taken by admitJobs when the submission then failed. */
export async function releaseJobs(ctx: ApiContext, p: Principal, ids: string[]): Promise<void> {
  if (ctx.ring.open || !ids.length) return;
  await ctx.redis.zrem(ctx.keys.tenantJobs(p.tenant), ...ids);
}
