import { createParser } from 'eventsource-parser';

export interface SseFrame {
  type: 'event' | 'comment';
  event?: string;
  id?: string;
  data?: any;
  comment?: string;
  at: number;
}

/**
 * A server-sent events response read as a client would (fetch + eventsource-parser): frames in
 * arrival order, until the server ends the stream or `close()` aborts it.
 */
export async function openSse(url: string, headers: Record<string, string> = {}) {
  const abort = new AbortController();
  const res = await fetch(url, { headers: { accept: 'text/event-stream', ...headers }, signal: abort.signal });
  const frames: SseFrame[] = [];
  let ended = false;
  let wake: (() => void) | null = null;
  const parser = createParser({
    onEvent: (e) => push({ type: 'event', event: e.event, id: e.id, data: JSON.parse(e.data), at: Date.now() }),
    onComment: (c) => push({ type: 'comment', comment: c.trim(), at: Date.now() }),
  });
  function push(f: SseFrame) {
    frames.push(f);
    wake?.();
  }
  const done = (async () => {
    if (!res.ok || !res.body) return;
    const decoder = new TextDecoder();
    try {
      for await (const chunk of res.body) parser.feed(decoder.decode(chunk as Uint8Array, { stream: true }));
    } catch {
      // aborted by close()
    }
  })().finally(() => {
    ended = true;
    wake?.();
  });
  return {
    res,
    frames,
    get ended() {
      return ended;
    },
    /** Waits until `pred` holds over the frames so far (or the stream ends, or time runs out). */
    async until(pred: (frames: SseFrame[]) => boolean, timeoutMs = 30_000): Promise<SseFrame[]> {
      const deadline = Date.now() + timeoutMs;
      while (!pred(frames)) {
        if (ended) throw new Error(`the stream ended first; frames: ${JSON.stringify(frames.map((f) => f.event ?? f.comment))}`);
        if (Date.now() > deadline) throw new Error(`timed out; frames: ${JSON.stringify(frames.map((f) => f.event ?? f.comment))}`);
        await new Promise<void>((r) => {
          wake = r;
          setTimeout(r, 200);
        });
      }
      return frames;
    },
    /** Resolves when the server ends the stream. */
    async finished(timeoutMs = 30_000): Promise<SseFrame[]> {
      await Promise.race([done, new Promise((_, rej) => setTimeout(() => rej(new Error(`the stream did not end; frames: ${JSON.stringify(frames.map((f) => f.event ?? f.comment))}`)), timeoutMs))]);
      return frames;
    },
    close() {
      abort.abort();
    },
  };
}

export const events = (frames: SseFrame[], name?: string) => frames.filter((f) => f.type === 'event' && (name === undefined || f.event === name));
