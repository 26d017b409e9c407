import { expect, it } from 'vitest';
import { TickLoop } from './tick-loop.js';

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

it('serves a wake at once, and any number of wakes during a tick with exactly one more, after a pause as long as the tick', async () => {
  const starts: number[] = [];
  const loop = new TickLoop(
    async () => {
      starts.push(performance.now());
      await sleep(40);
    },
    1_000,
    (err) => {
      throw err;
    },
  );
  const woken = performance.now();
  loop.wake();
  expect(starts).toHaveLength(1); // an idle loop ticks in the same turn
  expect(starts[0]! - woken).toBeLessThan(40);
  for (let i = 0; i < 50; i++) loop.wake(); // fifty job ends while it runs
  await sleep(10);
  for (let i = 0; i < 50; i++) loop.wake();
  for (const t = Date.now(); starts.length < 2 && Date.now() - t < 5_000; ) await sleep(10);
  await sleep(150); // long past the second tick's end: no third
  expect(starts).toHaveLength(2);
  await loop.stop();
  // the second waited out at least as long as the first ran (a delay only ever grows)
  expect(starts[1]! - starts[0]!).toBeGreaterThanOrEqual(2 * 40 - 5);
});

it('with coalescing off the next tick follows at once; a failed tick is reported and the loop goes on', async () => {
  const errors: unknown[] = [];
  let n = 0;
  const loop = new TickLoop(
    async () => {
      n += 1;
      await sleep(5);
      if (n === 1) throw new Error('redis went away');
    },
    0,
    (err) => errors.push(err),
  );
  loop.wake();
  loop.wake(); // during the failing tick: dropped with it, as the next wake or interval retries
  for (const t = Date.now(); errors.length < 1 && Date.now() - t < 5_000; ) await sleep(5);
  await sleep(30);
  expect(errors).toHaveLength(1);
  expect(n).toBe(1);
  loop.wake();
  loop.wake();
  for (const t = Date.now(); n < 3 && Date.now() - t < 5_000; ) await sleep(5);
  await sleep(30);
  expect(n).toBe(3);
  await loop.stop();
  loop.wake(); // stopped: nothing runs
  await sleep(20);
  expect(n).toBe(3);
});
