import { GroupEvent, isTerminal, type JobStatus, type StoredGroup } from '@kiln/contracts';
import { groupEnded, groupRecord, jobRecord, latestPreviews, parsePreview } from '@kiln/runtime';
import type { FastifyPluginAsyncZod } from 'fastify-type-provider-zod';
import { z } from 'zod';
import type { ApiContext } from '../context.js';
import { SseStream } from '../sse.js';
import { IdParams, loadVisible } from '../tenancy.js';

/** How long a follower sleeps without a wake-up before it looks anyway. */
const POLL_MS = 1_000;

/**
 * `Last-Event-ID` as these streams write ids: `<n>` after the state event numbered n (a job
 * event's `seq`, a batch's n-th), `<n>:<marker>` after a progress event (the marker says which).
 * Anything else starts from the beginning.
 */
function resumeFrom(header: unknown): { states: number; marker: string } {
  const m = typeof header === 'string' ? /^(\d{1,6})(?::([\w.-]{1,64}))?$/.exec(header) : null;
  return m ? { states: Number(m[1]), marker: m[2] ?? '' } : { states: 0, marker: '' };
}

const stream = (what: string) => ({
  description: what,
  content: { 'text/event-stream': { schema: z.string().describe('server-sent events (text/event-stream)') } },
});

const JOB_EVENTS = `Server-sent events, as the job changes:

- \`state\` — every state change, from the first (\`submitted\`) on: a JobEvent (\`at\`, \`status\`, \`stage\`, \`attempt\`, \`agent\`, \`message\`, \`seq\`). Id \`<seq>\`: its number, 1, 2, 3… (a succeeded job's record keeps fewer events than a live follower saw; their numbers never change, so a stream read after the end skips the numbers of those dropped).
- \`progress\` — while it runs, each step: \`{ stage, step, total, loss? }\`. Id \`<n>:<stage>.<step>\`.
- \`preview\` — when the request asked for \`output.previews\`: a small image of the first image as it forms, after every n-th base and refiner step: \`{ job_id, attempt, stage, step, total, width, height, content_type, data }\` (\`data\`: the image file, base64; WebP). No id: previews are live only, never stored on the record and never replayed; a follower who connects mid-run gets the latest one first (kept for 30 s).
- \`end\` — once, after the terminal state: the whole job record (outputs with presigned URLs). The stream then closes.

Reconnecting with \`Last-Event-ID\` resumes after that event (state events are replayed from there; progress is current). A comment (\`: keep-alive\`) is sent every SSE_KEEPALIVE_MS. Same auth as the record: another tenant's job is a 404.`;

const BATCH_EVENTS = `Server-sent events, as the batch and its children change:

- \`state\` — the batch's own state changes: \`{ at, status, message }\`. Id \`<n>\`: the n-th.
- \`child\` — a child's status, when it changes (and every child's on connecting): \`{ index, id, status }\`.
- \`progress\` — the counts per state, when they change: \`{ total, queued, running, succeeded, failed, canceled }\`.
- \`preview\` — children that asked for \`output.previews\`: the same as on a job's stream, \`job_id\` naming the child. No id, never replayed; on connecting, each running child's latest.
- \`end\` — once, when the batch has ended: the batch record. The stream then closes.

Reconnecting with \`Last-Event-ID\` replays the state events after it and sends the children's and counts' current values again.`;

/**
 * GET /v1/jobs/:id/events and GET /v1/batches/:id/events: live progress as server-sent events.
 * Each stream re-reads the record from Redis whenever the job (or batch) changes — JobStore and
 * GroupStore publish a hint on every write, progress steps included — or every POLL_MS at the
 * latest, and sends what is new since it last looked; so any API instance can serve any stream,
 * and a reconnect resumes from Last-Event-ID.
 */
export function eventRoutes(ctx: ApiContext): FastifyPluginAsyncZod {
  const open = new Set<SseStream>();

  return async (app) => {
    const feed = app.changes;
    // streams never end on their own while a job runs: end them so the server can close
    app.addHook('preClose', async () => {
      for (const s of open) s.close();
    });

    app.get(
      '/v1/jobs/:id/events',
      {
        exposeHeadRoute: false,
        schema: { summary: "Follow a job's progress live (SSE)", description: JOB_EVENTS, params: IdParams, headers: z.looseObject({ 'last-event-id': z.string().max(100).optional() }), response: { 200: stream('the event stream') } },
      },
      async (req, reply) => {
        const { id } = await loadVisible(req.principal, req.params.id, 'job', (i) => ctx.store.get(i));
        const from = resumeFrom(req.headers['last-event-id']);
        const sse = new SseStream(reply, ctx.env.SSE_KEEPALIVE_MS);
        open.add(sse);
        const channel = ctx.keys.jobChanged(id);
        const unfollow = await feed.follow(channel);
        // previews go out live once the replay is sent (it ends with the latest one), never after the end
        let live = false;
        const unfollowPreviews = await feed.follow(ctx.keys.jobPreviews(id), (raw) => {
          const p = live ? parsePreview(raw) : null;
          if (p) sse.send('preview', null, p);
        });
        try {
          let states = from.states;
          let marker = from.marker;
          let first = true;
          while (!sse.closed) {
            const woken = feed.next(channel, POLL_MS, sse.signal); // before reading: a change meanwhile wakes it
            // the record first: if it has ended, the events read after it include its last
            const job = await ctx.store.get(id);
            if (!job) break; // expired meanwhile
            // by number (seq): a succeeded job's compaction blanks events but never moves one
            for (const ev of await ctx.store.eventsAfter(id, states)) {
              sse.send('state', String(ev.seq), ev);
              states = ev.seq;
            }
            const p = job.status === 'running' ? job.progress : null;
            const now = p ? `${p.stage}.${p.step}` : marker;
            if (p && now !== marker) sse.send('progress', `${states}:${now}`, p);
            marker = now;
            if (first && job.status === 'running') {
              // joined mid-run: the current image, then each new one as it comes
              const [latest] = await latestPreviews(ctx.redis, ctx.keys, [id]);
              if (latest && latest.attempt === job.attempt) sse.send('preview', null, latest);
            }
            first = false;
            live = !isTerminal(job.status);
            if (isTerminal(job.status)) {
              sse.send('end', String(states), await jobRecord(job, ctx.store, ctx.storage, ctx.env.PUBLIC_URL));
              break;
            }
            await woken;
          }
        } finally {
          live = false;
          await unfollowPreviews();
          await unfollow();
          open.delete(sse);
          sse.close();
        }
      },
    );

    app.get(
      '/v1/batches/:id/events',
      {
        exposeHeadRoute: false,
        schema: { summary: "Follow a batch's progress live (SSE)", description: BATCH_EVENTS, params: IdParams, headers: z.looseObject({ 'last-event-id': z.string().max(100).optional() }), response: { 200: stream('the event stream') } },
      },
      async (req, reply) => {
        const { id } = await loadVisible(req.principal, req.params.id, 'batch', (i) => ctx.jobs.groups.get(i), (g) => g.kind === 'batch');
        let states = resumeFrom(req.headers['last-event-id']).states;
        const sse = new SseStream(reply, ctx.env.SSE_KEEPALIVE_MS);
        open.add(sse);
        const channel = ctx.keys.groupChanged(id);
        const unfollow = await feed.follow(channel);
        let live = false; // as on a job's stream
        const unfollowPreviews = await feed.follow(ctx.keys.groupPreviews(id), (raw) => {
          const p = live ? parsePreview(raw) : null;
          if (p) sse.send('preview', null, p);
        });
        try {
          const sent = new Map<number, JobStatus | null>();
          let counts = '';
          let first = true;
          while (!sse.closed) {
            const woken = feed.next(channel, POLL_MS, sse.signal);
            const group: StoredGroup | null = await ctx.jobs.groups.get(id);
            if (!group) break;
            for (const raw of await ctx.redis.lrange(ctx.keys.groupEvents(id), states, -1)) sse.send('state', String(++states), GroupEvent.parse(JSON.parse(raw)));
            const statuses = await ctx.store.statuses(group.children);
            const tally = { total: group.children.length, queued: 0, running: 0, succeeded: 0, failed: 0, canceled: 0 };
            for (const [index, status] of statuses.entries()) {
              if (status) tally[status] += 1;
              if (sent.has(index) && sent.get(index) === status) continue;
              sent.set(index, status);
              if (status) sse.send('child', String(states), { index, id: group.children[index], status });
            }
            if (JSON.stringify(tally) !== counts) sse.send('progress', String(states), tally);
            counts = JSON.stringify(tally);
            if (first) {
              const running = group.children.filter((_, i) => statuses[i] === 'running');
              for (const latest of await latestPreviews(ctx.redis, ctx.keys, running)) if (latest) sse.send('preview', null, latest);
            }
            first = false;
            live = !groupEnded(group);
            if (groupEnded(group)) {
              sse.send('end', String(states), await groupRecord(group, ctx.jobs.groups, ctx.store, ctx.storage, ctx.env.PUBLIC_URL));
              break;
            }
            await woken;
          }
        } finally {
          live = false;
          await unfollowPreviews();
          await unfollow();
          open.delete(sse);
          sse.close();
        }
      },
    );
  };
}
