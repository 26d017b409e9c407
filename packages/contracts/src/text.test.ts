import { describe, expect, it } from 'vitest';
import { issuesToDetails } from './errors.js';
import { GenerationRequest } from './generation.js';
import { CacheRequest, EvictRequest, TrainingRequest } from './kinds.js';
import { Text } from './text.js';

describe('Text: free text a client sends', () => {
  it.each([
    ['plain ASCII', 'a lighthouse at dusk'],
    ['newlines and tabs', 'line one\nline two\tindented'],
    ['accents and CJK', 'café, 東京の夜'],
    ['an emoji (a surrogate pair)', 'a kiln 🔥 glowing'],
    ['zero-width joiner sequences', '👩‍🔬'],
  ])('accepts %s', (_what, s) => {
    expect(Text.safeParse(s).success).toBe(true);
  });

  it.each([
    ['a lone high surrogate', 'abc\uD800', 'lone_surrogate'],
    ['a lone low surrogate', '\uDC00abc', 'lone_surrogate'],
    ['a pair in the wrong order', '\uDC00\uD800', 'lone_surrogate'],
    ['a high surrogate before a letter', '\uD83Dx', 'lone_surrogate'],
    ['NUL', 'a\u0000b', 'control_character'],
    ['ESC (terminal escapes)', 'a\u001b[31mred', 'control_character'],
    ['carriage return', 'a\rb', 'control_character'],
    ['DEL', 'a\u007f', 'control_character'],
    ['a C1 control (NEL)', 'a\u0085b', 'control_character'],
  ])('refuses %s with its rule', (_what, s, rule) => {
    const r = Text.safeParse(s);
    expect(r.success).toBe(false);
    expect(issuesToDetails(r.error!.issues)).toEqual([expect.objectContaining({ rule })]);
  });

  it('says where the bad character is', () => {
    const r = Text.safeParse('ab\u0007');
    expect(r.error!.issues[0]!.message).toContain('U+0007 at index 2');
  });
});

describe('every free-text field of a request is Text', () => {
  const base = { model: { base: 'stabilityai/stable-diffusion-xl-base-1.0' }, conditioning: { prompt: 'a kiln at dusk' } };
  const LONE = 'x\uD800';

  it.each([
    ['conditioning.prompt', { ...base, conditioning: { prompt: LONE } }],
    ['conditioning.negative_prompt', { ...base, conditioning: { prompt: 'ok', negative_prompt: LONE } }],
    ['model.base', { ...base, model: { base: LONE } }],
    ['model.refiner', { ...base, model: { base: 'b', refiner: LONE } }],
    ['model.vae', { ...base, model: { base: 'b', vae: LONE } }],
    ['loras.0.name', { ...base, loras: [{ name: LONE }] }],
    ['controlnets.0.model', { ...base, controlnets: [{ type: 'canny', model: LONE, image: { s3_key: 'a.png' } }] }],
    ['postprocess.upscale.upscaler', { ...base, postprocess: { upscale: { factor: 2, upscaler: LONE } } }],
  ])('generation %s', (field, body) => {
    const r = GenerationRequest.safeParse(body);
    expect(r.success).toBe(false);
    expect(issuesToDetails(r.error!.issues)).toEqual(expect.arrayContaining([expect.objectContaining({ field, rule: 'lone_surrogate' })]));
  });

  it.each([
    ['cache models.base', CacheRequest, { models: { base: 'a\u0000' } }, 'models.base'],
    ['cache target.agents.0', CacheRequest, { models: { base: 'b' }, target: { agents: ['gpu\u001b'] } }, 'target.agents.0'],
    ['evict models.0', EvictRequest, { models: ['m\u0000'] }, 'models.0'],
    ['evict agents.0', EvictRequest, { models: ['m'], agents: ['a\u0000'] }, 'agents.0'],
    ['training base_model', TrainingRequest, { base_model: 'b\u0000', dataset: { s3_prefix: 'd/' }, output: { name: 'n' } }, 'base_model'],
  ])('%s', (_what, schema, body, field) => {
    const r = (schema as typeof CacheRequest).safeParse(body);
    expect(r.success).toBe(false);
    expect(issuesToDetails(r.error!.issues)).toEqual(expect.arrayContaining([expect.objectContaining({ field, rule: 'control_character' })]));
  });

  it('a prompt with newlines and an emoji still parses, trimmed', () => {
    expect(GenerationRequest.parse({ ...base, conditioning: { prompt: '  a kiln 🔥\n\tat dusk ' } }).conditioning.prompt).toBe('a kiln 🔥\n\tat dusk');
  });
});
