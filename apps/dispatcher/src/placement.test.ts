import type { ModelInfo } from '@kiln/contracts';
import { describe, expect, it } from 'vitest';
import { type AgentView, type Candidate, type Decision, plan, planInSlices, projectResidency } from './placement.js';
import { referencePlan } from '../test/placement-reference.js';

const SDXL = 'stabilityai/stable-diffusion-xl-base-1.0';
const TURBO = 'stabilityai/sdxl-turbo';
const JUGGERNAUT = 'RunDiffusion/Juggernaut-XL-v9';
const LORA = 'kiln/lora-watercolor';
const CANNY = 'diffusers/controlnet-canny-sdxl-1.0';
const RANK = { high: 1, normal: 5, low: 10 } as const;
const AGING_MS = 60_000;
const LOAD_MS = 3_000;

const catalog: ModelInfo[] = [
  { name: SDXL, kind: 'base', vram_mb: 7_000, load_ms: LOAD_MS },
  { name: TURBO, kind: 'base', vram_mb: 7_000, load_ms: LOAD_MS },
  { name: JUGGERNAUT, kind: 'base', vram_mb: 7_000, load_ms: LOAD_MS },
  { name: LORA, kind: 'lora', vram_mb: 100, load_ms: 50 },
  { name: CANNY, kind: 'controlnet', vram_mb: 2_500, load_ms: 1_000, controlnet_type: 'canny' },
];

const modelsWithout = (...names: string[]) => new Map(catalog.filter((m) => !names.includes(m.name)).map((m) => [m.name, m]));

function agent(id: string, over: Partial<Omit<AgentView, 'resident' | 'pinned'>> & { resident?: string[]; pinned?: string[] } = {}): AgentView {
  return {
    id,
    free: 2,
    inflight: 0,
    avgJobMs: 1_000,
    vramTotalMb: 24_576,
    models: new Map(catalog.map((m) => [m.name, m])),
    ...over,
    resident: new Set(over.resident ?? []),
    pinned: new Set(over.pinned ?? []),
  };
}

function job(jobId: string, over: Partial<Candidate> = {}): Candidate {
  return { jobId, model: SDXL, rank: RANK.normal, waitedMs: 0, client: 'client-a', activationMb: 1_200, ...over };
}

const opts = (running: Record<string, number> = {}) => ({ agingMs: AGING_MS, running: new Map(Object.entries(running)) });

function byJob(decisions: Decision[]): Record<string, Decision> {
  return Object.fromEntries(decisions.map((d) => [d.jobId, d]));
}

function placedIds(decisions: Decision[]): string[] {
  return decisions.filter((d) => d.kind === 'place').map((d) => d.jobId);
}

describe('plan(): where a job goes', () => {
  it('sends a job to the agent that already holds its model, without a load', () => {
    // "a-cold" would win the id tie-break: only affinity can pick "b-warm"
    const decisions = plan([job('j1')], [agent('a-cold'), agent('b-warm', { resident: [SDXL] })], opts());
    expect(decisions).toEqual([{ jobId: 'j1', kind: 'place', agentId: 'b-warm', load: false }]);
  });

  it('gives an idle agent the work when no agent holds the model, and says it must load', () => {
    const decisions = plan(
      [job('j1')],
      [agent('a-busy', { inflight: 1, free: 1, avgJobMs: 5_000 }), agent('b-idle')],
      opts(),
    );
    expect(decisions).toEqual([{ jobId: 'j1', kind: 'place', agentId: 'b-idle', load: true }]);
  });

  it('prefers loading on an idle agent when that is quicker than queueing behind the holder', () => {
    // the holder is full with two 10 s jobs; a 3 s load elsewhere is cheaper right away
    const decisions = plan(
      [job('j1')],
      [agent('holder', { resident: [SDXL], inflight: 2, free: 0, avgJobMs: 10_000 }), agent('idle')],
      opts(),
    );
    expect(decisions).toEqual([{ jobId: 'j1', kind: 'place', agentId: 'idle', load: true }]);
  });

  describe('late binding', () => {
    // holder: full, one 1 s job ahead → cost 1 000 ms; idle agent: 3 000 ms load → 2 000 ms extra
    const agents = () => [agent('holder', { resident: [SDXL], inflight: 1, free: 0, avgJobMs: 1_000 }), agent('idle')];

    it('keeps a fresh job waiting for its full holder when loading elsewhere costs more', () => {
      expect(plan([job('j1', { waitedMs: 500 })], agents(), opts())).toEqual([{ jobId: 'j1', kind: 'wait' }]);
    });

    it('sends the job to the free agent once it has waited longer than the extra cost', () => {
      expect(plan([job('j1', { waitedMs: 2_500 })], agents(), opts())).toEqual([
        { jobId: 'j1', kind: 'place', agentId: 'idle', load: true },
      ]);
    });
  });

  it('respects slots across the jobs of one plan', () => {
    const jobs = [job('j1', { waitedMs: 30 }), job('j2', { waitedMs: 20 }), job('j3', { waitedMs: 10 })];
    const decisions = byJob(plan(jobs, [agent('only', { resident: [SDXL], free: 2 })], opts()));
    expect(decisions.j1).toMatchObject({ kind: 'place', agentId: 'only' });
    expect(decisions.j2).toMatchObject({ kind: 'place', agentId: 'only' });
    expect(decisions.j3).toEqual({ jobId: 'j3', kind: 'wait' });
  });

  it('spreads jobs over agents as slots fill, and counts a model loaded earlier in the plan as resident', () => {
    const jobs = [job('j1', { waitedMs: 30 }), job('j2', { waitedMs: 20 }), job('j3', { waitedMs: 10 })];
    // 10 s jobs: queueing behind one costs more than a 3 s load elsewhere
    const decisions = byJob(plan(jobs, [agent('a', { free: 1, avgJobMs: 10_000 }), agent('b', { free: 2, avgJobMs: 10_000 })], opts()));
    // j1 loads on "a" (id tie-break); "a" is then full, so j2 loads on "b"; j3 joins "b" warm
    expect(decisions.j1).toEqual({ jobId: 'j1', kind: 'place', agentId: 'a', load: true });
    expect(decisions.j2).toEqual({ jobId: 'j2', kind: 'place', agentId: 'b', load: true });
    expect(decisions.j3).toEqual({ jobId: 'j3', kind: 'place', agentId: 'b', load: false });
  });

  it('never places more jobs than the farm has free slots', () => {
    const jobs = Array.from({ length: 20 }, (_, i) => job(`j${i}`, { waitedMs: 10 * (20 - i), model: i % 2 ? SDXL : TURBO }));
    const agents = [agent('a', { free: 2 }), agent('b', { free: 1, resident: [TURBO] }), agent('c', { free: 0, inflight: 2 })];
    const decisions = plan(jobs, agents, opts());
    expect(decisions).toHaveLength(20);
    const perAgent = new Map<string, number>();
    for (const d of decisions) if (d.kind === 'place') perAgent.set(d.agentId, (perAgent.get(d.agentId) ?? 0) + 1);
    expect(Object.fromEntries(perAgent)).toEqual({ a: 2, b: 1 });
  });
});

describe('plan(): which job goes first', () => {
  const oneSlot = () => [agent('only', { resident: [SDXL], free: 1 })];

  it('runs high before normal before low', () => {
    const jobs = [job('low', { rank: RANK.low }), job('normal', { rank: RANK.normal }), job('high', { rank: RANK.high })];
    expect(placedIds(plan(jobs, oneSlot(), opts()))).toEqual(['high']);
    const decisions = plan(jobs, [agent('only', { resident: [SDXL], free: 3 })], opts());
    expect(decisions.map((d) => d.jobId)).toEqual(['high', 'normal', 'low']);
  });

  it('ages a low job that waited long enough ahead of a fresh normal one', () => {
    // low (10) after 6 aging periods ranks 4, ahead of a fresh normal (5)
    const oldLow = job('old-low', { rank: RANK.low, waitedMs: 6 * AGING_MS });
    const freshNormal = job('fresh-normal', { rank: RANK.normal, waitedMs: 0 });
    expect(placedIds(plan([freshNormal, oldLow], oneSlot(), opts()))).toEqual(['old-low']);
  });

  it('keeps a low job behind a normal one until it has aged enough', () => {
    const youngLow = job('young-low', { rank: RANK.low, waitedMs: 4 * AGING_MS });
    const freshNormal = job('fresh-normal', { rank: RANK.normal, waitedMs: 0 });
    expect(placedIds(plan([youngLow, freshNormal], oneSlot(), opts()))).toEqual(['fresh-normal']);
  });

  it('at equal priority and wait, favours the client with fewer jobs running', () => {
    const jobs = [job('busy-client', { client: 'alice' }), job('quiet-client', { client: 'bob' })];
    expect(placedIds(plan(jobs, oneSlot(), opts({ alice: 3 })))).toEqual(['quiet-client']);
    expect(placedIds(plan(jobs, oneSlot(), opts({ bob: 3 })))).toEqual(['busy-client']);
  });

  it('at equal priority and fairness, serves the job that waited longest', () => {
    const jobs = [job('newer', { waitedMs: 100 }), job('older', { waitedMs: 200 })];
    expect(placedIds(plan(jobs, oneSlot(), opts()))).toEqual(['older']);
  });
});

describe('plan(): jobs that cannot run', () => {
  it('says so when no live agent knows the model', () => {
    const decisions = plan([job('j1', { model: 'someone/unknown-model' })], [agent('a'), agent('b')], opts());
    expect(decisions).toEqual([{ jobId: 'j1', kind: 'infeasible', reason: 'no live agent can load model someone/unknown-model' }]);
  });

  it('says so when the model plus activations need more VRAM than any agent has', () => {
    const decisions = plan([job('j1', { activationMb: 20_000 })], [agent('a', { vramTotalMb: 24_576 })], opts());
    expect(decisions).toEqual([{ jobId: 'j1', kind: 'infeasible', reason: `no live agent has enough VRAM for ${SDXL} with this request` }]);
  });

  it('uses the one agent big enough when the others are too small', () => {
    const decisions = plan(
      [job('j1', { activationMb: 20_000 })],
      [agent('small', { vramTotalMb: 24_576, resident: [SDXL] }), agent('big', { vramTotalMb: 81_920 })],
      opts(),
    );
    expect(decisions).toEqual([{ jobId: 'j1', kind: 'place', agentId: 'big', load: true }]);
  });

  it('says so when there is no live agent at all', () => {
    expect(plan([job('j1')], [], opts())).toEqual([{ jobId: 'j1', kind: 'infeasible', reason: 'no live agent' }]);
  });

  it('does not let an infeasible job take a slot from a feasible one', () => {
    const decisions = byJob(
      plan([job('bad', { rank: RANK.high, model: 'nope/nope' }), job('good')], [agent('only', { free: 1 })], opts()),
    );
    expect(decisions.bad).toMatchObject({ kind: 'infeasible' });
    expect(decisions.good).toMatchObject({ kind: 'place', agentId: 'only' });
  });
});

describe('plan(): the whole suite of a request (adapters)', () => {
  it('places a job only on an agent that has every model of its suite', () => {
    const decisions = plan([job('j1', { adapters: [LORA, CANNY] })], [agent('a-no-canny', { models: modelsWithout(CANNY) }), agent('b')], opts());
    expect(decisions).toEqual([{ jobId: 'j1', kind: 'place', agentId: 'b', load: true }]);
  });

  it('says which model no live agent has, and when the suite is only split across agents', () => {
    expect(plan([job('j1', { adapters: ['someone/unknown-lora'] })], [agent('a')], opts())).toEqual([
      { jobId: 'j1', kind: 'infeasible', reason: 'no live agent can load model someone/unknown-lora' },
    ]);
    const split = plan([job('j1', { adapters: [CANNY] })], [agent('a', { models: modelsWithout(CANNY) }), agent('b', { models: modelsWithout(SDXL) })], opts());
    expect(split).toEqual([{ jobId: 'j1', kind: 'infeasible', reason: `no live agent has every model of this request (${SDXL}, ${CANNY})` }]);
  });

  it('counts the adapters in the VRAM a job needs', () => {
    // 7 000 base + 1 200 activations fit in 10 000 MB; with a 2 500 MB ControlNet they do not
    const small = { vramTotalMb: 10_000 };
    expect(plan([job('j1')], [agent('small', small)], opts())).toEqual([{ jobId: 'j1', kind: 'place', agentId: 'small', load: true }]);
    expect(plan([job('j1', { adapters: [CANNY] })], [agent('small', small)], opts())).toEqual([
      { jobId: 'j1', kind: 'infeasible', reason: `no live agent has enough VRAM for ${SDXL} with this request` },
    ]);
    expect(plan([job('j1', { adapters: [CANNY] })], [agent('a-small', small), agent('b-big')], opts())).toEqual([
      { jobId: 'j1', kind: 'place', agentId: 'b-big', load: true },
    ]);
  });

  it('counts a missing adapter as a load, even when the base model is resident', () => {
    expect(plan([job('j1', { adapters: [LORA] })], [agent('only', { resident: [SDXL] })], opts())).toEqual([
      { jobId: 'j1', kind: 'place', agentId: 'only', load: true },
    ]);
  });

  it("counts the adapters' load time in the cost: the agent holding the whole suite wins", () => {
    // both hold the base model; "a-base-only" would win the id tie-break if the ControlNet's load were free
    const decisions = plan([job('j1', { adapters: [CANNY] })], [agent('a-base-only', { resident: [SDXL] }), agent('b-suite', { resident: [SDXL, CANNY] })], opts());
    expect(decisions).toEqual([{ jobId: 'j1', kind: 'place', agentId: 'b-suite', load: false }]);
  });

  it('keeps the adapters resident for later jobs of the same plan', () => {
    const jobs = [job('j1', { adapters: [LORA], waitedMs: 20 }), job('j2', { adapters: [LORA], waitedMs: 10 })];
    const decisions = byJob(plan(jobs, [agent('only', { free: 2 })], opts()));
    expect(decisions.j1).toEqual({ jobId: 'j1', kind: 'place', agentId: 'only', load: true });
    expect(decisions.j2).toEqual({ jobId: 'j2', kind: 'place', agentId: 'only', load: false });
  });
});

describe('plan(): pinned models', () => {
  // 16 000 MB holds two 7 000 MB models; a third (with 1 200 MB of activations) must evict one
  const tight = (pinned: string[]) => agent('only', { vramTotalMb: 16_000, resident: [TURBO, JUGGERNAUT], pinned, free: 2 });
  // the SDXL job goes first (it waited longer); then a TURBO job on the same agent
  const jobs = () => [job('sdxl', { waitedMs: 10_000 }), job('turbo', { model: TURBO })];

  it('never evicts a pinned model: a later job for it finds it resident', () => {
    const decisions = plan(jobs(), [tight([TURBO])], opts());
    expect(decisions).toEqual([
      { jobId: 'sdxl', kind: 'place', agentId: 'only', load: true },
      { jobId: 'turbo', kind: 'place', agentId: 'only', load: false },
    ]);
  });

  it('evicts the least recently used model when nothing is pinned', () => {
    // the contrast to the test above: TURBO, least recently used, makes room for SDXL
    const decisions = plan(jobs(), [tight([])], opts());
    expect(decisions).toEqual([
      { jobId: 'sdxl', kind: 'place', agentId: 'only', load: true },
      { jobId: 'turbo', kind: 'place', agentId: 'only', load: true },
    ]);
  });

  it("counts pinned models' VRAM against what a job can have", () => {
    // 7 000 pinned + 7 000 + 2 500 activations = 16 500 MB > 16 000 MB; without the pin it fits
    const big = job('j1', { activationMb: 2_500 });
    expect(plan([big], [agent('only', { vramTotalMb: 16_000, resident: [TURBO], pinned: [TURBO] })], opts())).toEqual([
      { jobId: 'j1', kind: 'infeasible', reason: `no live agent has enough VRAM for ${SDXL} with this request` },
    ]);
    expect(plan([big], [agent('only', { vramTotalMb: 16_000, resident: [TURBO] })], opts())).toEqual([
      { jobId: 'j1', kind: 'place', agentId: 'only', load: true },
    ]);
    // "a-pinned" would win the id tie-break
    expect(plan([big], [agent('a-pinned', { vramTotalMb: 16_000, resident: [TURBO], pinned: [TURBO] }), agent('b', { vramTotalMb: 16_000 })], opts())).toEqual([
      { jobId: 'j1', kind: 'place', agentId: 'b', load: true },
    ]);
  });

  it('does not count a pinned model twice when the job itself uses it', () => {
    // 7 000 (pinned, and the job's own base) + 8 000 activations = 15 000 MB ≤ 16 000 MB
    const decisions = plan([job('j1', { activationMb: 8_000 })], [agent('only', { vramTotalMb: 16_000, resident: [SDXL], pinned: [SDXL] })], opts());
    expect(decisions).toEqual([{ jobId: 'j1', kind: 'place', agentId: 'only', load: false }]);
  });
});

describe('plan(): the cost of evicting what other jobs need', () => {
  // 10 000 MB holds one base model: loading TURBO evicts SDXL; one slot
  const oneModel = () => [agent('only', { vramTotalMb: 10_000, resident: [SDXL], free: 1 })];

  it('a job whose model is resident beats one that would evict it, though the latter waited longer than its own load', () => {
    // turbo's cost: 3 000 load + 3 000 to reload SDXL for the waiting job = 6 000; it waited 4 000
    const jobs = [job('turbo', { model: TURBO, waitedMs: 4_000 }), job('sdxl', { waitedMs: 0 })];
    expect(placedIds(plan(jobs, oneModel(), opts()))).toEqual(['sdxl']);
  });

  it('the same job goes first when no waiting job needs what it evicts', () => {
    // the contrast: without the SDXL job, evicting SDXL costs nothing extra, so turbo (cost 3 000) is placed…
    expect(plan([job('turbo', { model: TURBO, waitedMs: 4_000 })], oneModel(), opts())).toEqual([
      { jobId: 'turbo', kind: 'place', agentId: 'only', load: true },
    ]);
    // …and it beats a job for a model not resident either, which evicts SDXL just the same
    const jobs = [job('turbo', { model: TURBO, waitedMs: 4_000 }), job('juggernaut', { model: JUGGERNAUT, waitedMs: 0 })];
    expect(placedIds(plan(jobs, oneModel(), opts()))).toEqual(['turbo']);
  });

  it('the evicting job goes first once it has waited longer than the cost it causes', () => {
    const jobs = [job('turbo', { model: TURBO, waitedMs: 7_000 }), job('sdxl', { waitedMs: 0 })];
    expect(placedIds(plan(jobs, oneModel(), opts()))).toEqual(['turbo']);
  });

  it('counts the reload of an adapter another waiting job needs', () => {
    // 10 000 MB: SDXL + CANNY (9 500 MB) resident; a TURBO job must evict both
    const agents = [agent('only', { vramTotalMb: 10_000, resident: [CANNY, SDXL], free: 1 })];
    // turbo: 3 000 load + 3 000 (SDXL) + 1 000 (CANNY) = 7 000 for the waiting canny job; waited 6 500
    const jobs = [job('turbo', { model: TURBO, waitedMs: 6_500 }), job('canny', { adapters: [CANNY], activationMb: 400 })];
    expect(placedIds(plan(jobs, agents, opts()))).toEqual(['canny']);
    // without a job needing CANNY (only SDXL): 3 000 + 3 000 = 6 000 < 6 500 waited
    const plain = [job('turbo', { model: TURBO, waitedMs: 6_500 }), job('sdxl', { activationMb: 400 })];
    expect(placedIds(plan(plain, agents, opts()))).toEqual(['turbo']);
  });
});

describe('plan(): warm models in host RAM', () => {
  it('prefers the agent that keeps the model warm over one that must load it from disk', () => {
    // both must bring the model into VRAM; "b-warm" has it in RAM, which costs 15% of a cold load
    const agents = [agent('a-cold', { inflight: 0 }), { ...agent('b-warm', { inflight: 1, free: 1, avgJobMs: 1_000 }), warm: new Set([SDXL]) }];
    expect(plan([job('j1')], agents, opts())).toEqual([{ jobId: 'j1', kind: 'place', agentId: 'b-warm', load: true }]);
  });

  it('without the warm copy the idle agent wins', () => {
    const agents = [agent('a-cold', { inflight: 0 }), agent('b-busy', { inflight: 1, free: 1, avgJobMs: 1_000 })];
    expect(plan([job('j1')], agents, opts())).toEqual([{ jobId: 'j1', kind: 'place', agentId: 'a-cold', load: true }]);
  });
});

describe('projectResidency: what VRAM will hold once queued jobs ran', () => {
  const a = { resident: new Set([SDXL]), pinned: new Set<string>(), models: new Map(catalog.map((m) => [m.name, m])), vramTotalMb: 10_240 };

  it('a queued job for another model evicts the resident one when both do not fit', () => {
    expect([...projectResidency(a, [{ models: [TURBO], activationMb: 1_200 }])]).toEqual([TURBO]);
  });

  it('keeps both when they fit, the newest last', () => {
    expect([...projectResidency({ ...a, vramTotalMb: 24_576 }, [{ models: [TURBO], activationMb: 1_200 }])]).toEqual([SDXL, TURBO]);
  });

  it('never projects a pinned model out', () => {
    expect([...projectResidency({ ...a, pinned: new Set([SDXL]) }, [{ models: [TURBO], activationMb: 1_200 }])]).toContain(SDXL);
  });

  it('and then placement no longer calls the evicted model resident', () => {
    const held = { ...agent('holder', { inflight: 1, free: 1 }), resident: projectResidency(a, [{ models: [TURBO], activationMb: 1_200 }]) };
    expect(plan([job('j1', { model: SDXL })], [held], opts())).toEqual([{ jobId: 'j1', kind: 'place', agentId: 'holder', load: true }]);
  });
});

describe('plan(): between equals, an agent with room beats one that must evict', () => {
  it('loads onto the empty agent rather than evicting a model nobody is waiting for', () => {
    // "a-full" wins the id tie-break, but would have to push SDXL out of its 10 GB
    const agents = [agent('a-full', { vramTotalMb: 10_240, resident: [SDXL] }), agent('b-empty', { vramTotalMb: 10_240 })];
    expect(plan([job('j1', { model: TURBO })], agents, opts())).toEqual([{ jobId: 'j1', kind: 'place', agentId: 'b-empty', load: true }]);
  });
});

describe('plan(): indexed, and the same decisions as the plain scan it replaced', () => {
  // a small deterministic PRNG, so a failure names a seed that reproduces it
  const rng = (seed: number) => () => ((seed = (seed * 1103515245 + 12345) & 0x7fffffff) / 0x7fffffff);

  function randomCase(seed: number): { jobs: Candidate[]; agents: AgentView[]; o: ReturnType<typeof opts> & { policy?: 'fifo' | 'affinity'; warmLoadFactor?: number } } {
    const r = rng(seed);
    const pick = <T>(xs: readonly T[]) => xs[Math.floor(r() * xs.length)]!;
    const bases = [SDXL, TURBO, JUGGERNAUT];
    const agents = Array.from({ length: 1 + Math.floor(r() * 6) }, (_, i) => {
      const resident = bases.filter(() => r() < 0.3);
      return agent(`agent-${i}`, {
        free: Math.floor(r() * 3),
        inflight: Math.floor(r() * 3),
        avgJobMs: 200 + Math.floor(r() * 3000),
        vramTotalMb: pick([10_240, 16_384, 24_576]),
        resident: r() < 0.2 ? [...resident, LORA] : resident,
        pinned: r() < 0.15 ? resident.slice(0, 1) : [],
        ...(r() < 0.3 ? { warm: new Set(bases.filter(() => r() < 0.5)) } : {}),
        ...(r() < 0.1 ? { models: modelsWithout(pick(bases)) } : {}),
      });
    });
    const jobs = Array.from({ length: Math.floor(r() * 30) }, (_, i) =>
      job(`j${i}`, {
        model: r() < 0.05 ? 'someone/unknown' : pick(bases),
        ...(r() < 0.2 ? { adapters: r() < 0.5 ? [LORA] : [CANNY] } : {}),
        rank: pick([RANK.high, RANK.normal, RANK.low]),
        waitedMs: Math.floor(r() * 10_000),
        client: pick(['alice', 'bob', 'carol']),
        activationMb: pick([1_200, 4_000]),
      }),
    );
    const o = { ...opts({ alice: Math.floor(r() * 3), bob: Math.floor(r() * 2) }), ...(r() < 0.2 ? { policy: 'fifo' as const } : {}), warmLoadFactor: pick([0.15, 0.5]) };
    return { jobs, agents, o };
  }

  it('on 2,000 random farms and backlogs', () => {
    for (let seed = 1; seed <= 2_000; seed++) {
      const { jobs, agents, o } = randomCase(seed);
      const sort = (d: Decision[]) => [...d.filter((x) => x.kind === 'place'), ...d.filter((x) => x.kind !== 'place').sort((x, y) => x.jobId.localeCompare(y.jobId))];
      expect(sort(plan(jobs, agents, o)), `seed ${seed}`).toEqual(sort(referencePlan(jobs, agents, o)));
    }
  });
});

describe('plan(): an agent costs the remaining time of what it holds', () => {
  it('does not put a job behind a long training run when an idle agent would finish it sooner, load included', () => {
    // the holder runs a 78 s training; its average job is 2 s, so inflight × average says 2 s
    const holder = agent('a-holder', { resident: [SDXL], inflight: 1, free: 1, avgJobMs: 2_000, busyMs: 78_000 });
    expect(plan([job('j1')], [holder, agent('b-idle')], opts())).toEqual([{ jobId: 'j1', kind: 'place', agentId: 'b-idle', load: true }]);
    // without the remaining time it went behind the training
    const { busyMs: _, ...averaged } = holder;
    expect(plan([job('j1')], [averaged, agent('b-idle')], opts())).toEqual([{ jobId: 'j1', kind: 'place', agentId: 'a-holder', load: false }]);
  });

  it('counts what it places: each job adds its expected run time on that agent', () => {
    // 1 s of work left on the holder; each job runs 2.5 s there; loading elsewhere costs 3 s
    const runMs = (c: Candidate) => (c.work?.steps ?? 0) * 100;
    const holder = agent('a-holder', { resident: [SDXL], inflight: 0, free: 2, busyMs: 1_000, runMs });
    const other = agent('b-idle', { busyMs: 0, runMs });
    const work = { key: `generation ${SDXL}`, steps: 25, pixels: 1024 * 1024 };
    const decisions = plan([job('j1', { work }), job('j2', { work })], [holder, other], opts());
    // j1: holder 1 s < 3 s load; j2: holder 3.5 s > b-idle 3 s
    expect(decisions).toEqual([
      { jobId: 'j1', kind: 'place', agentId: 'a-holder', load: false },
      { jobId: 'j2', kind: 'place', agentId: 'b-idle', load: true },
    ]);
  });
});

describe('plan(): a backlog keeps models where they are (spillover)', () => {
  // 10 000 MB holds one base model. The holder of SDXL is full (2 s of work); the other agent
  // holds TURBO, has one free slot, and loading SDXL there costs 1 s (its job) + 3 s load + 3 s
  // to reload TURBO for the TURBO jobs waiting = 7 s: 5 s more than waiting for the holder, and a
  // second copy of SDXL takes 6 s of that agent (slot), which also owes 3 s to the TURBO queue
  const farm = () => [
    agent('a-holder', { vramTotalMb: 10_000, resident: [SDXL], inflight: 2, free: 0 }),
    agent('b-turbo', { vramTotalMb: 10_000, resident: [TURBO], inflight: 1, free: 1 }),
  ];
  const sdxl = (n: number, waitedMs = 10_000) => Array.from({ length: n }, (_, i) => job(`sdxl-${i}`, { waitedMs }));
  const turbo = () => Array.from({ length: 3 }, (_, i) => job(`turbo-${i}`, { model: TURBO }));

  it("does not spread a backlog of one model over an agent that holds another model's queued work", () => {
    // 10 s of SDXL work on one holder < 5 + 6 + 3 s: the SDXL jobs wait for their holder, though
    // each has waited longer than the 5 s extra (which used to send them over, evicting TURBO)
    const decisions = plan([...sdxl(10), ...turbo()], farm(), opts());
    expect(decisions.filter((d) => d.kind === 'place')).toEqual([{ jobId: 'turbo-0', kind: 'place', agentId: 'b-turbo', load: false }]);
    expect(byJob(decisions)['sdxl-0']).toEqual({ jobId: 'sdxl-0', kind: 'wait' });
  });

  it('gives a hot model a second holder when its queue per holder outweighs what that costs', () => {
    // 30 s of SDXL work on one holder ≥ 14 s: one SDXL job loads on the other agent (and beats
    // the TURBO job there, having waited longer than the 6 s it costs more)
    const decisions = plan([...sdxl(30), ...turbo()], farm(), opts());
    expect(decisions.filter((d) => d.kind === 'place')).toEqual([{ jobId: 'sdxl-0', kind: 'place', agentId: 'b-turbo', load: true }]);
  });

  it('still moves a job that has waited long enough (aging: a full aging step past the cost, when it evicts)', () => {
    // the same short backlog, but one job has waited 5 s + 60 s and more: it goes to the other agent
    const jobs = [...sdxl(9), job('sdxl-old', { waitedMs: 66_000 }), ...turbo()];
    expect(plan(jobs, farm(), opts()).filter((d) => d.kind === 'place')).toEqual([{ jobId: 'sdxl-old', kind: 'place', agentId: 'b-turbo', load: true }]);
    // a little less and it still waits
    const younger = [...sdxl(9), job('sdxl-old', { waitedMs: 64_000 }), ...turbo()];
    expect(placedIds(plan(younger, farm(), opts()))).toEqual(['turbo-0']);
  });

  it('does not load a second copy on an idle agent for a short queue: the job takes the holder\'s free slot', () => {
    // the holder has 4 s of work; an idle agent would start the job after a 3 s load, 1 s sooner,
    // but a second copy of SDXL (3 s of GPU, and VRAM) for 1 s of queue is not worth it
    const agents = () => [agent('a-holder', { resident: [SDXL], inflight: 1, free: 1, busyMs: 4_000 }), agent('b-idle', { busyMs: 0 })];
    expect(plan([job('j1')], agents(), opts())).toEqual([{ jobId: 'j1', kind: 'place', agentId: 'a-holder', load: false }]);
    // with 5 s of SDXL waiting (5 jobs), one more holder is worth it: the idle agent loads SDXL
    // and takes two; the rest wait for it (2 s) rather than go behind the holder's 4 s
    const five = Array.from({ length: 5 }, (_, i) => job(`j${i}`, { waitedMs: 10 - i }));
    expect(plan(five, agents(), opts()).filter((d) => d.kind === 'place')).toEqual([
      { jobId: 'j0', kind: 'place', agentId: 'b-idle', load: true },
      { jobId: 'j1', kind: 'place', agentId: 'b-idle', load: false },
    ]);
  });
});

describe('planInSlices(): the same plan, giving the event loop back', () => {
  it('decides exactly as plan() while other work runs between its slices (a fleet coming up to a backlog)', async () => {
    const bases = [SDXL, TURBO, JUGGERNAUT];
    const agents = Array.from({ length: 300 }, (_, i) => agent(`agent-${String(i).padStart(3, '0')}`, { resident: [bases[i % 3]!], avgJobMs: 1_000 + (i % 7) * 100 }));
    const jobs = Array.from({ length: 2_000 }, (_, i) => job(`j${i}`, { model: bases[i % 3]!, client: `c${i % 5}`, waitedMs: i % 1000 }));
    const expected = plan(jobs, agents, opts());
    // a slice of 0 ms gives the loop back at every pause point: other work interleaves
    let turns = 0;
    let done = false;
    const spin = () => {
      turns += 1;
      if (!done) setImmediate(spin);
    };
    setImmediate(spin);
    const { decisions, longestSliceMs } = await planInSlices(jobs, agents, opts(), 0);
    done = true;
    expect(decisions).toEqual(expected);
    expect(decisions.filter((d) => d.kind === 'place')).toHaveLength(600);
    expect(turns).toBeGreaterThan(600);
    expect(longestSliceMs).toBeGreaterThan(0);
  });
});

