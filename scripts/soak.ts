// `npm run soak`: the long soak (a few minutes; not part of `npm test`). A mixed workload on a
// whole farm while workers, agents and dispatchers are SIGKILLed at random, Redis (AOF on) is
// restarted once cleanly and once by SIGKILL, S3 is down for 20 s and the webhook receiver for
// 60 s; then every check of tests/support/soak.ts. Prints the table; exits 1 if a check failed.
// SOAK_SEED repeats a run's fault schedule.
import { runSoak, soakTable } from '../tests/support/soak.js';

const seed = Number(process.env.SOAK_SEED ?? Math.floor(Math.random() * 1e9));
const report = await runSoak({
  durationMs: 150_000,
  agents: 3,
  generations: 120,
  batches: 3,
  batchSize: 8,
  cancels: 6,
  failing: 4,
  faults: { workerKills: 8, agentKills: 4, dispatcherKills: 2, redisRestart: true, redisKill: true, s3DownMs: 20_000, receiverDownMs: 60_000, trainingKill: true },
  settleMs: 180_000,
  seed,
  say: (line) => process.stdout.write(`${line}\n`),
});
process.stdout.write(`\nseed ${seed}\n${soakTable(report)}\n`);
process.exit(report.ok ? 0 : 1);
