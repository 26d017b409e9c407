// Redis memory per finished job: what JOB_RETENTION_S keeps, in bytes (`MEMORY USAGE`).
//
//  1. Start a farm (API, dispatcher, one real agent and its Python worker, synthetic backend) on
//     the Redis at REDIS_URL and submit BENCH_RECORD_JOBS (5) generations one after another, as
//     the README's figure describes them: one 1024×1024 image, 30 steps, no webhook. The first
//     loads the model; the rest find it resident (the usual case), so they are the ones averaged.
//  2. For each finished job: MEMORY USAGE (SAMPLES 0: every element counted) of its record hash,
//     its events list and its deliveries list, the hash's encoding and field count, the events
//     count; and any other key that names the job (there should be none).
//  3. The list indexes (four sorted sets and the owners hash) at scale: a sorted set or hash past
//     128 entries is no longer a listpack, so their cost per job is measured on scratch keys of
//     BENCH_RECORD_INDEX (2,000) entries shaped like the real ones (job id → created ms;
//     job id → "<tenant> <kind>"), deleted afterwards.
//
// Prints a table and a final JSON line; nothing here fails on a figure.
import { randomUUID } from 'node:crypto';
import { basicRequest, Farm } from '../tests/support/farm.js';

const JOBS = Number(process.env.BENCH_RECORD_JOBS ?? 5);
const INDEX_N = Number(process.env.BENCH_RECORD_INDEX ?? 2_000);

const mean = (xs: number[]) => Math.round(xs.reduce((a, b) => a + b, 0) / Math.max(1, xs.length));

async function main(): Promise<void> {
  const farm = await new Farm({ agents: 1, env: { LOG_LEVEL: 'warn' } }).start();
  try {
    const r = farm.redis;
    const usage = async (key: string) => Number((await r.call('MEMORY', 'USAGE', key, 'SAMPLES', '0')) ?? 0);
    const rows: { job: string; record: number; events: number; deliveries: number; fields: number; encoding: string; event_count: number; other_keys: string[] }[] = [];
    for (let i = 0; i < JOBS; i++) {
      const body = basicRequest({ scheduler: { type: 'EulerDiscreteScheduler', steps: 30 }, hyperparameters: { guidance_scale: 5, seed: 1000 + i, width: 1024, height: 1024, num_images: 1 } });
      const job = await farm.submit(body);
      const done = await farm.waitForDone(job.id, 120_000);
      if (done.status !== 'succeeded') throw new Error(`job ${job.id} ended ${done.status}: ${JSON.stringify(done.error)}`);
      const k = (s: string) => `${farm.prefix}:job:${job.id}${s}`;
      const mine = new Set([k(''), k(':events'), k(':deliveries')]);
      const others = (await r.keys(`${farm.prefix}:*${job.id}*`)).filter((key) => !mine.has(key));
      rows.push({
        job: job.id,
        record: await usage(k('')),
        events: await usage(k(':events')),
        deliveries: await usage(k(':deliveries')),
        fields: await r.hlen(k('')),
        encoding: String(await r.call('OBJECT', 'ENCODING', k(''))),
        event_count: await r.llen(k(':events')),
        other_keys: others,
      });
    }

    // the indexes at scale, on scratch keys shaped like the real ones
    const zkey = `${farm.prefix}:bench:index:zset`;
    const hkey = `${farm.prefix}:bench:index:owners`;
    const now = Date.now();
    for (let i = 0; i < INDEX_N; i += 500) {
      const pipe = r.pipeline();
      for (let j = i; j < Math.min(INDEX_N, i + 500); j++) {
        const id = randomUUID();
        pipe.zadd(zkey, now + j, id).hset(hkey, id, 'default generation');
      }
      await pipe.exec();
    }
    const perZ = (await usage(zkey)) / INDEX_N;
    const perOwner = (await usage(hkey)) / INDEX_N;
    await r.del(zkey, hkey);
    const indexes = Math.round(4 * perZ + perOwner);

    console.log('job                                   record  events  deliv  fields  encoding   events#');
    for (const row of rows) {
      console.log(`${row.job}  ${String(row.record).padStart(6)}  ${String(row.events).padStart(6)}  ${String(row.deliveries).padStart(5)}  ${String(row.fields).padStart(6)}  ${row.encoding.padEnd(9)}  ${row.event_count}${row.other_keys.length ? `  other keys: ${row.other_keys.join(', ')}` : ''}`);
    }
    const steady = rows.length > 1 ? rows.slice(1) : rows;
    const record = mean(steady.map((x) => x.record));
    const events = mean(steady.map((x) => x.events));
    const deliveries = mean(steady.map((x) => x.deliveries));
    const total = record + events + deliveries + indexes;
    console.log(`index entry: sorted set ${perZ.toFixed(1)} B (×4), owners hash ${perOwner.toFixed(1)} B`);
    console.log(`per finished job (model resident, mean of ${steady.length}): record ${record} B + events ${events} B + deliveries ${deliveries} B + indexes ${indexes} B = ${total} B; ${(total / 1000).toFixed(2)} GB per million kept`);
    console.log(
      JSON.stringify({
        bench: 'records',
        jobs: steady.length,
        record_bytes: record,
        events_bytes: events,
        deliveries_bytes: deliveries,
        index_bytes: indexes,
        total_bytes: total,
        gb_per_million: Math.round(total / 10) / 100,
        first_job: rows[0],
        encoding: steady[0]?.encoding,
        fields: steady[0]?.fields,
        event_count: steady[0]?.event_count,
      }),
    );
  } finally {
    await farm.close();
  }
}

main().catch((err) => {
  console.error(err);
  process.exitCode = 1;
});
