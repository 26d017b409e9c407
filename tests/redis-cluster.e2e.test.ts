import { mkdtempSync, rmSync } from 'node:fs';
import { randomUUID } from 'node:crypto';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { execa, type ResultPromise } from 'execa';
import { Redis } from 'ioredis';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { basicRequest, Farm } from './support/farm.js';
import { freePort } from './support/redis-server.js';
import { WebhookReceiver } from './support/webhook-receiver.js';

/**
 * The farm on a Redis Cluster of three masters on loopback, the way the README says to run
 * it: `REDIS_URL=redis://<a node>/?cluster=true` and a hash-tagged prefix, so every key of the
 * farm is in one slot. A generation, a batch (the end-job script spanning a job, its batch and
 * the outbox), its webhook, and a cancel.
 */
describe('on a Redis Cluster (three masters, hash-tagged prefix)', () => {
  const dir = mkdtempSync(join(tmpdir(), 'kiln-cluster-'));
  const nodes: ResultPromise[] = [];
  const ports: number[] = [];
  const prefix = `{kiln-cl-${randomUUID().slice(0, 8)}}`;
  let farm: Farm;
  const receiver = new WebhookReceiver();

  beforeAll(async () => {
    for (let i = 0; i < 3; i++) {
      const port = await freePort();
      ports.push(port);
      nodes.push(execa('redis-server', ['--port', String(port), '--bind', '127.0.0.1', '--cluster-enabled', 'yes', '--cluster-config-file', `nodes-${port}.conf`, '--dir', dir, '--save', '', '--appendonly', 'no'], { reject: false, stdio: 'ignore' }));
    }
    for (const port of ports) {
      for (let t = 0; (await execa('redis-cli', ['-p', String(port), 'ping'], { reject: false })).stdout !== 'PONG'; t++) {
        if (t > 100) throw new Error(`cluster node ${port} did not start`);
        await new Promise((r) => setTimeout(r, 50));
      }
    }
    await execa('redis-cli', ['--cluster', 'create', ...ports.map((p) => `127.0.0.1:${p}`), '--cluster-replicas', '0', '--cluster-yes']);
    for (let t = 0; !(await execa('redis-cli', ['-p', String(ports[0]), 'cluster', 'info'])).stdout.includes('cluster_state:ok'); t++) {
      if (t > 200) throw new Error('cluster did not become ready');
      await new Promise((r) => setTimeout(r, 50));
    }
    // the farm is pointed at a node that does not hold its slot: only a cluster client gets there
    const probe = new Redis(ports[0]!);
    const slot = (await probe.call('CLUSTER', 'KEYSLOT', `${prefix}:job`)) as number;
    const ranges = (await probe.call('CLUSTER', 'SLOTS')) as Array<[number, number, [string, number]]>;
    probe.disconnect();
    const owner = ranges.find(([from, to]) => slot >= from && slot <= to)![2][1];
    const entry = ports.find((p) => p !== owner)!;
    await receiver.start();
    farm = new Farm({ agents: 2, prefix, redisUrl: `redis://127.0.0.1:${entry}/?cluster=true` });
    await farm.start();
  }, 120_000);

  afterAll(async () => {
    await farm?.close().catch(() => {});
    await receiver.close();
    for (const n of nodes) n.kill('SIGKILL');
    await Promise.all(nodes);
    rmSync(dir, { recursive: true, force: true });
  });

  it('runs a generation, a batch with its webhook and a cancel; every key is in the prefix’s slot, on one node', async () => {
    const job = await farm.waitForDone((await farm.submit(basicRequest({ hyperparameters: { seed: 1, width: 256, height: 256 } }))).id);
    expect(job.status, JSON.stringify(job.error)).toBe('succeeded');
    expect((await fetch(job.outputs[0]!.url)).status).toBe(200);

    const res = await farm.request('POST', '/v1/batches', {
      defaults: { model: { base: 'stabilityai/stable-diffusion-xl-base-1.0' }, scheduler: { steps: 2 }, conditioning: { prompt: 'a kiln' }, hyperparameters: { width: 64, height: 64 } },
      items: [{ hyperparameters: { seed: 1 } }, { hyperparameters: { seed: 2 } }, { hyperparameters: { seed: 3 } }],
      webhook: { url: receiver.url },
    });
    expect(res.status, JSON.stringify(res.body)).toBe(202);
    let batch: any;
    await farm.waitFor(async () => (batch = (await farm.get(`/v1/batches/${res.body.id}`)).body).status === 'succeeded', 30_000, 'batch succeeded');
    await farm.waitFor(async () => receiver.received.length >= 1, 10_000, 'batch webhook');
    expect(JSON.parse(receiver.received[0]!.body).type).toBe('batch.completed');

    const long = await farm.submit(basicRequest({ scheduler: { type: 'EulerDiscreteScheduler', steps: 150 }, hyperparameters: { seed: 9, width: 1024, height: 1024 } }));
    await farm.waitForJob(long.id, (j) => j.stage === 'running');
    expect((await farm.request('DELETE', `/v1/jobs/${long.id}`)).status).toBe(202);
    expect((await farm.waitForDone(long.id, 15_000)).status).toBe('canceled');

    // the keys of the farm: all on the one node that owns the prefix's slot
    const perNode = await Promise.all(ports.map(async (p) => (await execa('redis-cli', ['-p', String(p), '--scan', '--pattern', `${prefix}:*`])).stdout.split('\n').filter(Boolean).length));
    expect(perNode.filter((n) => n > 0)).toHaveLength(1);
    expect(Math.max(...perNode)).toBeGreaterThan(10);
  }, 120_000);
});
