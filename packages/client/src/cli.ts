// The kiln command.
//  1. Parse the command line (commander); KILN_URL and KILN_API_KEY come from the environment.
//  2. Run the command through the typed client; --json prints the API's records as they are.
//  3. With --wait, follow the job's live events with a progress bar on stderr (a terminal) or a
//     line per state change (otherwise), then download its outputs.
//  Exit codes: 0 done, 1 the API refused or the job did not succeed, 2 a bad command line.
import { mkdirSync, readdirSync, readFileSync, statSync, writeFileSync } from 'node:fs';
import { basename, extname, join } from 'node:path';
import cliProgress from 'cli-progress';
import { Command, CommanderError, InvalidArgumentError, Option } from 'commander';
import { type GenerationInput, type Job, KilnApiError, KilnClient, type KilnEvent, type UploadInput } from './index.js';

interface Io {
  out: (s: string) => void;
  err: (s: string) => void;
  /** is stderr a terminal (draw a progress bar) */
  tty: boolean;
}

const int = (name: string) => (v: string) => {
  if (!/^\d+$/.test(v)) throw new InvalidArgumentError(`${name} must be a whole number`);
  return Number(v);
};
const num = (name: string) => (v: string) => {
  const n = Number(v);
  if (!Number.isFinite(n)) throw new InvalidArgumentError(`${name} must be a number`);
  return n;
};
const collect = (v: string, all: string[]) => [...all, v];

const IMAGE_TYPES: Record<string, UploadInput['content_type']> = {
  '.png': 'image/png',
  '.jpg': 'image/jpeg',
  '.jpeg': 'image/jpeg',
  '.webp': 'image/webp',
  '.txt': 'text/plain',
  '.json': 'application/json',
};

/** Runs the kiln command; answers its exit code. */
export async function main(argv: string[], io: Io = { out: (s) => process.stdout.write(s), err: (s) => process.stderr.write(s), tty: !!process.stderr.isTTY }): Promise<number> {
  let code = 0;
  const program = new Command('kiln')
    .description("Kiln's command line: submit, follow and fetch jobs on a Kiln farm")
    .option('--url <url>', 'the API (default: KILN_URL, else http://127.0.0.1:8080)')
    .option('--key <key>', 'an API key (default: KILN_API_KEY)')
    .option('--json', 'print the API records as JSON, for scripts')
    .exitOverride()
    .configureOutput({ writeOut: io.out, writeErr: io.err })
    .showHelpAfterError();
  const client = () => new KilnClient({ url: program.opts().url, apiKey: program.opts().key });
  const json = () => !!program.opts().json;
  const print = (value: unknown, human: () => string) => io.out(`${json() ? JSON.stringify(value, null, 2) : human()}\n`);
  const fail = (message: string) => {
    io.err(`kiln: ${message}\n`);
    code = 1;
  };

  /** Follows a job to its end with a progress bar (or lines), then downloads its outputs. */
  async function follow(c: KilnClient, job: Job, out: string | undefined): Promise<Job> {
    const bar = io.tty && !json() ? new cliProgress.SingleBar({ stream: process.stderr, format: ' {stage} |{bar}| {value}/{total} {unit} · {status}', hideCursor: true, clearOnComplete: false }, cliProgress.Presets.shades_classic) : null;
    let stage = job.stage;
    let status: string = job.status;
    bar?.start(1, 0, { stage: pad(stage), status, unit: 'steps' });
    let preview: string | null = null;
    const onEvent = (e: KilnEvent) => {
      if (e.event === 'preview' && out !== undefined) {
        // the latest one only, overwritten as the image forms: open it in a viewer that reloads
        mkdirSync(out, { recursive: true });
        preview = join(out, `${job.id}-preview.${e.data.content_type.split('/')[1] === 'jpeg' ? 'jpg' : e.data.content_type.split('/')[1]}`);
        writeFileSync(preview, Buffer.from(e.data.data, 'base64'));
      } else if (e.event === 'state' && 'stage' in e.data) {
        status = e.data.status;
        stage = e.data.stage;
        if (bar) bar.update({ stage: pad(stage), status });
        else if (!json()) io.err(`${new Date(e.data.at).toLocaleTimeString()} ${e.data.status} · ${e.data.stage}${e.data.agent ? ` on ${e.data.agent}` : ''}${e.data.message ? ` · ${e.data.message}` : ''}\n`);
      } else if (e.event === 'progress' && 'step' in e.data) {
        const p = e.data as { stage: string; step: number; total: number; loss?: number };
        if (bar) {
          bar.setTotal(p.total);
          bar.update(p.step, { stage: pad(p.stage), status: p.loss !== undefined ? `loss ${p.loss.toFixed(4)}` : status });
        }
      }
    };
    const done = await c.wait(job.id, { onEvent });
    if (bar) {
      if (done.status === 'succeeded') bar.update(bar.getTotal(), { stage: pad(done.stage), status: done.status });
      else bar.update({ stage: pad(done.stage), status: done.status });
      bar.stop();
    }
    if (preview && !json()) io.err(`latest preview in ${preview}\n`);
    if (out !== undefined && done.outputs.length) {
      mkdirSync(out, { recursive: true });
      for (const o of done.outputs) {
        const file = join(out, `${done.id}-${o.index}.${o.content_type.split('/')[1] === 'jpeg' ? 'jpg' : o.content_type.split('/')[1]}`);
        writeFileSync(file, await c.download(o.url));
        if (!json()) io.err(`saved ${file}\n`);
      }
    }
    return done;
  }

  const summary = (j: Job) =>
    [
      `${j.id}  ${j.kind}  ${j.status}${j.status === 'running' ? ` (${j.stage}${j.progress ? ` ${j.progress.step}/${j.progress.total}` : ''})` : ''}${j.queue?.position != null ? `  #${j.queue.position} in queue` : ''}${j.queue?.eta_s != null ? `  ~${j.queue.eta_s}s` : ''}`,
      j.error ? `  error: ${j.error.code}: ${j.error.message}` : null,
      ...j.outputs.map((o) => `  output ${o.index}: ${o.width}×${o.height} seed ${o.seed} ${o.url}`),
      j.kind === 'training' && j.training ? `  training: step ${j.training.step}/${j.training.total}${j.training.loss !== null ? ` loss ${j.training.loss.toFixed(4)}` : ''}${j.training.lora ? ` → LoRA ${j.training.lora.name}` : ''}` : null,
    ]
      .filter((l) => l !== null)
      .join('\n');
  const ended = (j: Job) => {
    if (j.status !== 'succeeded') code = 1;
    print(j, () => summary(j));
  };

  program
    .command('submit')
    .description('submit a generation (flags for the common fields, or a JSON request with --file)')
    .argument('[prompt]', 'the prompt')
    .option('-f, --file <request.json>', 'a whole request (flags override its fields)')
    .option('-m, --model <base>', 'the base model', undefined)
    .option('--refiner <model>', 'a refiner model')
    .option('--negative <text>', 'the negative prompt')
    .option('--steps <n>', 'denoising steps', int('--steps'))
    .option('--scheduler <name>', 'a scheduler class or alias (e.g. "DPM++ 2M Karras")')
    .option('--guidance <scale>', 'guidance scale', num('--guidance'))
    .option('--seed <n>', 'the seed', int('--seed'))
    .option('--size <WxH>', 'width×height, e.g. 1024x1024')
    .option('-n, --images <n>', 'images per request', int('--images'))
    .option('--lora <name[:weight]>', 'a LoRA (repeatable)', collect, [])
    .option('--format <fmt>', 'png, jpeg or webp')
    .addOption(new Option('--priority <p>', 'priority').choices(['low', 'normal', 'high']))
    .option('--idempotency-key <key>', 'a repeat with the same key returns the same job')
    .option('-w, --wait', 'follow it live to its end and download the outputs')
    .option('-o, --out <dir>', 'where --wait saves the outputs', '.')
    .option('--previews <n>', 'ask for a live preview every n steps; --wait keeps the latest in <out>/<id>-preview.webp', int('--previews'))
    .action(async (prompt: string | undefined, o) => {
      const base: Record<string, any> = o.file ? JSON.parse(readFileSync(o.file, 'utf8')) : {};
      const request = { ...base } as Record<string, any>;
      const set = (path: string[], value: unknown) => {
        if (value === undefined) return;
        let at = request;
        for (const k of path.slice(0, -1)) at = at[k] = { ...(at[k] ?? {}) };
        at[path.at(-1)!] = value;
      };
      set(['model', 'base'], o.model ?? (request.model?.base ? undefined : 'stabilityai/stable-diffusion-xl-base-1.0'));
      set(['model', 'refiner'], o.refiner);
      set(['conditioning', 'prompt'], prompt);
      set(['conditioning', 'negative_prompt'], o.negative);
      set(['scheduler', 'steps'], o.steps);
      set(['scheduler', 'type'], o.scheduler);
      set(['hyperparameters', 'guidance_scale'], o.guidance);
      set(['hyperparameters', 'seed'], o.seed);
      set(['hyperparameters', 'num_images'], o.images);
      if (o.size) {
        const m = /^(\d+)[x×](\d+)$/.exec(o.size);
        if (!m) throw new InvalidArgumentError('--size must be WIDTHxHEIGHT, e.g. 1024x1024');
        set(['hyperparameters', 'width'], Number(m[1]));
        set(['hyperparameters', 'height'], Number(m[2]));
      }
      if (o.lora.length) request.loras = o.lora.map((l: string) => ({ name: l.replace(/:[-\d.]+$/, ''), weight: /:([-\d.]+)$/.test(l) ? Number(/:([-\d.]+)$/.exec(l)![1]) : 1 }));
      set(['output', 'format'], o.format);
      if (o.previews !== undefined) request.output = { ...request.output, previews: { ...request.output?.previews, every_n_steps: o.previews } };
      set(['priority'], o.priority);
      if (!request.conditioning?.prompt) throw new InvalidArgumentError('a prompt is needed: kiln submit "a lighthouse at dusk"');
      const c = client();
      const job = await c.submit(request as GenerationInput, { idempotencyKey: o.idempotencyKey });
      if (!o.wait) return print(job, () => summary(job));
      if (!json()) io.err(`submitted ${job.id}\n`);
      ended(await follow(c, job, o.out));
    });

  program
    .command('get')
    .description("a job's record")
    .argument('<id>')
    .action(async (id: string) => {
      const j = await client().get(id);
      print(j, () => summary(j));
    });

  program
    .command('ls')
    .description('your jobs, newest first')
    .option('--status <s>', 'queued, running, succeeded, failed, canceled (comma-separated)')
    .addOption(new Option('--kind <k>', 'generation, training, cache or self_test').choices(['generation', 'training', 'cache', 'self_test']))
    .option('--batch <id>', "a batch's jobs")
    .option('--limit <n>', 'how many', int('--limit'), 20)
    .action(async (o) => {
      const c = client();
      const jobs: Job[] = [];
      for await (const j of c.listAll({ status: o.status, kind: o.kind, batch: o.batch, limit: Math.min(100, o.limit) })) {
        jobs.push(j);
        if (jobs.length >= o.limit) break;
      }
      print(jobs, () => (jobs.length ? jobs.map((j) => `${j.id}  ${j.created_at}  ${j.kind.padEnd(10)} ${j.status.padEnd(9)} ${j.kind === 'generation' ? j.request.conditioning.prompt.slice(0, 40) : j.kind === 'training' ? j.request.output.name : ''}`).join('\n') : 'no jobs'));
    });

  program
    .command('cancel')
    .description('cancel a job')
    .argument('<id>')
    .action(async (id: string) => {
      const j = await client().cancel(id);
      print(j, () => `${j.id}  ${j.status}${j.cancel_requested && j.status === 'running' ? ' (cancel requested)' : ''}`);
    });

  program
    .command('retry')
    .description('a new job with an ended job\'s request')
    .argument('<id>')
    .option('-w, --wait', 'follow it to its end')
    .option('-o, --out <dir>', 'where --wait saves the outputs', '.')
    .action(async (id: string, o) => {
      const c = client();
      const j = await c.retry(id);
      if (!o.wait) return print(j, () => `${j.id}  retry of ${j.retry_of}  ${j.status}`);
      ended(await follow(c, j, o.out));
    });

  program
    .command('wait')
    .description('follow a job live to its end')
    .argument('<id>')
    .option('-o, --out <dir>', 'save its outputs here')
    .action(async (id: string, o) => {
      const c = client();
      ended(await follow(c, await c.get(id), o.out));
    });

  program
    .command('agents')
    .description('the live agents')
    .action(async () => {
      const agents = await client().agents();
      print(agents, () =>
        agents.length
          ? agents.map((a) => `${a.agent_id.padEnd(16)} ${a.state.padEnd(8)} ${a.gpu.name} ${a.gpu.vram_free_mb}/${a.gpu.vram_total_mb} MB free  resident: ${a.resident.map((r) => r.name).join(', ') || '—'}`).join('\n')
          : 'no live agents',
      );
    });

  program
    .command('models')
    .description('the models the live agents can run')
    .action(async () => {
      const models = await client().models();
      print(models, () => models.map((m) => `${m.name.padEnd(48)} ${m.kind.padEnd(10)} ${String(m.vram_mb).padStart(6)} MB  on ${m.agents.join(', ')}${m.resident_on.length ? `  (resident: ${m.resident_on.join(', ')})` : ''}`).join('\n'));
    });

  program
    .command('queue')
    .description('what waits, what runs it, how long until done')
    .action(async () => {
      const q = await client().queue();
      print(q, () =>
        [
          `waiting: ${q.waiting} (high ${q.by_priority.high}, normal ${q.by_priority.normal}, low ${q.by_priority.low})`,
          `agents: ${q.agents.busy} busy, ${q.agents.idle} idle, ${q.agents.unavailable} unavailable`,
          `drains in: ${q.drain_s === null ? 'unknown' : `~${q.drain_s}s`}`,
          ...Object.entries(q.by_model).map(([m, n]) => `  ${m}: ${n}`),
        ].join('\n'),
      );
    });

  program
    .command('upload')
    .description('put a file (input image, caption, manifest) in your area of the bucket; prints its s3_key')
    .argument('<file>')
    .option('--path <path>', 'its name under your uploads (default: a new one)')
    .action(async (file: string, o) => {
      const type = IMAGE_TYPES[extname(file).toLowerCase()];
      if (!type) throw new InvalidArgumentError(`${file}: upload PNG, JPEG or WebP images, .txt captions or .json manifests`);
      const up = await client().upload(readFileSync(file), { contentType: type, path: o.path });
      print(up, () => up.s3_key);
    });

  program
    .command('train')
    .description('fine-tune a LoRA on a folder of images with same-named .txt captions (uploaded first), or on a dataset already in the bucket')
    .requiredOption('--name <name>', 'the LoRA (generations use it by this name)')
    .option('--dataset <dir>', 'a local folder: 1.png + 1.txt, …')
    .option('--prefix <s3_prefix>', 'a dataset already in the bucket')
    .option('-m, --base <model>', 'the base model', 'stabilityai/stable-diffusion-xl-base-1.0')
    .option('--steps <n>', 'training steps', int('--steps'))
    .option('--rank <n>', 'LoRA rank', int('--rank'))
    .option('--resolution <px>', 'training resolution', int('--resolution'))
    .option('--lr <rate>', 'learning rate', num('--lr'))
    .option('--seed <n>', 'the seed', int('--seed'))
    .option('-w, --wait', 'follow it live to its end')
    .action(async (o) => {
      const c = client();
      if (!o.dataset === !o.prefix) throw new InvalidArgumentError('give --dataset <dir> or --prefix <s3_prefix>');
      let prefix: string = o.prefix;
      if (o.dataset) {
        const files = readdirSync(o.dataset).filter((f) => IMAGE_TYPES[extname(f).toLowerCase()] && statSync(join(o.dataset, f)).isFile());
        if (!files.length) throw new InvalidArgumentError(`${o.dataset}: no images or captions in it`);
        for (const f of files) {
          const up = await c.upload(readFileSync(join(o.dataset, f)), { contentType: IMAGE_TYPES[extname(f).toLowerCase()]!, path: `datasets/${o.name}/${basename(f)}` });
          prefix = up.s3_key.slice(0, up.s3_key.lastIndexOf('/') + 1);
          if (!json()) io.err(`uploaded ${f}\n`);
        }
      }
      const hp = Object.fromEntries(Object.entries({ steps: o.steps, rank: o.rank, resolution: o.resolution, learning_rate: o.lr, seed: o.seed }).filter(([, v]) => v !== undefined));
      const job = await c.train({ base_model: o.base, dataset: { s3_prefix: prefix }, output: { name: o.name }, hyperparameters: hp });
      if (!o.wait) return print(job, () => summary(job));
      if (!json()) io.err(`training ${job.id}\n`);
      ended(await follow(c, job, undefined));
    });

  program
    .command('self-test')
    .description('run the GPU check (environment, model files, benchmark) in the workers of agents (admin key)')
    .option('-a, --agent <id>', 'an agent (repeat for more; default: every live agent)', collect, [])
    .option('--checks <list>', 'environment, models, benchmark (comma-separated; default: all)')
    .option('--size <px>', 'benchmark image side', int('--size'))
    .option('--steps <n>', 'benchmark steps per case', int('--steps'))
    .option('--scheduler <class>', 'a benchmark scheduler (repeat for more; default: all)', collect, [])
    .option('--timeout <s>', 'per agent', int('--timeout'))
    .option('-w, --wait', 'wait for every agent and print the verdicts (exit 1 on a fail)')
    .action(async (o) => {
      const c = client();
      const benchmark = Object.fromEntries(Object.entries({ size: o.size, steps: o.steps, schedulers: o.scheduler.length ? o.scheduler : undefined }).filter(([, v]) => v !== undefined));
      const group = await c.selfTest({
        agents: o.agent.length ? o.agent : 'all',
        ...(o.checks ? { checks: o.checks.split(',').map((s: string) => s.trim()) } : {}),
        benchmark,
        ...(o.timeout ? { timeout_s: o.timeout } : {}),
      });
      if (!o.wait) return print(group, () => `${group.id}  self-test on ${group.children.map((t) => t.agent).join(', ')}`);
      if (!json()) io.err(`self-test ${group.id} on ${group.children.map((t) => t.agent).join(', ')}\n`);
      let now = group;
      while (!['succeeded', 'failed', 'partially_succeeded', 'canceled'].includes(now.status)) {
        await new Promise((r) => setTimeout(r, 1_000));
        now = await c.getSelfTest(group.id);
      }
      const tasks = await Promise.all(now.children.map((t) => c.get(t.id)));
      const reports = tasks.map((t) => ({ agent: t.agent, status: t.status, error: t.error, report: t.kind === 'self_test' ? (t.self_test?.report ?? null) : null }));
      if (reports.some((r) => r.report?.verdict !== 'pass')) code = 1;
      print(reports, () =>
        reports
          .map(({ agent, status, error, report }) => {
            if (!report) return `${agent}: ${status}${error ? ` (${error.code}: ${error.message})` : ''}`;
            const b = report.benchmark;
            const lines = [`${agent}: ${report.verdict.toUpperCase()} (${report.backend}${b ? `, benchmark ${b.mode}` : ''})`];
            for (const r of report.reasons) lines.push(`  - ${r}`);
            if (b?.note) lines.push(`  note: ${b.note}`);
            for (const r of b?.rows ?? []) lines.push(`  ${r.case.padEnd(56)} ${r.ok === null ? `skipped: ${r.skipped}` : r.ok ? `${r.wall_ms} ms` : `FAILED: ${r.error}`}`);
            return lines.join('\n');
          })
          .join('\n'),
      );
    });

  try {
    await program.parseAsync(argv);
  } catch (err) {
    if (err instanceof CommanderError) return err.exitCode === 0 ? 0 : 2; // help, version, or a usage error (already printed)
    if (err instanceof InvalidArgumentError) {
      io.err(`kiln: ${err.message}\n`);
      return 2;
    }
    if (err instanceof KilnApiError) {
      fail(`${err.status} ${err.code}: ${err.message}`);
      for (const d of err.details) if (d.message !== err.message) io.err(`  ${d.field || '(body)'}: ${d.message} [${d.rule}]\n`);
      return code;
    }
    const e = err as NodeJS.ErrnoException;
    fail(e.cause ? `${e.message}: ${(e.cause as Error).message}` : e.message);
  }
  return code;
}

const pad = (s: string) => s.padEnd(13);
