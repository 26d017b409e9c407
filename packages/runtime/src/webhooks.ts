import { randomUUID } from 'node:crypto';
import { isTerminal, type StoredGroup, type StoredJob, type WebhookEvent, type WebhookPayload } from '@kiln/contracts';
import { type Job, Queue, UnrecoverableError } from 'bullmq';
import { Webhook } from 'standardwebhooks';
import type { WebhookEnv } from './env.js';
import { KilnError } from './errors.js';
import { announcement, type JobStore } from './job-store.js';
import { type GroupStore, groupEnded, groupOutcome, groupRecord } from './groups.js';
import { jobRecord } from './job-view.js';
import { FetchError, guardedRequest, targetPolicy } from './net-guard.js';
import type { Storage } from './storage.js';
import { webhookDeliveries, webhookSeconds } from './metrics.js';
import { inSpan, SpanKind, tracingOn } from './tracing.js';

/**
 * Webhooks per the Standard Webhooks specification: the body is signed with
 * WEBHOOK_SECRET over `id.timestamp.body`; the id is the same on every retry of one message;
 * the timestamp and signature are made afresh on each try. Deliveries run from a BullMQ queue
 * with exponential backoff, and every try is appended to the job's record.
 */

export interface DeliveryData {
  /** the job, or the group when `group` is set */
  job_id: string;
  group?: boolean;
  event: WebhookEvent;
  msg_id: string;
  url: string;
  body: string;
}

/**
 * POSTs the body through the guarded client; resolves with the status code, or rejects with a
 * FetchError. Redirects are not followed: a signed delivery goes to the URL the client gave.
 */
export async function postWebhook(rawUrl: string, headers: Record<string, string>, body: string, timeoutMs: number, allowPrivate: boolean): Promise<number> {
  const res = await guardedRequest(rawUrl, { method: 'POST', headers, body, timeoutMs, maxBytes: 0, maxRedirects: 0, readBody: false, allow: targetPolicy(allowPrivate) });
  return res.status;
}

/** How long a drainer holds an announcement before another may take it over. */
const ANNOUNCE_LEASE_MS = 30_000;

/** A `completed` message's id: one per job or group, so a second drain finds it already queued. */
const completedMsgId = (kind: 'job' | 'group', id: string) => `msg_${kind}_completed_${id.replace(/[^A-Za-z0-9]/g, '')}`;

/**
 * Turns job events into webhook messages on the delivery queue. Ends go through the outbox:
 * the write that ends a job also records its announcement (JobStore's end-job), and `drain`
 * turns announcements into deliveries — a job's `completed` message, and for the child that
 * closed its group, the group's end and its `completed` message. Draining is safe to repeat:
 * the group ends once (GroupStore.finish) and each `completed` message has a fixed id, so a
 * second drain finds it on the queue instead of adding another. The process that ended the
 * job drains at once; the dispatcher's sweep drains whatever a crash left behind.
 */
export class WebhookOutbox {
  constructor(
    private readonly queue: Queue,
    private readonly store: JobStore,
    private readonly groups: GroupStore,
    private readonly storage: Storage,
    private readonly publicUrl: string,
    private readonly env: WebhookEnv,
  ) {}

  /**
   * Makes the announcements due in the outbox (only `members`, when given); returns how many.
   * One that fails stays in the outbox for the next drain, after the others were tried.
   */
  async drain(members?: string[]): Promise<number> {
    let made = 0;
    let failure: unknown = null;
    for (;;) {
      const claimed = await this.store.claimAnnouncements(ANNOUNCE_LEASE_MS, members ?? []);
      for (const member of claimed) {
        try {
          await this.announce(member);
          await this.store.announced(member);
          made += 1;
        } catch (err) {
          failure ??= err;
        }
      }
      if (members || claimed.length === 0 || failure) break;
    }
    if (failure) throw failure;
    return made;
  }

  private async announce(member: string): Promise<void> {
    const a = announcement.parse(member);
    if (a?.kind === 'job') {
      const job = await this.store.get(a.id);
      if (job && isTerminal(job.status)) await this.emit(job, 'completed');
    } else if (a?.kind === 'group') {
      let group = await this.groups.get(a.id);
      if (!group) return; // expired
      if (!groupEnded(group)) {
        const outcome = groupOutcome(group, await this.store.getMany(group.children));
        group = (await this.groups.finish(a.id, outcome)) ?? (await this.groups.get(a.id));
      }
      if (group) await this.emitGroup(group);
    }
  }

  /** Queues the `completed` delivery of a batch or cache group, if it has a webhook. */
  async emitGroup(group: StoredGroup): Promise<void> {
    if (!group.webhook) return;
    const payload = {
      type: `${group.kind}.completed`,
      timestamp: new Date().toISOString(),
      data: await groupRecord(group, this.groups, this.store, this.storage, this.publicUrl),
    };
    await this.send({ job_id: group.id, group: true, event: 'completed', url: group.webhook.url, payload, msgId: completedMsgId('group', group.id) });
  }

  private async send(d: { job_id: string; group?: boolean; event: WebhookEvent; url: string; payload: unknown; msgId?: string }): Promise<void> {
    const msgId = d.msgId ?? `msg_${randomUUID().replaceAll('-', '')}`;
    const data: DeliveryData = { job_id: d.job_id, group: d.group, event: d.event, msg_id: msgId, url: d.url, body: JSON.stringify(d.payload) };
    // a message with this id still on the queue (waiting, retrying or delivered within the
    // queue's retention, at least a day: createJobServices) makes this add a no-op: that is
    // what makes a repeated drain harmless
    await this.queue.add(`${d.group ? 'group' : 'job'}.${d.event}`, data, {
      jobId: msgId,
      attempts: this.env.WEBHOOK_MAX_ATTEMPTS,
      backoff: { type: 'exponential', delay: this.env.WEBHOOK_BACKOFF_MS },
    });
  }

  /** Queues a delivery of the job's current record if its webhook subscribes to `event`. */
  async emit(job: StoredJob, event: WebhookEvent): Promise<void> {
    const hook = 'webhook' in job.request ? job.request.webhook : undefined;
    if (!hook || !hook.events.includes(event)) return;
    const payload: WebhookPayload = {
      type: `job.${event}`,
      timestamp: new Date().toISOString(),
      data: await jobRecord(job, this.store, this.storage, this.publicUrl),
    };
    await this.send({ job_id: job.id, event, url: hook.url, payload, ...(event === 'completed' ? { msgId: completedMsgId('job', job.id) } : {}) });
  }
}

/** The BullMQ processor that delivers one try; throws to let BullMQ back off and retry. */
export function webhookDeliverer(store: JobStore, groups: GroupStore, env: WebhookEnv) {
  if (!env.WEBHOOK_SECRET) throw new Error('WEBHOOK_SECRET is required to deliver webhooks');
  const signer = new Webhook(env.WEBHOOK_SECRET);
  return async (bullJob: Job<DeliveryData>): Promise<{ status: number }> => {
    const d = bullJob.data;
    const started = Date.now();
    const record = async (status: number | null, ok: boolean, error: string | null, outcome: 'delivered' | 'rejected' | 'failed' | 'refused') => {
      webhookDeliveries.inc({ outcome });
      webhookSeconds.observe({ outcome }, (Date.now() - started) / 1000);
      await (d.group ? groups : store).addDelivery(d.job_id, {
        id: d.msg_id,
        event: d.event,
        try: bullJob.attemptsMade + 1,
        at: new Date(started).toISOString(),
        status_code: status,
        ok,
        error,
        duration_ms: Date.now() - started,
      });
    };
    const now = new Date();
    const headers = {
      'content-type': 'application/json',
      'user-agent': 'kiln-webhooks/1',
      'webhook-id': d.msg_id,
      'webhook-timestamp': String(Math.floor(now.getTime() / 1000)),
      'webhook-signature': signer.sign(d.msg_id, now, d.body),
    };
    let status: number;
    try {
      // the guarded client checks the target again here, after resolving it: DNS may have changed since submission
      const parent = tracingOn() && !d.group ? await store.traceOf(d.job_id) : null;
      const attrs = { 'kiln.job': d.job_id, 'kiln.webhook.event': d.event, 'kiln.webhook.try': bullJob.attemptsMade + 1 };
      status = await inSpan('webhook deliver', parent, attrs, async (span) => {
        const code = await postWebhook(d.url, headers, d.body, env.WEBHOOK_TIMEOUT_MS, env.WEBHOOK_ALLOW_PRIVATE);
        span.setAttribute('http.response.status_code', code);
        return code;
      }, SpanKind.CLIENT);
    } catch (err) {
      // the record is shown to the client: the guard's own words, never a socket error
      const message = err instanceof FetchError ? err.message : 'internal: the delivery could not be attempted';
      const refused = err instanceof FetchError && (err.category === 'private_address' || err.category === 'invalid_url');
      await record(null, false, message, refused ? 'refused' : 'failed');
      if (refused) throw new UnrecoverableError(message); // no retry reaches a refused target
      throw new Error(`webhook delivery failed: ${message}`, { cause: err });
    }
    const ok = status >= 200 && status < 300;
    await record(status, ok, ok ? null : `receiver answered ${status}`, ok ? 'delivered' : 'rejected');
    if (!ok) throw new Error(`webhook receiver answered ${status}`);
    return { status };
  };
}
