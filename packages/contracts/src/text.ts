import { z } from 'zod';

/**
 * Free text a client sends (prompts, model and agent names): a string that is well-formed
 * UTF-16 and holds no control character other than newline and tab. A lone surrogate cannot be
 * encoded as UTF-8, so the worker would fail on it long after the API said yes; control
 * characters corrupt logs, metadata and file names. Both are a 400 naming the field here.
 */
export const Text = z.string().superRefine((s, ctx) => {
  const bad = firstBadChar(s);
  if (bad) ctx.addIssue({ code: 'custom', message: bad.message, params: { rule: bad.rule } });
});

// U+0000–U+001F except tab (09) and newline (0A), DEL, and the C1 controls U+0080–U+009F
const CONTROL = /[\u0000-\u0008\u000B-\u001F\u007F-\u009F]/;
const LONE_SURROGATE = /[\uD800-\uDBFF](?![\uDC00-\uDFFF])|(?<![\uD800-\uDBFF])[\uDC00-\uDFFF]/;

/** The first character Text refuses, with the rule it breaks; null when the string is fine. */
export function firstBadChar(s: string): { rule: 'lone_surrogate' | 'control_character'; index: number; message: string } | null {
  const surrogate = LONE_SURROGATE.exec(s);
  if (surrogate) {
    return { rule: 'lone_surrogate', index: surrogate.index, message: `has an unpaired UTF-16 surrogate at index ${surrogate.index} (${hex(surrogate[0])}): not valid Unicode text` };
  }
  const control = CONTROL.exec(s);
  if (control) {
    return { rule: 'control_character', index: control.index, message: `has the control character ${hex(control[0])} at index ${control.index}; newline and tab are the only ones allowed` };
  }
  return null;
}

const hex = (c: string) => `U+${c.charCodeAt(0).toString(16).toUpperCase().padStart(4, '0')}`;
