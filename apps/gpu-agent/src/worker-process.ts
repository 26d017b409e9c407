import { EventEmitter } from 'node:events';
import { createInterface } from 'node:readline';
import {
  type AgentToWorker,
  type CheckpointMessage,
  type GenerateMessage,
  type LoadedMessage,
  type PreviewMessage,
  type TrainedMessage,
  type TrainMessage,
  PROTOCOL_VERSION,
  type ProgressMessage,
  type ReadyMessage,
  type ResultMessage,
  type SelfTestMessage,
  type SelfTestResultMessage,
  type WorkerToAgent,
  type WorkerState,
} from '@kiln/contracts';
import { KilnError, type Logger } from '@kiln/runtime';
import { execa, type ResultPromise } from 'execa';
import { workerMessages } from './worker-messages.js';

/**
 * One Python worker process and its protocol. States:
 *   starting → ready ⇄ busy → defunct
 * `defunct` is final: the agent starts a fresh WorkerProcess.
 *
 * An exit is classified by what we intended first (stopping, or killing to cancel) before it
 * is called a crash; a crash fails the in-flight request with the exit code or signal. The tail
 * of stderr goes to the agent's log only: it can name other jobs, models and paths, and a job's
 * error is read by its client.
 */
export type WorkerStateName = 'starting' | 'ready' | 'busy' | 'defunct';

export interface WorkerCommand {
  file: string;
  args: string[];
  cwd: string;
  env: Record<string, string>;
}

type FinalMessage = ResultMessage | LoadedMessage | TrainedMessage | SelfTestResultMessage;

/** One request on the worker: its id, its outcome, and a hook for the moment it is answered. */
export interface WorkerRequest<T> {
  id: string;
  /** settles with the final message, or a classified KilnError */
  done: Promise<T>;
  /**
   * `fn` runs the moment the worker's final frame for this request has been read and checked
   * (result or error), inside that call, before `done` settles: the worker is `ready` again and
   * a request sent from `fn` is written before anything queued behind it runs. Not called when
   * the worker dies instead.
   */
  onAnswer(fn: () => void): void;
}

interface Pending {
  id: string;
  answered: (() => void) | null;
  resolve: (m: FinalMessage) => void;
  reject: (e: KilnError) => void;
  onProgress: (m: ProgressMessage) => void;
  onPreview: (m: PreviewMessage) => void;
  onCheckpoint: (m: CheckpointMessage) => void;
}

const STDERR_TAIL_LINES = 40;

export class WorkerProcess extends EventEmitter<{ exit: [KilnError | null]; state: [WorkerState] }> {
  state: WorkerStateName = 'starting';
  ready: ReadyMessage | null = null;
  lastState: WorkerState | null = null;
  private child: ResultPromise | null = null;
  private pending: Pending | null = null;
  private helloWaiter: { resolve: (m: ReadyMessage) => void; reject: (e: KilnError) => void } | null = null;
  private byeWaiter: (() => void) | null = null;
  private intent: 'stop' | 'kill' | null = null;
  private readonly stderrTail: string[] = [];
  private readonly messages = workerMessages();
  private seq = 0;

  constructor(
    private readonly cmd: WorkerCommand,
    private readonly log: Logger,
  ) {
    super();
  }

  get pid(): number | null {
    return this.child?.pid ?? null;
  }

  /** Spawns the worker and completes the hello/ready handshake. */
  async start(agentId: string, gpuId: string, timeoutMs: number): Promise<ReadyMessage> {
    this.assertState('starting');
    const child = execa(this.cmd.file, this.cmd.args, {
      cwd: this.cmd.cwd,
      env: this.cmd.env,
      extendEnv: true,
      stdin: 'pipe',
      stdout: 'pipe',
      stderr: 'pipe',
      reject: false,
      buffer: false,
      encoding: 'utf8',
    });
    this.child = child;
    createInterface({ input: child.stdout! }).on('line', (line) => this.onLine(line));
    createInterface({ input: child.stderr! }).on('line', (line) => {
      this.stderrTail.push(line);
      if (this.stderrTail.length > STDERR_TAIL_LINES) this.stderrTail.shift();
      this.log.debug({ worker: child.pid }, line);
    });
    child.stdin!.on('error', () => {}); // EPIPE after the worker died; the exit handler reports it
    void child.then((r) => this.onExit(r.exitCode, r.signal ?? null, r.failed && r.exitCode === undefined && !r.signal ? (r.message ?? "spawn failed") : null));

    const ready = new Promise<ReadyMessage>((resolve, reject) => (this.helloWaiter = { resolve, reject }));
    const timer = setTimeout(() => {
      this.helloWaiter?.reject(new KilnError('worker_crashed', `worker did not answer hello within ${timeoutMs} ms`));
      this.kill('SIGKILL', 'stop');
    }, timeoutMs);
    try {
      this.send({ v: PROTOCOL_VERSION, type: 'hello', id: this.nextId('hello'), agent_id: agentId, gpu_id: gpuId });
      const msg = await ready;
      this.ready = msg;
      this.lastState = msg.state;
      this.state = 'ready';
      return msg;
    } finally {
      clearTimeout(timer);
      this.helloWaiter = null;
    }
  }

  /** Sends one request; `done` settles with its final message or a classified KilnError. */
  private request<T extends FinalMessage>(
    kind: string,
    build: (id: string) => AgentToWorker,
    handlers: { onProgress?: (m: ProgressMessage) => void; onPreview?: (m: PreviewMessage) => void; onCheckpoint?: (m: CheckpointMessage) => void } = {},
  ): WorkerRequest<T> {
    this.assertState('ready');
    const id = this.nextId(kind);
    this.state = 'busy';
    let pending!: Pending;
    const done = new Promise<T>((resolve, reject) => {
      pending = { id, answered: null, resolve: resolve as (m: FinalMessage) => void, reject, onProgress: handlers.onProgress ?? (() => {}), onPreview: handlers.onPreview ?? (() => {}), onCheckpoint: handlers.onCheckpoint ?? (() => {}) };
    });
    this.pending = pending;
    this.send(build(id));
    return { id, done, onAnswer: (fn) => void (pending.answered = fn) };
  }

  /** Runs one generation; previews arrive when the request asks for them. */
  generate(msg: Omit<GenerateMessage, 'v' | 'type' | 'id'>, onProgress: (m: ProgressMessage) => void, onPreview?: (m: PreviewMessage) => void): WorkerRequest<ResultMessage> {
    return this.request(`gen-${msg.job_id}`, (id) => ({ v: PROTOCOL_VERSION, type: 'generate', id, ...msg }), { onProgress, onPreview });
  }

  /** Runs a LoRA fine-tune; checkpoints arrive as it goes. */
  train(msg: Omit<TrainMessage, 'v' | 'type' | 'id'>, onProgress: (m: ProgressMessage) => void, onCheckpoint: (m: CheckpointMessage) => void): WorkerRequest<TrainedMessage> {
    return this.request(`train-${msg.job_id}`, (id) => ({ v: PROTOCOL_VERSION, type: 'train', id, ...msg }), { onProgress, onCheckpoint });
  }

  /** Makes models resident (hot in VRAM or warm in RAM), optionally pinned. */
  load(models: string[], location: 'vram' | 'ram', pin: boolean): WorkerRequest<LoadedMessage> {
    return this.request('load', (id) => ({ v: PROTOCOL_VERSION, type: 'load', id, models, location, pin }));
  }

  /** Frees (and unpins) models. */
  unload(models: string[]): WorkerRequest<LoadedMessage> {
    return this.request('unload', (id) => ({ v: PROTOCOL_VERSION, type: 'unload', id, models }));
  }

  /** Runs the GPU check (a self-test task) with the models the worker has; progress per case. */
  selfTest(msg: Omit<SelfTestMessage, 'v' | 'type' | 'id'>, onProgress: (m: ProgressMessage) => void): WorkerRequest<SelfTestResultMessage> {
    return this.request(`selftest-${msg.job_id}`, (id) => ({ v: PROTOCOL_VERSION, type: 'self_test', id, ...msg }), { onProgress });
  }

  /** Cooperative cancel: the worker stops between steps and answers `canceled`. */
  cancel(id: string): void {
    if (this.pending?.id === id) this.send({ v: PROTOCOL_VERSION, type: 'cancel', id });
  }

  /** Kills the worker; `intent` says why, so the exit is not mistaken for a crash. */
  kill(signal: 'SIGTERM' | 'SIGKILL', intent: 'stop' | 'kill'): void {
    this.intent ??= intent;
    this.child?.kill(signal);
  }

  /** Asks the worker to exit, then escalates: shutdown → SIGTERM → SIGKILL. */
  async stop(graceMs = 5_000): Promise<void> {
    if (!this.child || this.state === 'defunct') return;
    this.intent = 'stop';
    const exited = new Promise<void>((r) => this.once('exit', () => r()));
    const bye = new Promise<void>((r) => (this.byeWaiter = r));
    this.send({ v: PROTOCOL_VERSION, type: 'shutdown', id: this.nextId('shutdown') });
    const t1 = setTimeout(() => this.child?.kill('SIGTERM'), graceMs);
    const t2 = setTimeout(() => this.child?.kill('SIGKILL'), graceMs * 2);
    await Promise.race([exited, bye.then(() => exited)]);
    clearTimeout(t1);
    clearTimeout(t2);
  }

  private nextId(kind: string): string {
    return `${kind}-${++this.seq}`;
  }

  private send(msg: AgentToWorker): void {
    if (!this.child?.stdin?.writable) return;
    this.child.stdin.write(JSON.stringify(msg) + '\n');
  }

  private onLine(line: string): void {
    if (line.trim() === '') return;
    let msg: WorkerToAgent;
    try {
      msg = this.messages.parse(JSON.parse(line));
    } catch (err) {
      // the worker guards its stdout, so anything unparseable is a broken worker
      this.log.error({ line: line.slice(0, 500) }, 'worker broke the protocol; killing it');
      this.protocolError = new KilnError('worker_protocol', 'worker wrote a line that is not a protocol message (the line is in the agent log)', { cause: err });
      this.kill('SIGKILL', 'kill');
      return;
    }
    switch (msg.type) {
      case 'ready':
        this.helloWaiter?.resolve(msg);
        return;
      case 'log':
        this.log[msg.level === 'warning' ? 'warn' : msg.level]({ request: msg.id }, msg.message);
        return;
      case 'progress':
        if (this.pending?.id === msg.id) this.pending.onProgress(msg);
        return;
      case 'preview':
        if (this.pending?.id === msg.id) this.pending.onPreview(msg);
        return;
      case 'checkpoint':
        if (this.pending?.id === msg.id) this.pending.onCheckpoint(msg);
        return;
      case 'result':
      case 'loaded':
      case 'trained':
      case 'self_test_result':
      case 'error': {
        this.lastState = msg.state ?? this.lastState;
        // listeners (metrics) run on the next turn: the agent's next request goes out first
        const state = this.lastState;
        if (state) setImmediate(() => this.emit('state', state));
        const p = this.pending;
        if (!p || p.id !== msg.id) {
          this.log.warn({ id: msg.id }, 'worker answered a request that is not in flight');
          return;
        }
        this.pending = null;
        if (this.state === 'busy') this.state = 'ready';
        try {
          p.answered?.(); // the GPU slot hands the worker to the next job here, in this call
        } catch (err) {
          this.log.error({ id: msg.id, err: (err as Error).message }, 'a request-answered hook threw');
        }
        if (msg.type === 'error') p.reject(new KilnError(msg.error.code, msg.error.message));
        else p.resolve(msg);
        return;
      }
      case 'bye':
        this.byeWaiter?.();
        return;
    }
  }

  private protocolError: KilnError | null = null;

  private onExit(code: number | undefined, signal: string | null, spawnError: string | null): void {
    const was = this.state;
    this.state = 'defunct';
    const tail = this.stderrTail.slice(-10).join('\n');
    let err: KilnError | null = null;
    if (this.protocolError) err = this.protocolError;
    else if (this.intent === 'stop' && was !== 'busy') err = null;
    else if (spawnError) err = new KilnError('worker_crashed', `worker could not start: ${spawnError}`);
    else if (this.intent === 'kill') err = new KilnError('canceled', `worker killed to stop its request (${signal ?? `exit ${code}`})`);
    else {
      const how = signal ? `signal ${signal}` : `exit code ${code}`;
      err = new KilnError('worker_crashed', `worker died (${how})`);
      this.log.error({ worker: this.child?.pid, exitCode: code, signal, stderr: tail }, `worker died (${how}); the end of its stderr is attached`);
    }
    const pendingErr = err ?? new KilnError('worker_crashed', 'worker stopped while a request was in flight');
    this.helloWaiter?.reject(pendingErr);
    this.pending?.reject(pendingErr);
    this.pending = null;
    this.byeWaiter?.();
    this.emit('exit', err);
  }

  private assertState(expected: WorkerStateName): void {
    if (this.state !== expected) throw new KilnError('internal', `worker is ${this.state}, expected ${expected}`);
  }
}
