import { mkdirSync } from 'node:fs';
import { join } from 'node:path';
import type { Page } from 'playwright-core';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { hasChromium, loopbackBrowser, offLoopback } from './support/browser.js';
import { basicRequest, Farm, type GenRecord } from './support/farm.js';

/**
 * Bull Board as an operator sees it, rendered by headless Chromium against a real farm: a
 * finished job's history, a failed attempt's code and message, a running job's progress, the
 * actions that would not do what they say disabled — and not one request leaving loopback.
 */
const BASE = 'stabilityai/stable-diffusion-xl-base-1.0';
/** The page's visible text (run in the page; typed without the DOM library). */
const bodyText = () => (globalThis as unknown as { document: { body: { innerText: string } } }).document.body.innerText;

describe.skipIf(!hasChromium() && !process.env.CI)('Bull Board keeps history and shows progress, offline', () => {
  const farm = new Farm({ agents: 1, env: { QUEUE_KEEP_COMPLETED: '50', QUEUE_KEEP_FAILED: '50' } });
  let browser: Awaited<ReturnType<typeof loopbackBrowser>>;
  let page: Page;
  let shots = '';
  const board = (path = '') => `${farm.api}/admin/queues${path}`;
  const text = () => page.evaluate(bodyText);
  const waitForText = async (needle: string, timeout = 15_000) => {
    try {
      await page.waitForFunction((n) => (globalThis as unknown as { document: { body: { innerText: string } } }).document.body.innerText.includes(n), needle, { timeout });
    } catch (err) {
      await page.screenshot({ path: join(shots, `missing-${needle.replace(/[^a-z0-9]+/gi, '-').slice(0, 40)}.png`) });
      throw new Error(`the board never showed ${JSON.stringify(needle)}; it showed:\n${(await text()).slice(0, 2000)}`, { cause: err });
    }
  };

  beforeAll(async () => {
    await farm.start();
    shots = join(farm.logDir, 'screenshots');
    mkdirSync(shots, { recursive: true });
    browser = await loopbackBrowser();
    page = await browser.context.newPage();
  }, 90_000);
  afterAll(async () => {
    await browser?.close();
    await farm.close();
  });

  it('keeps finished and failed attempts, named by kind, model and tenant, a failure with its code and message', async () => {
    const done = await farm.waitForDone((await farm.submit(basicRequest())).id);
    expect(done.status).toBe('succeeded');
    const timedOut = await farm.waitForDone((await farm.submit(basicRequest({ scheduler: { steps: 150 }, hyperparameters: { width: 1024, height: 1024 }, timeout_s: 1 }))).id);
    expect(timedOut.error?.code).toBe('timeout');

    await page.goto(board('/queue/agent.agent-0?status=completed'));
    await waitForText(`${done.id}-a1`);
    expect(await text()).toContain(`generation · ${BASE} · default`);
    await page.screenshot({ path: join(shots, 'completed.png'), fullPage: true });

    await page.goto(board('/queue/agent.agent-0?status=failed'));
    await waitForText(`${timedOut.id}-a1`);
    await waitForText('timeout: ran longer than timeout_s=1');
    expect(await text()).not.toContain('entryOutcome'); // the failure, not the agent's stack
    await page.screenshot({ path: join(shots, 'failed.png'), fullPage: true });
    expect(offLoopback(browser.requests)).toEqual([]);
  }, 60_000);

  it("shows a running job's progress on its entry, as the job record has it", async () => {
    // about six seconds: 150 steps at 2048²
    const running = await farm.submit(basicRequest({ scheduler: { steps: 150 }, hyperparameters: { width: 2048, height: 2048 } }));
    let rec: GenRecord = await farm.waitForJob(running.id, (j) => j.stage === 'running' && (j.progress?.step ?? 0) >= 5, 20_000);
    await page.goto(board(`/queue/agent.agent-0/${running.id}-a1`));
    await waitForText(`${running.id}-a1`);
    await page.getByText('Progress', { exact: true }).first().click();
    await waitForText('percent');
    const shown = await text();
    await page.screenshot({ path: join(shots, 'progress.png'), fullPage: true });
    rec = await farm.job(running.id);
    expect(shown).toMatch(/stage[\s\S]{0,20}base/);
    const step = Number(/step\W+(\d+)/.exec(shown)?.[1]);
    expect(step).toBeGreaterThanOrEqual(5);
    expect(step).toBeLessThanOrEqual(rec.progress?.step ?? 150);
    await farm.waitForDone(running.id, 30_000);
    expect(offLoopback(browser.requests)).toEqual([]);
  }, 60_000);

  it('offers only the actions that do what they say, and loads nothing from another host', async () => {
    // intake is read-only (placement does not consume it; the sweep would undo a delete); webhooks can be paused
    const api = async (path: string, method = 'GET') => (await fetch(board(`/api${path}`), { method })).status;
    expect(await api('/queues/intake/pause', 'PUT')).toBe(405);
    expect(await api('/queues/agent.agent-0/pause', 'PUT')).toBe(405);
    expect(await api('/queues/webhooks/pause', 'PUT')).toBe(200);
    expect(await api('/queues/webhooks/resume', 'PUT')).toBe(200);
    await page.goto(board());
    await waitForText('webhooks');
    await page.screenshot({ path: join(shots, 'overview.png'), fullPage: true });
    const html = await (await fetch(board())).text();
    expect(html).not.toMatch(/(?:href|src)="(?:https?:)?\/\//);
    const requests = browser.requests.filter((u) => u.startsWith(farm.api));
    expect(requests.length).toBeGreaterThan(5); // the page, its scripts and styles, and its API calls
    expect(offLoopback(browser.requests)).toEqual([]);
  }, 30_000);
});
