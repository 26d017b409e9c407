// The control plane's cost per job, against raw BullMQ on the same Redis, in one run:
//  1. raw BullMQ: a queue and a no-op worker — jobs/s and Redis commands per job (the baseline);
//  2. the farm with simulated agents: the real API and dispatcher as their own processes, and
//     N agents in this process that heartbeat like real ones, consume their real agent.<id>
//     queues and write records through Kiln's runtime (start, then succeed), with zero-cost
//     work — jobs/s, submit→placed p50/p95, Redis commands per job (INFO commandstats deltas),
//     CPU ms per job of the dispatcher (per placement) and of the API.
// A private redis-server (no persistence) keeps other users of the machine's Redis out of the
// command counts. Prints a table and a final JSON line (bench/README.md); never fails on timing.
import { randomUUID } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { resolve } from 'node:path';
import type { AgentHeartbeat, JobEvent } from '@kiln/contracts';
import { type AgentJobData, CommonEnv, createJobServices, createLogger, JobEnv, type JobServices, parseEnvOrThrow, QUEUES, StorageEnv, WebhookEnv } from '@kiln/runtime';
import { Queue, Worker } from 'bullmq';
import { execa } from 'execa';
import { Redis } from 'ioredis';
import { ENTRY, REPO_ROOT, startEmbeddedS3, startProcess } from '../scripts/farm-lib.js';
import { freePort, RedisServer } from '../tests/support/redis-server.js';
import { heartbeat } from '../tests/support/heartbeat.js';

const AGENT_COUNTS = (process.env.BENCH_AGENTS ?? '10,100,500').split(',').map(Number);
const FARM_JOBS = Number(process.env.BENCH_FARM_JOBS ?? 1_000);
const RAW_JOBS = Number(process.env.BENCH_RAW_JOBS ?? 5_000);
const CLIENTS = Number(process.env.BENCH_CLIENTS ?? 32);
/** jobs waiting when the most agents come back at once (0: no backlog run) */
const BACKLOG = Number(process.env.BENCH_BACKLOG ?? 5_000);
const MODEL = 'bench/zero';
const TICK_S = 100; // Linux clock ticks per second (/proc/<pid>/stat)

createLogger('bench', 'warn'); // the runtime's lifecycle lines from the simulated agents stay quiet
/** every connection this process makes, closed at the end (BullMQ leaves a given one open) */
const connections: Redis[] = [];
const connect = (url: string) => {
  const c = new Redis(url, { maxRetriesPerRequest: null });
  c.on('error', () => {});
  connections.push(c);
  return c;
};

const pct = (xs: number[], p: number) => (xs.length ? [...xs].sort((a, b) => a - b)[Math.min(xs.length - 1, Math.floor((p / 100) * xs.length))]! : NaN);
const round = (x: number, d = 2) => Number(x.toFixed(d));

/** Calls so far of every command (INFO commandstats), and their total. */
async function commandStats(redis: Redis): Promise<Map<string, number>> {
  const info = await redis.info('commandstats');
  const out = new Map<string, number>();
  for (const m of info.matchAll(/cmdstat_([^:]+):calls=(\d+)/g)) out.set(m[1]!, Number(m[2]));
  return out;
}
async function commandCalls(redis: Redis): Promise<number> {
  return [...(await commandStats(redis)).values()].reduce((a, b) => a + b, 0);
}
/** The commands that grew most between two commandStats, per job. */
function topCommands(before: Map<string, number>, after: Map<string, number>, jobs: number, n = 8): Record<string, number> {
  const delta = [...after].map(([k, v]) => [k, (v - (before.get(k) ?? 0)) / jobs] as const).sort((a, b) => b[1] - a[1]);
  return Object.fromEntries(delta.slice(0, n).map(([k, v]) => [k, round(v, 1)]));
}

/**
 * BENCH_PROFILE=1: every command of the run (MONITOR), grouped by command and key shape (ids
 * replaced by *), and whether a script ran it, per job, printed before the table. MONITOR slows
 * Redis down, so a profiled run's timings are not the bench's figures.
 */
async function profileCommands(url: string, prefix: string) {
  const counts = new Map<string, number>();
  const monitor = await connect(url).monitor();
  const shape = (key: string) =>
    key
      .replace(prefix, 'P')
      .replace(/[0-9a-f]{8}-[0-9a-f-]{27}/g, '*')
      .replace(/sim-\d+/g, 'sim-*')
      .replace(/:\d+$/, ':N')
      .replace(/-[aq]\d+$/, '-*');
  monitor.on('monitor', (_time: string, args: string[], source: string) => {
    const cmd = (args[0] ?? '').toLowerCase();
    const key = cmd === 'evalsha' || cmd === 'eval' ? `${args[1]?.slice(0, 8)} ${shape(args[3] ?? '')}` : shape(args[1] ?? '');
    const k = `${source.startsWith('lua') ? 'lua ' : '    '}${cmd} ${key}`;
    counts.set(k, (counts.get(k) ?? 0) + 1);
  });
  return {
    async report(jobs: number) {
      await monitor.disconnect();
      const areas = new Map<string, number>();
      for (const [k, v] of counts) {
        const key = k.slice(4).split(' ').slice(-1)[0]!;
        const area = /:agent\.sim/.test(key) ? 'BullMQ agent queues' : /:intake:/.test(key) ? 'BullMQ intake' : /:job:/.test(key) ? 'job records' : /:index:/.test(key) ? 'lists' : /:agents?\b|:agent:/.test(key) ? 'registry' : /:changed:|:wake/.test(key) ? 'pub/sub' : 'other';
        areas.set(area, (areas.get(area) ?? 0) + v);
      }
      console.log(`commands per job by area: ${[...areas].sort((a, b) => b[1] - a[1]).map(([a, v]) => `${a} ${(v / jobs).toFixed(1)}`).join(', ')}`);
      const rows = [...counts].sort((a, b) => b[1] - a[1]).slice(0, 60);
      console.log(`commands per job by call site (MONITOR; lua = inside a script), top ${rows.length}:`);
      for (const [k, v] of rows) console.log(`${(v / jobs).toFixed(2).padStart(8)}  ${k}`);
    },
  };
}

/** CPU ms a process has used (user + system). */
function cpuMs(pid: number): number {
  const fields = readFileSync(`/proc/${pid}/stat`, 'utf8').split(') ')[1]!.split(' ');
  return ((Number(fields[11]) + Number(fields[12])) * 1000) / TICK_S;
}

async function rawBullmq(url: string): Promise<{ jobs_per_s: number; commands_per_job: number }> {
  const prefix = `bench-raw-${randomUUID().slice(0, 8)}`;
  const conn = connect(url);
  const queue = new Queue('raw', { connection: conn, prefix });
  let done = 0;
  let finish!: () => void;
  const finished = new Promise<void>((r) => (finish = r));
  const worker = new Worker(
    'raw',
    async () => {
      if (++done === RAW_JOBS) finish();
    },
    { connection: connect(url), prefix, concurrency: 50, removeOnComplete: { count: 1000 } },
  );
  await worker.waitUntilReady();
  const before = await commandCalls(conn);
  const t0 = performance.now();
  for (let i = 0; i < RAW_JOBS; i += 100) {
    await Promise.all(Array.from({ length: Math.min(100, RAW_JOBS - i) }, (_, k) => queue.add('noop', { i: i + k })));
  }
  await finished;
  const ms = performance.now() - t0;
  const commands = (await commandCalls(conn)) - before;
  await worker.close();
  await queue.obliterate({ force: true });
  await queue.close();
  return { jobs_per_s: round((RAW_JOBS * 1000) / ms, 0), commands_per_job: round(commands / RAW_JOBS, 1) };
}

/** N agents in this process: each heartbeats and consumes its own queue with zero-cost work. */
function simulatedAgents(services: JobServices, url: string, prefix: string, n: number, onDone: (jobId: string) => void) {
  const now = () => new Date().toISOString();
  const ids = Array.from({ length: n }, (_, i) => `sim-${String(i).padStart(3, '0')}`);
  const busy = new Map<string, string | null>();
  const beatOf = (id: string): AgentHeartbeat =>
    heartbeat(
      id,
      {
        host: 'bench',
        gpu_id: id,
        gpu: { name: 'simulated', vram_total_mb: 24_576, vram_free_mb: 16_000 },
        state: busy.get(id) ? 'busy' : 'ready',
        resident: [{ name: MODEL, location: 'vram', vram_mb: 7_000, last_used_at: null, pinned: false }],
        current_job: busy.get(id) ?? null,
        worker: { pid: null, restarts: 0 },
        avg_job_ms: 1,
      },
      { [MODEL]: 7_000 },
    );
  const beat = () => Promise.all(ids.map((id) => services.registry.publish(beatOf(id), 5_000)));
  const timer = setInterval(() => void beat(), 1_000);
  const workers = ids.map(
    (id) =>
      new Worker<AgentJobData>(
        QUEUES.agent(id),
        async (entry) => {
          const { job_id, attempt } = entry.data;
          const guard = { status: ['running' as const], attempt };
          busy.set(id, job_id);
          const started = await services.jobs.update(job_id, guard, { stage: 'running', started_at: now() }, { webhook: 'started' });
          if (started) {
            await services.jobs.update(job_id, guard, { status: 'succeeded', stage: 'done', progress: null, finished_at: now() });
            onDone(job_id);
          }
          busy.set(id, null);
        },
        { connection: connect(url), prefix, concurrency: 1 },
      ).on('completed', (entry) => void services.jobs.wake(id, entry.id)), // as a real agent: the entry left the queue, a slot is free
  );
  return {
    ids,
    ready: beat(),
    close: async () => {
      clearInterval(timer);
      await Promise.all(workers.map((w) => w.close()));
      await Promise.all(ids.map((id) => services.registry.remove(id)));
    },
  };
}

interface FarmRow {
  agents: number;
  jobs: number;
  jobs_per_s: number;
  placed_p50_ms: number;
  placed_p95_ms: number;
  commands_per_job: number;
  top_commands_per_job: Record<string, number>;
  dispatcher_cpu_ms_per_placement: number;
  longest_tick_ms: number;
  longest_block_ms: number;
  ticks_per_job: number;
  redis_cpu_ms_per_job: number;
  api_cpu_ms_per_job: number;
  this_process_cpu_ms_per_job: number;
  /** with the most agents: a backlog meeting every slot free at once (see backlog()) */
  backlog?: BacklogRow;
}

interface BacklogRow {
  agents: number;
  waiting: number;
  drain_jobs_per_s: number;
  longest_tick_ms: number;
  longest_block_ms: number;
  dispatcher_cpu_ms_per_placement: number;
}

/** The dispatcher's longest tick and longest event-loop block since the previous call (its metrics; each scrape resets them). */
async function dispatcherMaxima(port: number): Promise<{ tickMs: number; blockMs: number; ticks: number }> {
  const text = await (await fetch(`http://127.0.0.1:${port}/metrics`)).text();
  const value = (name: string) => Number(new RegExp(`^${name} ([0-9.e+-]+)$`, 'm').exec(text)?.[1] ?? NaN);
  return {
    tickMs: value('kiln_placement_tick_max_seconds') * 1000,
    blockMs: value('kiln_dispatcher_event_loop_block_max_seconds') * 1000,
    ticks: value('kiln_placement_tick_seconds_count'),
  };
}

async function farm(url: string, agents: number, redisPid: number): Promise<FarmRow> {
  const prefix = `bench-farm-${randomUUID().slice(0, 8)}`;
  const s3 = await startEmbeddedS3(resolve(REPO_ROOT, '.kiln/bench-s3', prefix));
  const port = await freePort();
  const metricsPort = await freePort();
  const env = {
    REDIS_URL: url,
    KILN_PREFIX: prefix,
    S3_ENDPOINT: s3.endpoint,
    S3_ACCESS_KEY: s3.accessKey,
    S3_SECRET_KEY: s3.secretKey,
    S3_BUCKET: 'kiln-bench',
    PORT: String(port),
    PUBLIC_URL: `http://127.0.0.1:${port}`,
    LOG_LEVEL: 'warn',
    LOG_FORMAT: 'json',
    AGENT_TTL_MS: '5000',
  };
  // BENCH_CPU_PROF=<dir>: V8 CPU profiles of the dispatcher and the API (node --cpu-prof), written as they exit
  const start = (entry: string, name: string, extra: Record<string, string> = {}) =>
    process.env.BENCH_CPU_PROF
      ? execa(process.execPath, ['--cpu-prof', `--cpu-prof-dir=${resolve(process.env.BENCH_CPU_PROF, `${name}-${agents}`)}`, '--import', 'tsx', entry], { cwd: REPO_ROOT, env: { ...env, ...extra }, stdio: 'ignore', reject: false })
      : startProcess(entry, { ...env, ...extra }, 'pipe');
  const dispatcher = start(ENTRY.dispatcher, 'dispatcher', { METRICS_PORT: String(metricsPort), METRICS_HOST: '127.0.0.1' });
  const api = start(ENTRY.api, 'api');
  const services = createJobServices(parseEnvOrThrow(CommonEnv.extend(StorageEnv.shape).extend(WebhookEnv.shape).extend(JobEnv.shape), env), 'kiln-bench');
  const base = `http://127.0.0.1:${port}`;
  let done = 0;
  let target = FARM_JOBS;
  let finish!: () => void;
  let finished = new Promise<void>((r) => (finish = r));
  const sim = simulatedAgents(services, url, prefix, agents, () => {
    if (++done === target) finish();
  });
  try {
    await sim.ready;
    for (let t = Date.now(); !(await fetch(`${base}/healthz`).catch(() => null))?.ok; ) {
      if (Date.now() - t > 60_000) throw new Error('the API did not come up');
      await new Promise((r) => setTimeout(r, 100));
    }
    const body = (i: number) => JSON.stringify({ model: { base: MODEL }, conditioning: { prompt: 'bench' }, hyperparameters: { seed: i, width: 64, height: 64 } });
    const submit = async (i: number) => {
      const res = await fetch(`${base}/v1/generations`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: body(i) });
      if (res.status !== 202) throw new Error(`submit answered ${res.status}: ${await res.text()}`);
      return ((await res.json()) as { id: string }).id;
    };
    await submit(FARM_JOBS); // warm every path once
    await new Promise((r) => setTimeout(r, 500));
    done = 0;
    const redis = services.redis;
    const profile = process.env.BENCH_PROFILE ? await profileCommands(url, prefix) : null;
    const ticks0 = (await dispatcherMaxima(metricsPort)).ticks; // resets the maxima: what the next read says is the run's
    const [stats0, d0, a0, p0, r0] = [await commandStats(redis), cpuMs(dispatcher.pid!), cpuMs(api.pid!), process.cpuUsage(), cpuMs(redisPid)];
    const t0 = performance.now();
    const ids: string[] = [];
    let next = 0;
    await Promise.all(
      Array.from({ length: CLIENTS }, async () => {
        while (next < FARM_JOBS) ids.push(await submit(next++));
      }),
    );
    await finished;
    const ms = performance.now() - t0;
    const [stats1, d1, a1, p1, r1] = [await commandStats(redis), cpuMs(dispatcher.pid!), cpuMs(api.pid!), process.cpuUsage(p0), cpuMs(redisPid)];
    const maxima = await dispatcherMaxima(metricsPort);
    if (profile) await profile.report(FARM_JOBS);
    const sum = (m: Map<string, number>) => [...m.values()].reduce((a, b) => a + b, 0);
    // submit → placed from each job's own events (read after the counts were taken)
    const placed: number[] = [];
    for (let i = 0; i < ids.length; i += 200) {
      const pipe = redis.pipeline();
      for (const id of ids.slice(i, i + 200)) pipe.lrange(services.keys.jobEvents(id), 0, 2);
      for (const [, evs] of (await pipe.exec()) ?? []) {
        const events = (evs as string[]).filter((e) => e !== '').map((e) => JSON.parse(e) as JobEvent); // '': blanked when it succeeded (job-store COMPACT)
        const at = events.find((e) => e.status === 'running')?.at;
        if (at) placed.push(Date.parse(at) - Date.parse(events[0]!.at));
      }
    }
    // a backlog meeting a whole fleet's free slots at once (a fleet coming up, or after a failover):
    // every agent out of rotation while BENCH_BACKLOG jobs are submitted, then all back at once
    let backlog: BacklogRow | undefined;
    if (agents === Math.max(...AGENT_COUNTS) && BACKLOG > 0) {
      await Promise.all(sim.ids.map((id) => services.registry.setMaintenance(id, true)));
      await services.jobs.wake();
      done = 0;
      target = BACKLOG;
      finished = new Promise<void>((r) => (finish = r));
      let n = 0;
      await Promise.all(
        Array.from({ length: CLIENTS }, async () => {
          while (n < BACKLOG) await submit(FARM_JOBS + 1 + n++);
        }),
      );
      await dispatcherMaxima(metricsPort);
      const [bd0, bt0] = [cpuMs(dispatcher.pid!), performance.now()];
      await Promise.all(sim.ids.map((id) => services.registry.setMaintenance(id, false)));
      await services.jobs.wake();
      await finished;
      const [bms, bmax, bd1] = [performance.now() - bt0, await dispatcherMaxima(metricsPort), cpuMs(dispatcher.pid!)];
      backlog = {
        agents,
        waiting: BACKLOG,
        drain_jobs_per_s: round((BACKLOG * 1000) / bms, 0),
        longest_tick_ms: round(bmax.tickMs, 1),
        longest_block_ms: round(bmax.blockMs, 1),
        dispatcher_cpu_ms_per_placement: round((bd1 - bd0) / BACKLOG, 3),
      };
    }
    return {
      ...(backlog ? { backlog } : {}),
      agents,
      jobs: FARM_JOBS,
      jobs_per_s: round((FARM_JOBS * 1000) / ms, 0),
      placed_p50_ms: pct(placed, 50),
      placed_p95_ms: pct(placed, 95),
      commands_per_job: round((sum(stats1) - sum(stats0)) / FARM_JOBS, 1),
      top_commands_per_job: topCommands(stats0, stats1, FARM_JOBS),
      dispatcher_cpu_ms_per_placement: round((d1 - d0) / FARM_JOBS, 3),
      longest_tick_ms: round(maxima.tickMs, 1),
      longest_block_ms: round(maxima.blockMs, 1),
      ticks_per_job: round((maxima.ticks - ticks0) / FARM_JOBS, 2),
      redis_cpu_ms_per_job: round((r1 - r0) / FARM_JOBS, 3),
      api_cpu_ms_per_job: round((a1 - a0) / FARM_JOBS, 3),
      this_process_cpu_ms_per_job: round((p1.user + p1.system) / 1000 / FARM_JOBS, 3),
    };
  } finally {
    await sim.close();
    dispatcher.kill('SIGTERM');
    api.kill('SIGTERM');
    await Promise.allSettled([dispatcher, api]);
    await services.close();
    await s3.stop();
  }
}

const server = await new RedisServer({ aof: false }).start();
try {
  const raw = await rawBullmq(server.url);
  const rows: FarmRow[] = [];
  for (const n of AGENT_COUNTS) rows.push(await farm(server.url, n, server.pid!));
  console.log(`raw BullMQ (no-op worker, concurrency 50): ${raw.jobs_per_s} jobs/s, ${raw.commands_per_job} Redis commands per job`);
  console.log('farm with simulated agents (real API and dispatcher), zero-cost work:');
  console.log('agents   jobs/s   of raw   placed p50/p95 ms   cmds/job   dispatcher ms/placement   ticks/job   longest tick/block ms   api ms/job   bench ms/job   redis ms/job');
  for (const r of rows) {
    console.log(
      `${String(r.agents).padStart(6)}  ${String(r.jobs_per_s).padStart(7)}  ${`${((100 * r.jobs_per_s) / raw.jobs_per_s).toFixed(1)}%`.padStart(7)}  ${`${r.placed_p50_ms}/${r.placed_p95_ms}`.padStart(18)}  ${String(r.commands_per_job).padStart(9)}  ${String(r.dispatcher_cpu_ms_per_placement).padStart(24)}  ${String(r.ticks_per_job).padStart(10)}  ${`${r.longest_tick_ms}/${r.longest_block_ms}`.padStart(22)}  ${String(r.api_cpu_ms_per_job).padStart(11)}  ${String(r.this_process_cpu_ms_per_job).padStart(13)}  ${String(r.redis_cpu_ms_per_job).padStart(13)}`,
    );
  }
  for (const b of rows.flatMap((r) => (r.backlog ? [r.backlog] : []))) {
    console.log(
      `backlog: ${b.waiting} jobs waiting meet ${b.agents} agents' free slots at once: drained at ${b.drain_jobs_per_s} jobs/s, longest tick ${b.longest_tick_ms} ms, longest event-loop block ${b.longest_block_ms} ms, dispatcher ${b.dispatcher_cpu_ms_per_placement} ms CPU per placement`,
    );
  }
  console.log(JSON.stringify({ bench: 'farm', raw_bullmq: raw, farm: rows.map((r) => ({ ...r, of_raw: round(r.jobs_per_s / raw.jobs_per_s, 3) })) }));
} finally {
  for (const c of connections) c.disconnect();
  await server.stop();
}
