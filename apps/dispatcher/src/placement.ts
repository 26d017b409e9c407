import type { ModelInfo } from '@kiln/contracts';

/**
 * Placement, as a pure function of what the dispatcher sees, so it can be tested and
 * benchmarked without Redis.
 *
 * The cost of running a job on an agent is what the GPU would spend before starting it:
 * the agent's expected wait (the remaining time of what it holds: the rest of the running job
 * and the next, known steps × measured step time), plus the cold load of the
 * job's model when the agent does not hold it, plus — when that load would evict models
 * other waiting jobs need — those models' reload cost.
 *
 * Placement fills free slots one at a time, always with the (job, agent) pair of lowest score
 *   score = cost + rank × AGING_MS − waited + running(client) × FAIRNESS_MS
 * so priority dominates, waiting time ages a job up, a job whose model is resident beats one
 * that would evict it (until the latter has waited about the cost it would cause), and a client
 * with many jobs running yields to others. Late binding: an agent holds at most its slots (the
 * running job plus the next); everything else stays in intake.
 *
 * Spillover. A job whose cheapest agent is full waits for it, and a job whose model some agent
 * already holds does not load it on another one, unless that is worth it for the model's queue:
 *   backlog(model) / holders(model)  ≥  extra + slot + other
 * where backlog is the expected run time of the waiting jobs that need the model (known steps ×
 * measured step time: `runMs` of the job's first feasible agent), holders the agents holding it
 * (as this plan's placements leave them), extra the job's cost on the target less its cost on
 * the agent it would otherwise wait for, slot the target's load and eviction cost when it would
 * become one more holder (the GPU time and VRAM a second copy takes), and other what the target
 * would otherwise do: its share of the backlog of the models it holds. So a backlog of one model
 * does not spread over agents that have other models' work queued, and a hot model gets one more
 * holder when its queue per holder is longer than what that holder costs. When it is not worth
 * it the job takes a free slot on the cheapest agent holding its suite, if that has one; if not,
 * only aging moves it: once it has waited longer than extra (+ slot when the target is its
 * cheapest agent) + min(other, agingMs) — or + agingMs when the load would push a model out of
 * VRAM — it goes anyway, so no job starves and none is stuck behind a slow agent while another
 * idles. On the skewed trace (bench/trace.bench.ts) this took model loads from 20 to 9 (6 is the
 * minimum) and the makespan from 1.32× to 1.07× its lower bound.
 */

export interface AgentView {
  id: string;
  /** slots left: AGENT_SLOTS minus jobs queued or running on it */
  free: number;
  inflight: number;
  /** typical run time of one job on this agent */
  avgJobMs: number;
  /**
   * Time until the agent has run what it holds: the rest of its current job and the next, each
   * as known steps × its measured step time. When absent, `inflight × avgJobMs`.
   */
  busyMs?: number;
  /** expected run time of `c` here, added to `busyMs` once `c` is placed here (default avgJobMs) */
  runMs?: (c: Candidate) => number;
  vramTotalMb: number;
  /** models in VRAM, least recently used first */
  resident: Set<string>;
  /** models a cache request pinned: never evicted */
  pinned?: Set<string>;
  /** models kept warm in host RAM: bringing one into VRAM costs a fraction of a cold load */
  warm?: Set<string>;
  models: Map<string, ModelInfo>;
}

export interface Candidate {
  jobId: string;
  /** the base model */
  model: string;
  /** the rest of the suite: refiner, VAE, LoRAs, ControlNets, upscaler */
  adapters?: string[];
  /** BullMQ-style priority rank: lower runs first */
  rank: number;
  waitedMs: number;
  client: string;
  activationMb: number;
  /** how much work the job is: its steps and pixels (for `AgentView.runMs`) */
  work?: { key: string; steps: number; pixels: number };
}

export interface PlacementOptions {
  agingMs: number;
  /** how many jobs each client already has running, for fairness */
  running: Map<string, number>;
  /**
   * `affinity` (default) as described above; `fifo` is plain competing consumers — any agent
   * with a free slot, ignoring what is resident — kept as the benchmark's baseline.
   */
  policy?: 'affinity' | 'fifo';
  /** a warm (host RAM) model loads in this fraction of its cold load time; default 0.15 */
  warmLoadFactor?: number;
}

export type Decision =
  | { jobId: string; kind: 'place'; agentId: string; load: boolean }
  | { jobId: string; kind: 'wait' }
  | { jobId: string; kind: 'infeasible'; reason: string };

/** `ord`: the agent's place in id order (localeCompare), so heaps break ties without comparing strings */
type AgentState = AgentView & { version: number; ord: number };

/**
 * The work is grouped by what decides an agent's cost — the suite, its working memory — and by
 * client (fairness): every job of a group costs the same on a given agent. Each group keeps its
 * agents in two heaps by cost (all of them, and those with a free slot) and its jobs sorted by
 * urgency, so one placement looks at each group's heads: its cost grows with the number of
 * groups (models × clients), not with the number of jobs waiting, and only logarithmically with
 * the number of agents. After a placement only that agent's costs change (it is re-pushed in
 * every group; stale heap entries are skipped by version), except when the last waiting job of
 * a model is placed — evicting that model no longer costs its reload — when the agents holding
 * it are re-pushed too (at most once per model per plan).
 */
export function plan(candidates: Candidate[], agents: AgentView[], opts: PlacementOptions): Decision[] {
  const steps = planSteps(candidates, agents, opts);
  for (;;) {
    const r = steps.next();
    if (r.done) return r.value;
  }
}

/**
 * `plan`, giving the event loop back whenever it has run for `sliceMs`: a fleet coming up to a
 * large backlog costs the dispatcher tens of milliseconds of planning, which must not hold up
 * its lease renewals, heartbeats of its own Redis clients, or webhook deliveries. Returns the
 * longest slice it ran.
 */
export async function planInSlices(candidates: Candidate[], agents: AgentView[], opts: PlacementOptions, sliceMs = 10): Promise<{ decisions: Decision[]; longestSliceMs: number }> {
  const steps = planSteps(candidates, agents, opts);
  let start = performance.now();
  let longest = 0;
  for (;;) {
    const r = steps.next();
    const ran = performance.now() - start;
    if (r.done) return { decisions: r.value, longestSliceMs: Math.max(longest, ran) };
    if (ran >= sliceMs) {
      longest = Math.max(longest, ran);
      await new Promise<void>((resolve) => setImmediate(resolve));
      start = performance.now();
    }
  }
}

/** The planner as a generator: it yields at points where it may be paused (see planInSlices). */
function* planSteps(candidates: Candidate[], agents: AgentView[], opts: PlacementOptions): Generator<void, Decision[], void> {
  const fifo = opts.policy === 'fifo';
  const fairnessMs = opts.agingMs / 10;
  const warmFactor = opts.warmLoadFactor ?? 0.15;
  const state: AgentState[] = agents.map((a) => ({ ...a, resident: new Set(a.resident), version: 0, ord: 0 }));
  for (const [i, a] of [...state].sort((x, y) => x.id.localeCompare(y.id)).entries()) a.ord = i;
  const running = new Map(opts.running);
  const infeasible: Decision[] = [];
  const placed: Decision[] = [];

  // ---- groups of interchangeable jobs, and where each group can run at all ----
  interface Job {
    c: Candidate;
    index: number;
    /** lower runs first: priority rank, aged by waiting */
    urgency: number;
    done: boolean;
    /** its expected run time (see `estimate`), counted in its models' backlog */
    est: number;
  }
  interface Group {
    suite: string[];
    activationMb: number;
    client: string;
    feasible: AgentState[];
    feasibleSet: Set<AgentState>;
    /** by urgency, then input order */
    jobs: Job[];
    /** by waited, longest first (for a job that may go to a free agent its head may not) */
    byWait: Job[];
    head: number;
    all: Heap;
    free: Heap;
    /** the agents that hold the whole suite, by cost (built when first asked for) */
    held: Heap | null;
  }
  const groups = new Map<string, Group>();
  /** every feasible job, in input order (what is left of it waits) */
  const inOrder: Job[] = [];
  /** per model: the expected run time of the waiting jobs that need it */
  const backlog = new Map<string, number>();
  /** per model: how many agents hold it (as projected by this plan's placements) */
  const holders = new Map<string, number>();
  for (const a of state) for (const name of a.resident) holders.set(name, (holders.get(name) ?? 0) + 1);
  const feasibleBySuite = new Map<string, AgentState[]>();
  for (const [index, c] of candidates.entries()) {
    if ((index & 255) === 255) yield;
    const members = suite(c);
    const suiteKey = `${members.join('\0')}\0${c.activationMb}`;
    let feasible = feasibleBySuite.get(suiteKey);
    if (!feasible) {
      feasible = state.filter((a) => fits(a, c));
      feasibleBySuite.set(suiteKey, feasible);
    }
    if (feasible.length === 0) {
      infeasible.push({ jobId: c.jobId, kind: 'infeasible', reason: infeasibleReason(c, state) });
      continue;
    }
    const key = `${suiteKey}\0${c.client}`;
    let g = groups.get(key);
    if (!g) {
      g = { suite: members, activationMb: c.activationMb, client: c.client, feasible, feasibleSet: new Set(feasible), jobs: [], byWait: [], head: 0, all: new Heap(), free: new Heap(), held: null };
      groups.set(key, g);
    }
    const j = { c, index, urgency: c.rank * opts.agingMs - c.waitedMs, done: false, est: estimate(c, feasible) };
    for (const name of members) backlog.set(name, (backlog.get(name) ?? 0) + j.est);
    g.jobs.push(j);
    inOrder.push(j);
    g.byWait.push(j);
  }
  for (const g of groups.values()) {
    g.jobs.sort((x, y) => x.urgency - y.urgency || x.index - y.index);
    g.byWait.sort((x, y) => y.c.waitedMs - x.c.waitedMs || x.index - y.index);
  }

  const demand = new Map<string, number>();
  for (const g of groups.values()) for (const name of g.suite) demand.set(name, (demand.get(name) ?? 0) + g.jobs.length);

  /** Models a load of the suite would push out of `a`'s VRAM, least recently used first. */
  const evictions = (a: AgentState, members: string[], activationMb: number): string[] => {
    const missing = members.filter((name) => !a.resident.has(name));
    if (missing.length === 0) return [];
    const need = missing.reduce((s, name) => s + a.models.get(name)!.vram_mb, 0) + activationMb;
    let used = [...a.resident].reduce((s, name) => s + (a.models.get(name)?.vram_mb ?? 0), 0);
    const out: string[] = [];
    for (const name of a.resident) {
      if (used + need <= a.vramTotalMb) break;
      if (members.includes(name) || a.pinned?.has(name)) continue;
      used -= a.models.get(name)?.vram_mb ?? 0;
      out.push(name);
    }
    return out;
  };
  const cost = (a: AgentState, g: Group): number => {
    if (fifo) return a.inflight;
    const loads = g.suite
      .filter((name) => !a.resident.has(name))
      .reduce((s, name) => s + a.models.get(name)!.load_ms * (a.warm?.has(name) ? warmFactor : 1), 0);
    const wait = waitOf(a);
    if (loads === 0) return wait;
    // evicting a model waiting jobs need costs its reload; any other eviction a tenth of it,
    // since traffic for it may come back (so between equals, an agent with room wins)
    const evictPenalty = evictions(a, g.suite, g.activationMb).reduce((s, name) => s + (a.models.get(name)?.load_ms ?? 0) * ((demand.get(name) ?? 0) > 0 ? 1 : 0.1), 0);
    return wait + loads + evictPenalty;
  };
  const push = (g: Group, a: AgentState) => {
    const e: Entry = { a, cost: cost(a, g), inflight: a.inflight, version: a.version };
    g.all.push(e);
    if (a.free > 0) g.free.push(e);
    if (g.held && holdsAll(a, g.suite)) g.held.push(e);
  };
  let pushed = 0;
  for (const g of groups.values()) {
    for (const a of g.feasible) {
      push(g, a);
      if ((++pushed & 255) === 0) yield;
    }
  }
  /** `a` changed: its old entries go stale, and it is pushed again wherever it may run. */
  const repush = (a: AgentState) => {
    a.version += 1;
    for (const g of groups.values()) if (g.feasibleSet.has(a)) push(g, a);
  };
  const valid = (e: Entry) => e.version === e.a.version;
  /** `g`'s heap of the agents that hold its whole suite (their cost is their wait: no load), built on first use. */
  const buildHeld = (g: Group): Heap => {
    g.held = new Heap();
    for (const a of g.feasible) if (holdsAll(a, g.suite)) g.held.push({ a, cost: waitOf(a), inflight: a.inflight, version: a.version });
    return g.held;
  };
  /** The waiting work of `name` each of its holders has to run (all of it when nobody holds it). */
  const perHolder = (name: string) => (backlog.get(name) ?? 0) / Math.max(1, holders.get(name) ?? 0);
  /** What `a` would otherwise do: its share of the waiting work for the models it holds, other than `members`. */
  const share = (a: AgentState, members: string[]) => {
    let s = 0;
    for (const name of a.resident) if (!members.includes(name)) s += perHolder(name);
    return s;
  };

  for (;;) {
    yield;
    let best: { g: Group; j: Job; a: AgentState; score: number } | null = null;
    for (const g of groups.values()) {
      while (g.head < g.jobs.length && g.jobs[g.head]!.done) g.head += 1;
      if (g.head >= g.jobs.length) continue;
      const cheapest = g.all.top(valid)!;
      const freeBest = g.free.top((e) => valid(e) && e.a.free > 0);
      if (!freeBest) continue;
      let j = g.jobs[g.head]!;
      let target = cheapest.a.free > 0 ? cheapest : freeBest;
      const fairness = (running.get(g.client) ?? 0) * fairnessMs;
      // the head is the group's most urgent job: if even it cannot beat the best so far, skip
      if (best && target.cost + j.urgency + fairness > best.score) continue;
      if (!fifo) {
        // sending the job past its full cheapest agent, or making `target` one more holder of a
        // model some agent already holds, must be worth it (see Spillover at the top)
        const lacking = firstMissing(target.a, g.suite);
        if (lacking !== undefined && !g.held) {
          buildHeld(g);
          yield; // a pass over the group's agents: on a large fleet, many groups build theirs at once
        }
        const holder = lacking === undefined ? null : g.held!.top(valid);
        if (target !== cheapest || holder) {
          const extra = target.cost - (target === cheapest ? holder!.cost : cheapest.cost);
          const slot = holder ? target.cost - waitOf(target.a) : 0;
          const other = share(target.a, g.suite);
          if (perHolder(lacking ?? g.suite[0]!) < extra + slot + other) {
            // not worth it: the job goes to the holder if it has a free slot; otherwise it waits
            // unless it has waited long enough (aging)
            if (holder && holder.a.free > 0) {
              target = holder;
              const score = target.cost + j.urgency + fairness;
              if (!best || score < best.score || (score === best.score && j.index < best.j.index)) best = { g, j, a: target.a, score };
              continue;
            }
            const base = extra + (target === cheapest ? slot : 0);
            const longest = g.byWait.find((x) => !x.done);
            let bar = base + Math.min(other, opts.agingMs);
            if (!longest || longest.c.waitedMs < bar) continue;
            if (holder && evictions(target.a, g.suite, g.activationMb).length > 0) {
              bar = base + opts.agingMs;
              if (longest.c.waitedMs < bar) continue;
            }
            if (j.c.waitedMs < bar) j = g.jobs.find((x) => !x.done && x.c.waitedMs >= bar)!;
          }
        }
      }
      const score = target.cost + j.urgency + fairness;
      if (!best || score < best.score || (score === best.score && j.index < best.j.index)) best = { g, j, a: target.a, score };
    }
    if (!best) break;

    const { g, j, a } = best;
    const load = g.suite.some((name) => !a.resident.has(name));
    placed.push({ jobId: j.c.jobId, kind: 'place', agentId: a.id, load });
    j.done = true;
    for (const name of evictions(a, g.suite, g.activationMb)) {
      a.resident.delete(name);
      holders.set(name, (holders.get(name) ?? 1) - 1);
    }
    for (const name of g.suite) {
      if (!a.resident.delete(name)) holders.set(name, (holders.get(name) ?? 0) + 1);
      a.resident.add(name); // most recently used
      backlog.set(name, (backlog.get(name) ?? 0) - j.est);
    }
    a.free -= 1;
    a.inflight += 1;
    if (a.busyMs !== undefined) a.busyMs += a.runMs ? a.runMs(j.c) : a.avgJobMs;
    running.set(g.client, (running.get(g.client) ?? 0) + 1);
    const ranOut = g.suite.filter((name) => {
      const left = (demand.get(name) ?? 1) - 1;
      demand.set(name, left);
      return left === 0;
    });
    repush(a);
    // nobody waits for these any more: evicting one now costs less on every agent that holds it
    for (const name of ranOut) {
      for (const holder of state) {
        if (holder === a || !holder.resident.has(name)) continue;
        repush(holder);
        yield; // each re-push touches every group: a model running out on a large fleet is many
      }
    }
  }
  const waiting = inOrder.filter((j) => !j.done);
  return [...infeasible, ...placed, ...waiting.map((j): Decision => ({ jobId: j.c.jobId, kind: 'wait' }))];
}

/** Whether `c`'s whole suite, the pinned models it must share the GPU with, and its working memory fit on `a`. */
function fits(a: AgentView, c: Candidate): boolean {
  const members = suite(c).map((name) => a.models.get(name));
  const pinnedMb = [...(a.pinned ?? [])].filter((name) => !suite(c).includes(name)).reduce((s, name) => s + (a.models.get(name)?.vram_mb ?? 0), 0);
  return members.every((m) => m !== undefined) && pinnedMb + members.reduce((s, m) => s + m!.vram_mb, 0) + c.activationMb <= a.vramTotalMb;
}

interface Entry {
  a: AgentState;
  cost: number;
  inflight: number;
  version: number;
}

/** A binary min-heap of agents by (cost, jobs in flight, id): the order the cheapest agent is chosen in. */
class Heap {
  private readonly items: Entry[] = [];
  private static less(x: Entry, y: Entry): boolean {
    return (x.cost - y.cost || x.inflight - y.inflight || x.a.ord - y.a.ord) < 0;
  }
  push(e: Entry): void {
    const h = this.items;
    h.push(e);
    let i = h.length - 1;
    while (i > 0) {
      const p = (i - 1) >> 1;
      if (!Heap.less(h[i]!, h[p]!)) break;
      [h[i], h[p]] = [h[p]!, h[i]!];
      i = p;
    }
  }
  /** The least entry that is still `ok`; entries that are not are dropped on the way. */
  top(ok: (e: Entry) => boolean): Entry | null {
    const h = this.items;
    while (h.length && !ok(h[0]!)) {
      const last = h.pop()!;
      if (!h.length) break;
      h[0] = last;
      let i = 0;
      for (;;) {
        const l = 2 * i + 1;
        const r = l + 1;
        let m = i;
        if (l < h.length && Heap.less(h[l]!, h[m]!)) m = l;
        if (r < h.length && Heap.less(h[r]!, h[m]!)) m = r;
        if (m === i) break;
        [h[i], h[m]] = [h[m]!, h[i]!];
        i = m;
      }
    }
    return h[0] ?? null;
  }
}

/** The first model of `members` that `a` does not hold (loops, no closures: this runs in the hot paths). */
function firstMissing(a: AgentView, members: string[]): string | undefined {
  for (const name of members) if (!a.resident.has(name)) return name;
  return undefined;
}
const holdsAll = (a: AgentView, members: string[]): boolean => firstMissing(a, members) === undefined;

/** How long `a` runs what it holds before it could start another job. */
const waitOf = (a: AgentView): number => a.busyMs ?? a.inflight * a.avgJobMs;

const suite = (c: Candidate): string[] => [c.model, ...(c.adapters ?? [])];

/** A job's expected run time, for the backlog of its models: as its first feasible agent would run it. */
export const estimate = (c: Candidate, feasible: AgentView[]): number => feasible[0]!.runMs?.(c) ?? feasible[0]!.avgJobMs;

/**
 * What an agent's VRAM will hold once the jobs already on its queue have run: heartbeats show
 * the present, but a job placed a moment ago will load its models and evict others (least
 * recently used, never pinned) before anything placed now runs. Without this, placement keeps
 * sending jobs for a model that a queued job is about to evict.
 */
export function projectResidency(a: Pick<AgentView, 'resident' | 'pinned' | 'models' | 'vramTotalMb'>, queued: { models: string[]; activationMb: number }[]): Set<string> {
  const resident = new Set(a.resident);
  const vram = (name: string) => a.models.get(name)?.vram_mb ?? 0;
  for (const { models: members, activationMb } of queued) {
    const missing = members.filter((name) => !resident.has(name) && a.models.has(name));
    let used = [...resident].reduce((s, name) => s + vram(name), 0);
    const need = missing.reduce((s, name) => s + vram(name), 0) + activationMb;
    for (const name of [...resident]) {
      if (used + need <= a.vramTotalMb) break;
      if (members.includes(name) || a.pinned?.has(name)) continue;
      resident.delete(name);
      used -= vram(name);
    }
    for (const name of members) {
      if (!a.models.has(name)) continue;
      resident.delete(name);
      resident.add(name); // most recently used
    }
  }
  return resident;
}

function infeasibleReason(c: Candidate, agents: AgentState[]): string {
  if (agents.length === 0) return 'no live agent';
  const missing = suite(c).filter((name) => !agents.some((a) => a.models.has(name)));
  if (missing.length) return `no live agent can load model ${missing.join(', ')}`;
  if (!agents.some((a) => suite(c).every((name) => a.models.has(name)))) return `no live agent has every model of this request (${suite(c).join(', ')})`;
  return `no live agent has enough VRAM for ${c.model} with this request`;
}
