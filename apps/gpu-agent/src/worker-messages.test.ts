import { readdirSync, readFileSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { WorkerToAgent } from '@kiln/contracts';
import { describe, expect, it } from 'vitest';
import { WorkerMessages } from './worker-messages.js';

// The agent accepts a worker's message through validators compiled from the JSON Schema zod
// generates; zod's WorkerToAgent is the definition. They must give the same verdict on every
// message, or a worker's broken frame would be taken for a result (or a good one refused).

const samplesDir = resolve(import.meta.dirname, '../../../packages/contracts/samples');
const samples = readdirSync(samplesDir)
  .filter((f) => f.startsWith('worker-to-agent.') && f.endsWith('.json'))
  .sort()
  .map((file) => ({ file, json: JSON.parse(readFileSync(join(samplesDir, file), 'utf8')) as Record<string, unknown> }));
const result = samples.find((s) => s.file === 'worker-to-agent.result.json')!.json as Record<string, any>;
const clone = <T>(v: T): T => structuredClone(v);

/** Broken results, each one way a worker could get it wrong. */
function brokenResults(): [string, unknown][] {
  const out = (patch: (o: Record<string, any>) => void) => {
    const m = clone(result);
    patch(m.outputs[0]);
    return m;
  };
  const msg = (patch: (m: Record<string, any>) => void) => {
    const m = clone(result);
    patch(m);
    return m;
  };
  return [
    ['an extra field', msg((m) => (m.extra = 1))],
    ['no state', msg((m) => delete m.state)],
    ['a string for inference_ms', msg((m) => (m.timings.inference_ms = '5'))],
    ['v 2', msg((m) => (m.v = 2))],
    ['an empty id', msg((m) => (m.id = ''))],
    ['loaded_models not strings', msg((m) => (m.loaded_models = [1]))],
    ['an uppercase sha256', out((o) => (o.sha256 = String(o.sha256).toUpperCase()))],
    ['a fractional width', out((o) => (o.width = 1.5))],
    ['a negative index', out((o) => (o.index = -1))],
    ['a seed past 2^32', out((o) => (o.seed = 2 ** 32))],
    ['no metadata timings', out((o) => delete o.metadata.timings)],
    ['an unknown stage timing', out((o) => (o.metadata.timings.warp_ms = 1))],
    ['a negative stage timing', out((o) => (o.metadata.timings.base_ms = -1))],
    ['an unknown output field', out((o) => (o.thumbnail = 'x'))],
    ['outputs not a list', msg((m) => (m.outputs = {}))],
    ['an unknown type', msg((m) => (m.type = 'results'))],
    ['no type', msg((m) => delete m.type)],
    ['not an object', [result]],
    ['null', null],
  ];
}

describe('WorkerMessages', () => {
  const messages = new WorkerMessages();
  const verdict = (json: unknown) => {
    try {
      messages.parse(json);
      return true;
    } catch {
      return false;
    }
  };

  it('accepts every sample zod accepts, returning the message itself', () => {
    expect(samples.length).toBeGreaterThanOrEqual(10);
    for (const s of samples) {
      expect(WorkerToAgent.safeParse(s.json).success, `zod refused ${s.file}`).toBe(true);
      expect(messages.parse(s.json), s.file).toEqual(s.json);
    }
  });

  it('keeps what the metadata carries beyond its timings (the file\'s embedded fields)', () => {
    const m = clone(result);
    m.outputs[0].metadata.prompt = 'a lighthouse at dusk';
    expect((messages.parse(m) as { outputs: { metadata: Record<string, unknown> }[] }).outputs[0]!.metadata.prompt).toBe('a lighthouse at dusk');
  });

  it('refuses each broken result as zod does, with zod\'s error naming the field', () => {
    for (const [what, json] of brokenResults()) {
      expect(WorkerToAgent.safeParse(json).success, `zod accepted a result with ${what}`).toBe(false);
      expect(verdict(json), `accepted a result with ${what}`).toBe(false);
    }
    const m = clone(result);
    m.outputs[0].sha256 = 'nope';
    expect(() => messages.parse(m)).toThrow(/outputs.*sha256|sha256/);
  });

  it('refuses a broken message of every other type as zod does', () => {
    for (const s of samples) {
      if (s.json.type === 'bye') continue;
      const extra = { ...s.json, unexpected: true };
      const noId = { ...s.json };
      delete noId.id;
      for (const [what, json] of [
        ['an extra field', extra],
        ['no id', noId],
      ] as const) {
        expect(WorkerToAgent.safeParse(json).success, `zod accepted ${s.file} with ${what}`).toBe(false);
        expect(verdict(json), `accepted ${s.file} with ${what}`).toBe(false);
      }
    }
  });
});
