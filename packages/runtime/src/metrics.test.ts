import { createServer } from 'node:net';
import type { AddressInfo } from 'node:net';
import { describe, expect, it } from 'vitest';
import { EnvError, parseEnvOrThrow } from './env.js';
import { createLogger } from './logger.js';
import { jobsEnded, MetricsEnv, serveMetrics } from './metrics.js';

const log = createLogger('metrics-test', 'silent');

describe('MetricsEnv', () => {
  it('is off without a port and on loopback by default', () => {
    expect(parseEnvOrThrow(MetricsEnv, {})).toEqual({ METRICS_HOST: '127.0.0.1' });
    expect(parseEnvOrThrow(MetricsEnv, { METRICS_PORT: '9100', METRICS_HOST: '0.0.0.0' })).toEqual({ METRICS_PORT: 9100, METRICS_HOST: '0.0.0.0' });
  });
  it('names a bad port', () => {
    expect(() => parseEnvOrThrow(MetricsEnv, { METRICS_PORT: '70000' })).toThrow(EnvError);
    expect(() => parseEnvOrThrow(MetricsEnv, { METRICS_PORT: 'nine' })).toThrow(/METRICS_PORT/);
  });
});

describe('serveMetrics', () => {
  it('serves the registry at GET /metrics and nothing else', async () => {
    jobsEnded.inc({ kind: 'generation', outcome: 'succeeded', code: 'none' });
    const m = await serveMetrics({ METRICS_HOST: '127.0.0.1', METRICS_PORT: 0 }, log);
    try {
      const res = await fetch(`http://127.0.0.1:${m.port}/metrics`);
      expect(res.status).toBe(200);
      expect(res.headers.get('content-type')).toContain('text/plain');
      expect(await res.text()).toMatch(/^kiln_jobs_ended_total\{kind="generation",outcome="succeeded",code="none"\} [1-9]/m);
      expect((await fetch(`http://127.0.0.1:${m.port}/other`)).status).toBe(404);
      expect((await fetch(`http://127.0.0.1:${m.port}/metrics`, { method: 'POST' })).status).toBe(404);
    } finally {
      await m.close();
    }
  });

  it('serves nothing without a port, and a port already taken is not fatal', async () => {
    expect((await serveMetrics({ METRICS_HOST: '127.0.0.1' }, log)).port).toBeNull();
    const taken = createServer();
    await new Promise<void>((r) => taken.listen(0, '127.0.0.1', r));
    try {
      const m = await serveMetrics({ METRICS_HOST: '127.0.0.1', METRICS_PORT: (taken.address() as AddressInfo).port }, log);
      expect(m.port).toBeNull();
      await m.close();
    } finally {
      taken.close();
    }
  });
});
