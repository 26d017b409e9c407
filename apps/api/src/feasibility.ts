import { activationVramMb, type AgentHeartbeat, type ModelInfo, type ParsedGenerationRequest, suiteOf } from '@kiln/contracts';
import { type AgentRegistry, KilnError, type LoraRegistry, qualifiedLoraName, REGISTRY_MAX_AGE_MS } from '@kiln/runtime';

/**
 * Feasibility at the door. Given the live agents, fills the choices a client may leave to Kiln
 * (the ControlNet model for a type, the upscaler) and refuses, with 422 naming the field, a
 * request no live agent could ever run: a model no agent has, a model of the wrong kind, a
 * feature, dtype or performance option no worker supports, or more VRAM than any GPU has.
 * With no live agent at all it accepts (the dispatcher fails the job as unschedulable if none
 * appears within its grace period).
 */

type Req = ParsedGenerationRequest;
type Agent = AgentHeartbeat & { capabilities: NonNullable<AgentHeartbeat['capabilities']> };

interface Requirement {
  /** for unknown models: the kind, so the error can list what is available */
  available?: ModelInfo['kind'];
  field: string;
  rule: string;
  message: string;
  ok: (a: Agent) => boolean;
}

const unschedulable = (field: string, rule: string, message: string) =>
  new KilnError('unschedulable', `no live agent can run this request: ${field}: ${message}`, { details: [{ field, rule, message }] });

function findModel(a: Agent, name: string): ModelInfo | undefined {
  return a.capabilities.models.find((m) => m.name === name);
}

export function requirements(r: Req, registeredLoras: ReadonlySet<string> = new Set()): Requirement[] {
  const reqs: Requirement[] = [];
  const model = (field: string, name: string, kind: ModelInfo['kind'], extra?: (m: ModelInfo) => boolean, what: string = kind) => {
    reqs.push({
      field,
      rule: 'unknown_model',
      message: `no live agent has the ${what} "${name}"`,
      available: kind,
      ok: (a) => {
        const m = findModel(a, name);
        return !!m && m.kind === kind && (!extra || extra(m));
      },
    });
  };
  const feature = (field: string, f: Agent['capabilities']['features'][number]) =>
    reqs.push({ field, rule: 'unsupported_feature', message: `no live agent supports ${f}`, ok: (a) => a.capabilities.features.includes(f) });

  model('model.base', r.model.base, 'base', undefined, 'base model');
  if (r.model.refiner) {
    feature('model.refiner', 'refiner');
    model('model.refiner', r.model.refiner, 'refiner');
  }
  if (r.model.vae) {
    feature('model.vae', 'vae');
    model('model.vae', r.model.vae, 'vae', undefined, 'VAE');
  }
  r.loras?.forEach((l, i) => {
    feature(`loras.${i}`, 'lora');
    // a trained LoRA from the registry runs on any agent that takes LoRAs: it is fetched first
    if (!registeredLoras.has(l.name)) model(`loras.${i}.name`, l.name, 'lora', undefined, 'LoRA');
  });
  r.controlnets?.forEach((c, i) => {
    feature(`controlnets.${i}`, 'controlnet');
    if (c.model) model(`controlnets.${i}.model`, c.model, 'controlnet', (m) => m.controlnet_type === c.type, `${c.type} ControlNet`);
    if (c.preprocess)
      reqs.push({ field: `controlnets.${i}.preprocess`, rule: 'unsupported_feature', message: `no live agent preprocesses ${c.type}`, ok: (a) => a.capabilities.controlnet_preprocessors.includes(c.type) });
  });
  if (r.image) feature(r.image.mask ? 'image.mask' : 'image.init', r.image.mask ? 'inpaint' : 'img2img');
  const up = r.postprocess?.upscale;
  if (up) {
    feature('postprocess.upscale', 'upscale');
    if (up.upscaler && up.upscaler !== 'lanczos') model('postprocess.upscale.upscaler', up.upscaler, 'upscaler');
  }
  if (r.postprocess?.safety_check) feature('postprocess.safety_check', 'safety_check');
  if (r.output.format !== 'png')
    reqs.push({ field: 'output.format', rule: 'unsupported_format', message: `no live agent writes ${r.output.format}`, ok: (a) => a.capabilities.output_formats.includes(r.output.format) });
  if (r.scheduler.type)
    reqs.push({ field: 'scheduler.type', rule: 'unsupported_scheduler', message: `no live agent has ${r.scheduler.type}`, ok: (a) => a.capabilities.schedulers.includes(r.scheduler.type) });
  const perf = r.performance;
  if (perf) {
    reqs.push({ field: 'performance.dtype', rule: 'unsupported_dtype', message: `no live agent runs ${perf.dtype}`, ok: (a) => a.capabilities.dtypes.includes(perf.dtype) });
    const flags = [
      ['attention_slicing', perf.attention_slicing],
      ['vae_slicing', perf.vae_slicing],
      ['vae_tiling', perf.vae_tiling],
      ['channels_last', perf.channels_last],
      ['compile', perf.compile],
    ] as const;
    for (const [name, on] of flags) {
      if (on) reqs.push({ field: `performance.${name}`, rule: 'unsupported_option', message: `no live agent supports ${name}`, ok: (a) => a.capabilities.performance.includes(name) });
    }
    if (perf.cpu_offload !== 'none') {
      const opt = perf.cpu_offload === 'model' ? 'cpu_offload_model' : 'cpu_offload_sequential';
      reqs.push({ field: 'performance.cpu_offload', rule: 'unsupported_option', message: `no live agent supports ${perf.cpu_offload} CPU offload`, ok: (a) => a.capabilities.performance.includes(opt) });
    }
  }
  return reqs;
}

/** VRAM the whole suite plus working memory needs on an agent (unknown members count 0). */
export function suiteVramMb(r: Req, a: Agent): number {
  const members = suiteOf(r as never).reduce((s, m) => s + (findModel(a, m.name)?.vram_mb ?? 0), 0);
  return members + activationVramMb(r.hyperparameters);
}

export function fillDefaults(r: Req, agents: Agent[]): Req {
  const out = structuredClone(r);
  out.controlnets?.forEach((c, i) => {
    if (c.model) return;
    const names = [...new Set(agents.flatMap((a) => a.capabilities.models.filter((m) => m.kind === 'controlnet' && m.controlnet_type === c.type).map((m) => m.name)))].sort();
    if (!names.length) {
      if (agents.length) throw unschedulable(`controlnets.${i}.type`, 'no_controlnet_model', `no live agent has a ${c.type} ControlNet`);
      throw unschedulable(`controlnets.${i}.model`, 'required_without_agents', 'no agent is live to choose a ControlNet model; name one');
    }
    c.model = names[0];
  });
  const up = out.postprocess?.upscale;
  if (up && !up.upscaler) {
    const models = agents.flatMap((a) => a.capabilities.models.filter((m) => m.kind === 'upscaler' && (m.scale ?? up.factor) === up.factor).map((m) => m.name));
    up.upscaler = [...new Set(models)].sort()[0] ?? 'lanczos';
  }
  return out;
}

/**
 * Runs a check against the live agents as the API last read them (at most REGISTRY_MAX_AGE_MS
 * ago), so a submit costs no registry read; a refusal is confirmed against a fresh read first,
 * so an agent that came up a moment ago is never missed. Accepting on a stale view is safe:
 * the dispatcher checks again and fails what no agent can run after its grace period.
 */
export async function againstLiveAgents<T>(registry: AgentRegistry, check: (live: AgentHeartbeat[]) => T | Promise<T>): Promise<T> {
  try {
    return await check(await registry.live({ maxAgeMs: REGISTRY_MAX_AGE_MS }));
  } catch (err) {
    if (!(err instanceof KilnError && err.code === 'unschedulable')) throw err;
    return check(await registry.live());
  }
}

/** Returns the request with defaults filled and the ids of agents that could run it. */
export function checkFeasible(r: Req, live: AgentHeartbeat[], registeredLoras: ReadonlySet<string> = new Set()): { request: Req; agents: string[] } {
  const agents = live.filter((a): a is Agent => !!a.capabilities);
  const request = fillDefaults(r, agents);
  if (agents.length === 0) return { request, agents: [] };
  const reqs = requirements(request, registeredLoras);
  for (const q of reqs) {
    if (agents.some(q.ok)) continue;
    const known = q.available ? [...new Set(agents.flatMap((a) => a.capabilities.models.filter((m) => m.kind === q.available).map((m) => m.name)))].sort() : [];
    throw unschedulable(q.field, q.rule, known.length ? `${q.message}; available: ${known.join(', ')}` : q.message);
  }
  const capable = agents.filter((a) => reqs.every((q) => q.ok(a)));
  if (capable.length === 0) throw unschedulable('', 'no_single_agent', 'each part of this request is available somewhere, but no one agent has all of it');
  const fits = capable.filter((a) => suiteVramMb(request, a) <= a.gpu.vram_total_mb);
  if (fits.length === 0) {
    const need = Math.min(...capable.map((a) => suiteVramMb(request, a)));
    const biggest = Math.max(...capable.map((a) => a.gpu.vram_total_mb));
    throw unschedulable('hyperparameters', 'exceeds_vram', `needs about ${need} MB of VRAM with its models; the largest capable GPU has ${biggest} MB — reduce width, height, num_images or the models`);
  }
  return { request, agents: fits.map((a) => a.agent_id) };
}

/**
 * Resolves the request's LoRA names for the caller: its own trained LoRA by the name it gave
 * the training (`style` → `<tenant>/style`), or a qualified name it may use (its own, one an
 * admin shared, or any for an admin). Anything else is left for the agents' own (global)
 * LoRAs — except a qualified name of another tenant's LoRA, which is refused as unknown.
 * Returns the request with qualified names and the set of trained LoRAs it uses.
 */
export async function resolveLoras<R extends { loras?: { name: string; weight: number }[] }>(
  ctx: { loras: LoraRegistry },
  who: { tenant: string; role: string },
  r: R,
): Promise<{ request: R; registered: Set<string> }> {
  if (!r.loras?.length) return { request: r, registered: new Set() };
  const names = r.loras.map((l) => l.name);
  const found = await ctx.loras.getMany([...names.map((n) => qualifiedLoraName(who.tenant, n)), ...names]);
  const registered = new Set<string>();
  const loras = r.loras.map((l, i) => {
    const own = found.get(qualifiedLoraName(who.tenant, l.name));
    const named = found.get(l.name);
    const lora = own ?? named;
    if (!lora) return l;
    if (!own && !(who.role === 'admin' || lora.tenant === who.tenant || lora.shared)) {
      throw unschedulable(`loras.${i}.name`, 'unknown_model', `no live agent has the LoRA "${l.name}"`);
    }
    registered.add(lora.name);
    return { ...l, name: lora.name };
  });
  return { request: { ...r, loras }, registered };
}
