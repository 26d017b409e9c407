import { checkTarget, FetchError, KilnError, publicOnly } from '@kiln/runtime';
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
    // checked now so the client hears of it; the dispatcher's guarded client checks again at delivery
    await checkTarget(url, { allow: publicOnly });
  } catch (err) {
    if (!(err instanceof FetchError)) throw err;
    const message = err.category === 'private_address' ? `${err.message} (the operator can allow private targets with WEBHOOK_ALLOW_PRIVATE=true)` : err.message;
    throw new KilnError('validation_failed', `invalid request: ${field}.url: ${message}`, { details: [{ field: `${field}.url`, rule: err.category, message }] });
  }
}
