import { KilnError } from '@kiln/runtime';
import type { FastifyInstance } from 'fastify';

/**
 * The deepest a request body may nest objects and arrays. The deepest real request (a batch
 * item with a ControlNet image) is 6 levels; recursive code after the parser (zod, the batch
 * route's defaults merge, structuredClone) must never meet a body deep enough to overflow the
 * stack.
 */
export const MAX_JSON_DEPTH = 32;

/**
 * Replaces Fastify's JSON parser with one that first measures nesting depth, without recursion
 * and before anything else looks at the body: too deep is a 400 naming the rule `too_deep`.
 * Parsing itself stays Fastify's own (secure-json-parse, `__proto__` and `constructor` keys
 * refused), as do its empty-body and invalid-JSON errors.
 */
export function registerJsonBody(app: FastifyInstance, maxDepth = MAX_JSON_DEPTH): void {
  const parse = app.getDefaultJsonParser('error', 'error');
  app.addContentTypeParser('application/json', { parseAs: 'string' }, (req, body, done) => {
    const text = body as string;
    if (jsonDepthExceeds(text, maxDepth)) {
      const message = `the body nests objects and arrays more than ${maxDepth} levels deep`;
      done(new KilnError('validation_failed', `invalid request: ${message}`, { details: [{ field: '', rule: 'too_deep', message }] }), undefined);
      return;
    }
    parse(req, text, done);
  });
}

/**
 * Whether JSON text opens more than `max` objects/arrays at once. One pass, no recursion;
 * strings are skipped with indexOf, so a large base64 image costs little. Malformed text may be
 * miscounted, but the parser refuses it anyway.
 */
export function jsonDepthExceeds(text: string, max: number): boolean {
  let depth = 0;
  for (let i = 0; i < text.length; i++) {
    const c = text.charCodeAt(i);
    if (c === 0x22 /* " */) {
      i = endOfString(text, i + 1);
      if (i < 0) return false;
    } else if (c === 0x7b /* { */ || c === 0x5b /* [ */) {
      if (++depth > max) return true;
    } else if (c === 0x7d /* } */ || c === 0x5d /* ] */) {
      depth--;
    }
  }
  return false;
}

/** Index of the quote that closes a string starting at `from`, or -1 if it never closes. */
function endOfString(text: string, from: number): number {
  for (let q = text.indexOf('"', from); q >= 0; q = text.indexOf('"', q + 1)) {
    let backslashes = 0;
    while (text.charCodeAt(q - 1 - backslashes) === 0x5c) backslashes++;
    if (backslashes % 2 === 0) return q;
  }
  return -1;
}
