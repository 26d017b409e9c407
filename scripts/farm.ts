// `npm start`: the whole farm on this machine, each piece its own process.
//  1. Check that Redis answers at REDIS_URL; if not, say how to get one and stop.
//  2. Without S3_ENDPOINT, start an embedded S3-compatible server (data in ./.kiln/s3).
//  3. Without WEBHOOK_SECRET, make one (kept in ./.kiln/webhook-secret) and print it.
//  4. Start the dispatcher, the API on PORT, and AGENTS agents with the synthetic backend
//     (WORKER_BACKEND=diffusers for real GPUs), one per GPU index 0..AGENTS-1.
//  5. Ctrl-C (SIGINT to the terminal's whole process group) or SIGTERM: each child gets one
//     SIGTERM and drains; the children run in process groups of their own, so the terminal's
//     signal does not reach them a second time as a forcing one. A second Ctrl-C forces.
//  6. A child that exits on bad configuration (code 2) stops the farm with code 2; the API or
//     the dispatcher exiting otherwise stops it with code 1.
//  7. Metrics: the API at /metrics on its port; the dispatcher on METRICS_PORT_BASE (9400) and
//     agent i on METRICS_PORT_BASE + 1 + i, on 127.0.0.1.
import { randomBytes } from 'node:crypto';
import { existsSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { resolve } from 'node:path';
import { probeRedis } from '@kiln/runtime';
import type { ResultPromise } from 'execa';
import { ENTRY, REPO_ROOT, startEmbeddedS3, startProcess } from './farm-lib.js';

const env: Record<string, string> = { ...(process.env as Record<string, string>) };
const say = (msg: string) => process.stdout.write(`[kiln] ${msg}\n`);
const agents = Number(env.AGENTS ?? '2');
if (!Number.isInteger(agents) || agents < 0 || agents > 64) {
  process.stderr.write(`[kiln] AGENTS must be a whole number from 0 to 64 (got ${JSON.stringify(env.AGENTS)})\n`);
  process.exit(2);
}
env.REDIS_URL ??= 'redis://127.0.0.1:6379';
env.PORT ||= '8080';
// derived only from a usable port: a bad PORT is the API's to report, by its own name
if (/^\d{1,5}$/.test(env.PORT) && Number(env.PORT) <= 65535) env.PUBLIC_URL ||= `http://127.0.0.1:${env.PORT}`;
const stateDir = resolve(REPO_ROOT, '.kiln');
mkdirSync(stateDir, { recursive: true });

const redisProblem = await probeRedis(env.REDIS_URL);
if (redisProblem) {
  process.stderr.write(
    `[kiln] Redis does not answer at ${env.REDIS_URL} (${redisProblem}).\n` +
      `Kiln keeps its queues and job records in Redis 7 or newer. Start one locally with ` +
      `\`redis-server\` (Debian/Ubuntu: \`sudo apt-get install -y redis-server\`; macOS: \`brew install redis\`), ` +
      `or \`docker run -p 6379:6379 redis:7\`, or point REDIS_URL at an existing server, then run \`npm start\` again.\n`,
  );
  process.exit(1);
}

let s3: Awaited<ReturnType<typeof startEmbeddedS3>> | null = null;
if (!env.S3_ENDPOINT) {
  s3 = await startEmbeddedS3(resolve(stateDir, 's3'), Number(env.S3_PORT ?? '9000'));
  env.S3_ENDPOINT = s3.endpoint;
  env.S3_ACCESS_KEY = s3.accessKey;
  env.S3_SECRET_KEY = s3.secretKey;
  say(`embedded S3-compatible server at ${s3.endpoint} (data in .kiln/s3)`);
}
if (!env.WEBHOOK_SECRET) {
  const file = resolve(stateDir, 'webhook-secret');
  if (!existsSync(file)) writeFileSync(file, `whsec_${randomBytes(24).toString('base64')}\n`, { mode: 0o600 });
  env.WEBHOOK_SECRET = readFileSync(file, 'utf8').trim();
  say(`webhook signing secret (from .kiln/webhook-secret): ${env.WEBHOOK_SECRET}`);
}
// A farm on one machine usually delivers to receivers on the same machine.
env.WEBHOOK_ALLOW_PRIVATE ??= 'true';

const children: { name: string; proc: ResultPromise }[] = [];
let stopping = false;
function start(name: string, entry: string, extra: Record<string, string> = {}) {
  const proc = startProcess(entry, { ...env, ...extra }, 'inherit', { detached: true });
  children.push({ name, proc });
  void proc.then((r) => {
    if (stopping) return;
    if (r.exitCode === 2) {
      say(`${name} exited: bad configuration (see its message above); stopping the farm`);
      void stop(2);
      return;
    }
    say(`${name} exited (${r.signal ?? `code ${r.exitCode}`})`);
    if (name === 'api' || name === 'dispatcher') void stop(1);
  });
}
// the children are not in our process group: nothing else would stop them if we died
process.on('exit', () => {
  for (const c of children) if (c.proc.exitCode === null && c.proc.pid) killGroup(c.proc.pid, 'SIGKILL');
});
function killGroup(pid: number, signal: NodeJS.Signals) {
  try {
    process.kill(-pid, signal); // the child and its workers
  } catch {}
}

// each process its own metrics port (the API serves /metrics on its own port)
const metricsBase = Number(env.METRICS_PORT_BASE || '9400');
delete env.METRICS_PORT;
const metricsPort = (offset: number): Record<string, string> => (Number.isInteger(metricsBase) && metricsBase > 0 && metricsBase + offset <= 65535 ? { METRICS_PORT: String(metricsBase + offset) } : {});
start('dispatcher', ENTRY.dispatcher, metricsPort(0));
start('api', ENTRY.api);
for (let i = 0; i < agents; i++) start(`agent ${i}`, ENTRY.agent, { GPU_ID: String(i), AGENT_ID: env.AGENT_ID_PREFIX ? `${env.AGENT_ID_PREFIX}${i}` : `local-gpu${i}`, ...metricsPort(1 + i) });
say(`farm starting: API on ${env.PUBLIC_URL}, Bull Board at ${env.PUBLIC_URL}/admin/queues, ${agents} agent(s). Ctrl-C stops it.`);

async function stop(code: number) {
  if (stopping) return;
  stopping = true;
  say('stopping the farm (draining; Ctrl-C again forces)…');
  for (const c of children) if (c.proc.exitCode === null) c.proc.kill('SIGTERM');
  const results = await Promise.all(children.map((c) => c.proc));
  await s3?.close();
  const unclean = children.flatMap((c, i) => (results[i]!.exitCode === 0 ? [] : [`${c.name} (${results[i]!.signal ?? `code ${results[i]!.exitCode}`})`]));
  if (code === 0 && unclean.length) {
    say(`stopped, but not cleanly: ${unclean.join(', ')}`);
    process.exit(1);
  }
  say('stopped');
  process.exit(code);
}
let signals = 0;
for (const sig of ['SIGINT', 'SIGTERM'] as const) {
  process.on(sig, () => {
    signals += 1;
    if (signals > 1) {
      say('second signal: forcing every process to stop');
      for (const c of children) if (c.proc.pid) killGroup(c.proc.pid, 'SIGKILL');
      process.exit(130);
    }
    void stop(0);
  });
}
