import { describe, expect, it } from 'vitest';
import type { AgentView } from './placement.js';
import { placementReason } from './placement-reason.js';

const model = (name: string, vram_mb: number) => [name, { name, kind: 'base' as const, vram_mb, load_ms: 1000 }] as const;

function agent(resident: string[], vramTotalMb = 10_000, pinned: string[] = []): AgentView {
  return {
    id: 'a',
    free: 2,
    inflight: 0,
    avgJobMs: 0,
    vramTotalMb,
    resident: new Set(resident),
    pinned: new Set(pinned),
    models: new Map([model('base', 7000), model('turbo', 7000), model('vae', 300)]),
  };
}

describe('placementReason', () => {
  it('says resident when the whole suite is in VRAM', () => {
    expect(placementReason(agent(['base']), { model: 'base', adapters: [], activationMb: 500 })).toBe('model_resident');
  });

  it('says load when the suite fits beside what is resident', () => {
    expect(placementReason(agent(['vae']), { model: 'base', adapters: [], activationMb: 500 })).toBe('load_needed');
  });

  it('says eviction when another model must leave, and then counts the next job against the new residency', () => {
    const a = agent(['base']);
    expect(placementReason(a, { model: 'turbo', adapters: [], activationMb: 500 })).toBe('eviction');
    expect([...a.resident]).toEqual(['turbo']);
    expect(placementReason(a, { model: 'turbo', adapters: [], activationMb: 500 })).toBe('model_resident');
    expect(placementReason(a, { model: 'base', adapters: ['vae'], activationMb: 500 })).toBe('eviction');
    expect([...a.resident]).toEqual(['base', 'vae']);
  });

  it('never counts a pinned model as evicted', () => {
    const a = agent(['base'], 14_000, ['base']);
    expect(placementReason(a, { model: 'turbo', adapters: [], activationMb: 500 })).toBe('load_needed');
  });
});
