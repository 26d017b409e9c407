import type { JobRecord } from '@kiln/contracts';
import { AgentRegistry } from '@kiln/runtime';
import { expect, it } from 'vitest';
import { heartbeat } from '../../../tests/support/heartbeat.js';
import { commandsDuring, intakeFixture, queuedJob } from '../../../tests/support/redis-fixture.js';
import type { ApiContext } from './context.js';
import { withQueue } from './queue.js';

const f = intakeFixture('queue-test');

it("answers a record's queue estimate from the registry as last read, not a read of every heartbeat per answer", async () => {
  const registry = new AgentRegistry(f.redis, f.keys);
  for (let i = 0; i < 50; i++) await registry.publish(heartbeat(`a${i}`, { avg_job_ms: 4_000 }), 10_000);
  const ctx = { redis: f.redis, intake: f.intake, registry } as unknown as ApiContext;
  const job = await queuedJob(f, 5);
  const record = { ...job, queue: null } as unknown as JobRecord;
  const first = await withQueue(ctx, [record]);
  expect(first[0]!.queue).toMatchObject({ position: 0 });
  expect(first[0]!.queue!.eta_s).toBeGreaterThan(0);
  // the next answers (every submit, every poll) cost the job's place in intake only
  const sent = await commandsDuring(f.redis, () => withQueue(ctx, [record]));
  expect(sent).toEqual(['zrank']);
  // a finished record needs no estimate at all
  expect(await commandsDuring(f.redis, () => withQueue(ctx, [{ ...record, status: 'succeeded' }]))).toEqual([]);
});
