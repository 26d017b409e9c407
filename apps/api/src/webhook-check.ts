import { assertPublicTarget, KilnError } from '@kiln/runtime';
import type { ApiContext } from './context.js';

/** A webhook needs WEBHOOK_SECRET, and a public target unless WEBHOOK_ALLOW_PRIVATE. */
export async function checkWebhookOf(ctx: ApiContext, url: string | undefined, field = 'webhook'): Promise<void> {
  if (!url) return;
  if (!ctx.env.WEBHOOK_SECRET) {
    throw new KilnError('validation_failed', `invalid request: ${field}: webhooks are disabled on this farm (WEBHOOK_SECRET is not set)`, {
      details: [{ field, rule: 'webhooks_disabled', message: 'the operator must set WEBHOOK_SECRET to enable webhooks' }],
    });
  }
  if (ctx.env.WEBHOOK_ALLOW_PRIVATE) return;
  try {
    await assertPublicTarget(url);
  } catch (err) {
    const message = err instanceof Error ? err.message : String(err);
    throw new KilnError('validation_failed', `invalid request: ${field}.url: ${message}`, { details: [{ field: `${field}.url`, rule: 'private_address', message }] });
  }
}
