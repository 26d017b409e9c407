import { ApiError } from '@kiln/contracts';
import Fastify from 'fastify';
import { describe, expect, it } from 'vitest';
import { registerErrorHandling } from './errors.js';
import { jsonDepthExceeds, MAX_JSON_DEPTH, registerJsonBody } from './json-body.js';

const nested = (depth: number, open = '[', close = ']') => open.repeat(depth) + close.repeat(depth);

describe('jsonDepthExceeds', () => {
  it.each([
    ['a flat object', '{"a":1,"b":[1,2,3]}', 2, false],
    ['exactly the limit', nested(5), 5, false],
    ['one past the limit', nested(6), 5, true],
    ['objects and arrays mixed', '{"a":[{"b":[{"c":1}]}]}', 4, true],
    ['brackets inside strings', '{"a":"[[[[[[{{{{{{"}', 1, false],
    ['an escaped quote inside a string', '{"a":"x\\"[[[[[["}', 1, false],
    ['an escaped backslash before the closing quote', '{"a":"x\\\\"}', 1, false],
    ['an escaped backslash, then a real nest', '[["x\\\\",[1]]]', 2, true],
    ['a string that never closes', '["[[[[', 1, false],
    ['siblings do not add up', '[[1],[2],[3],[4]]', 2, false],
  ])('%s', (_what, text, max, expected) => {
    expect(jsonDepthExceeds(text, max)).toBe(expected);
  });

  it('goes through a 10 MB string without looking inside it, and 100,000 levels without recursion', () => {
    const big = JSON.stringify({ image: 'A'.repeat(10 * 1024 * 1024) });
    const t0 = performance.now();
    expect(jsonDepthExceeds(big, MAX_JSON_DEPTH)).toBe(false);
    expect(performance.now() - t0).toBeLessThan(500);
    expect(jsonDepthExceeds(nested(100_000), MAX_JSON_DEPTH)).toBe(true);
  });
});

describe('the JSON body parser', () => {
  async function app() {
    const a = Fastify();
    registerErrorHandling(a);
    registerJsonBody(a);
    a.post('/echo', async (req) => ({ got: req.body }));
    a.delete('/thing', async () => ({ ok: true }));
    await a.ready();
    return a;
  }
  const post = async (payload: string, url = '/echo', method: 'POST' | 'DELETE' = 'POST') => {
    const a = await app();
    const res = await a.inject({ method, url, payload, headers: { 'content-type': 'application/json' } });
    await a.close();
    return { status: res.statusCode, body: res.json() };
  };

  it(`parses a body nested ${MAX_JSON_DEPTH} levels`, async () => {
    const res = await post(nested(MAX_JSON_DEPTH));
    expect(res.status).toBe(200);
  });

  it('refuses a body nested deeper with 400 too_deep, before anything recursive sees it', async () => {
    const deepItem = '{"a":'.repeat(MAX_JSON_DEPTH) + '1' + '}'.repeat(MAX_JSON_DEPTH);
    const res = await post(`{"defaults":{},"items":[${deepItem}]}`);
    expect(res.status).toBe(400);
    expect(ApiError.parse(res.body).error).toMatchObject({ code: 'validation_failed', details: [{ field: '', rule: 'too_deep' }] });
    const deep = await post(nested(10_000));
    expect(deep.body.error.details[0].rule).toBe('too_deep');
  });

  it('keeps prototype-poisoning protection: __proto__ and constructor.prototype keys are a 400', async () => {
    for (const payload of ['{"__proto__":{"admin":true}}', '{"constructor":{"prototype":{"admin":true}}}']) {
      const res = await post(payload);
      expect(res.status).toBe(400);
      expect(ApiError.parse(res.body).error).toMatchObject({ code: 'validation_failed', details: [{ rule: 'invalid_json' }] });
    }
  });

  it('answers invalid JSON and an empty JSON body in Kiln’s shape', async () => {
    expect(await post('{"a": ')).toMatchObject({ status: 400, body: { error: { code: 'validation_failed', details: [{ rule: 'invalid_json' }] } } });
    expect(await post('', '/thing', 'DELETE')).toMatchObject({ status: 400, body: { error: { code: 'validation_failed', details: [{ rule: 'required' }] } } });
  });
});
