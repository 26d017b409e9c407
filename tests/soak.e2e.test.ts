import { expect, it } from 'vitest';
import { runSoak, soakTable } from './support/soak.js';

/**
 * The short soak (about a minute, fewer faults) in `npm test`; `npm run soak` is the long one.
 * A worker, an agent and the dispatcher SIGKILLed, Redis restarted once, S3 down 5 s, the
 * webhook receiver down 10 s — and every check of the long soak.
 */
it('short soak: a mixed workload survives the ordinary faults, every check passes', async () => {
  const seed = Number(process.env.SOAK_SEED ?? 4242);
  const report = await runSoak({
    durationMs: 35_000,
    agents: 2,
    generations: 24,
    batches: 1,
    batchSize: 5,
    cancels: 2,
    failing: 1,
    faults: { workerKills: 1, agentKills: 1, dispatcherKills: 1, redisRestart: true, redisKill: false, s3DownMs: 5_000, receiverDownMs: 10_000, trainingKill: true },
    settleMs: 90_000,
    seed,
    say: () => {},
  });
  const table = soakTable(report);
  console.log(table);
  expect(report.checks.filter((c) => !c.ok), table).toEqual([]);
}, 240_000);
