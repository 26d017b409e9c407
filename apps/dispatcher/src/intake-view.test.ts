import { intakeJobId, QUEUES } from '@kiln/runtime';
import { Queue } from 'bullmq';
import { expect, it } from 'vitest';
import { IntakeView } from './intake-view.js';
import { commandsDuring as commandsOn, intakeFixture, queuedJob } from '../../../tests/support/redis-fixture.js';

const f = intakeFixture('intake-view-test');
const queued = (priority: number, steps?: number) => queuedJob(f, priority, steps);
const commandsDuring = (fn: () => Promise<unknown>) => commandsOn(f.redis, fn);

it('reads a waiting job once, then only the ids of the window; drops what left f.intake and reports stale entries', async () => {
  const view = new IntakeView(f.intake, f.redis, f.keys, 100);
  const low = await queued(10);
  const high = await queued(1, 4);
  const first = await view.refresh();
  expect(first.waiting.map((w) => w.job.id)).toEqual([high.id, low.id]); // priority order
  expect(first.waiting[0]).toMatchObject({ rank: 1, demand: { model: 'stabilityai/sdxl-turbo', adapters: [] }, work: { key: 'generation stabilityai/sdxl-turbo', steps: 4, pixels: 512 * 512 * 2 } });

  // nothing changed: no command at all; told f.intake changed with nothing new: one id read
  expect(await commandsDuring(() => view.refresh())).toEqual([]);
  view.changed();
  const sent = await commandsDuring(() => view.refresh());
  expect(sent.filter((c) => c !== 'evalsha' && c !== 'eval')).toEqual([]);
  expect(sent).toHaveLength(1);

  // an entry that left f.intake leaves the view; a new one is read (entry and record, one round trip)
  await f.intake.remove(intakeJobId(low.id, 0));
  const next = await queued(5);
  view.changed();
  const arrivals = await commandsDuring(async () => expect((await view.refresh()).waiting.map((w) => w.job.id)).toEqual([high.id, next.id]));
  expect(arrivals.filter((c) => c === 'hmget')).toHaveLength(2);
  expect(arrivals).not.toContain('hgetall');
  expect(view.size).toBe(2);

  // an entry whose job moved on (re-queued under another attempt) is stale
  await f.store.update(next.id, { status: ['queued'] }, { attempt: 3 });
  const again = new IntakeView(f.intake, f.redis, f.keys, 100);
  expect(await again.refresh()).toMatchObject({ waiting: [{ job: { id: high.id } }], stale: [intakeJobId(next.id, 0)] });
});

it('takes entries beyond a full window into view as placed ones leave it, without being told', async () => {
  const view = new IntakeView(f.intake, f.redis, f.keys, 2);
  const jobs = [await queued(5), await queued(5), await queued(5)];
  expect((await view.refresh()).waiting.map((w) => w.job.id)).toEqual([jobs[0]!.id, jobs[1]!.id]);
  await f.intake.remove(intakeJobId(jobs[0]!.id, 0));
  view.forget(intakeJobId(jobs[0]!.id, 0));
  expect((await view.refresh()).waiting.map((w) => w.job.id)).toEqual([jobs[1]!.id, jobs[2]!.id]);
});
