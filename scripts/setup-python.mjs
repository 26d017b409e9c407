#!/usr/bin/env node
// Prepares the Python worker's virtual environment; run by `npm install` (root postinstall) and by
// `npm run setup:diffusers`.
//
// 1. KILN_SKIP_PYTHON_SETUP=1 → do nothing (e.g. the API's Docker image has no Python).
// 2. Create workers-py/.venv with `$PYTHON -m venv` (python3 by default) unless it exists.
// 3. pip install the base and dev requirements (numpy, Pillow, OpenCV, jsonschema, pytest: all the
//    synthetic backend needs; no torch).
// 4. With the diffusers extras (`--extras diffusers`, or KILN_WORKER_EXTRAS=diffusers, which
//    .ci/run sets): pip install the `torch` and `torchvision` pins of requirements-diffusers.txt on
//    their own FIRST, then the whole file. Installed the other way round, pip resolves torch for
//    diffusers/peft/spandrel itself and picks the newest CUDA build (several GB) instead of the
//    pinned one (see the file's header).
// Idempotent: a stamp in the venv records the sha256 of the requirement files installed; a second
// run with unchanged files skips pip. A plain run after an extras run leaves the extras installed.
import { spawnSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { existsSync, readFileSync, writeFileSync, rmSync } from 'node:fs';
import { dirname, join, relative } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const workerDir = join(root, 'workers-py');
const venv = join(workerDir, '.venv');
const venvPython = process.platform === 'win32' ? join(venv, 'Scripts', 'python.exe') : join(venv, 'bin', 'python');
const baseRequirements = [join(workerDir, 'requirements.txt'), join(workerDir, 'requirements-dev.txt')];
const EXTRAS = { diffusers: join(workerDir, 'requirements-diffusers.txt') };
// installed alone, before the rest of an extras file, in this order
const INSTALL_FIRST = ['torch', 'torchvision'];
const stampPath = join(venv, '.kiln-requirements.sha256');

function say(message) {
  console.log(`[setup-python] ${message}`);
}

function fail(message) {
  console.error(`[setup-python] ERROR: ${message}`);
  process.exit(1);
}

function run(command, args) {
  say(`$ ${command} ${args.join(' ')}`);
  const res = spawnSync(command, args, { cwd: root, stdio: 'inherit' });
  if (res.error) return { ok: false, why: res.error.message };
  if (res.status !== 0) return { ok: false, why: `exited with ${res.status ?? `signal ${res.signal}`}` };
  return { ok: true };
}

/** The extras asked for: `--extras a,b` (or `--extras=a,b`) wins over KILN_WORKER_EXTRAS. */
function wantedExtras() {
  const argv = process.argv.slice(2);
  let raw = process.env.KILN_WORKER_EXTRAS ?? '';
  for (let i = 0; i < argv.length; i++) {
    if (argv[i] === '--extras') raw = argv[i + 1] ?? '';
    else if (argv[i].startsWith('--extras=')) raw = argv[i].slice('--extras='.length);
  }
  const names = raw.split(',').map((s) => s.trim()).filter((s) => s && s !== 'none');
  const unknown = names.filter((n) => !(n in EXTRAS));
  if (unknown.length) fail(`unknown extras ${unknown.join(', ')} (KILN_WORKER_EXTRAS / --extras); known: ${Object.keys(EXTRAS).join(', ')}`);
  return [...new Set(names)];
}

/** The `name==version` lines of a requirements file for the packages in INSTALL_FIRST, in that order. */
function firstPins(file) {
  const lines = readFileSync(file, 'utf8').split('\n').map((l) => l.replace(/#.*/, '').trim()).filter(Boolean);
  const pins = [];
  for (const name of INSTALL_FIRST) {
    const line = lines.find((l) => l.split(/[=<>!~ ;[]/)[0].toLowerCase() === name);
    if (line) {
      if (!/==/.test(line)) fail(`${relative(root, file)}: ${name} must be pinned with == (found "${line}")`);
      pins.push(line);
    }
  }
  return pins;
}

if (process.env.KILN_SKIP_PYTHON_SETUP === '1') {
  say('KILN_SKIP_PYTHON_SETUP=1: skipping the Python worker setup');
  process.exit(0);
}

const extras = wantedExtras();
const extraFiles = extras.map((n) => EXTRAS[n]);
const requirements = [...baseRequirements, ...extraFiles];
for (const file of requirements) {
  if (!existsSync(file)) fail(`missing ${relative(root, file)}`);
}
const digest = createHash('sha256');
for (const file of requirements) {
  digest.update(relative(root, file)).update('\0').update(readFileSync(file)).update('\0');
}
const wanted = digest.digest('hex');

if (!existsSync(venvPython)) {
  const python = process.env.PYTHON || 'python3';
  say(`creating ${relative(root, venv)} with ${python}`);
  const made = run(python, ['-m', 'venv', venv]);
  if (!made.ok) {
    rmSync(venv, { recursive: true, force: true });
    fail(`could not create the venv with "${python}" (${made.why}). Install Python 3.11+ with the venv module, or set PYTHON to its path, or KILN_SKIP_PYTHON_SETUP=1 to skip.`);
  }
} else {
  say(`${relative(root, venv)} exists`);
}

const stamp = existsSync(stampPath) ? readFileSync(stampPath, 'utf8').trim() : '';
if (stamp === wanted) {
  say(`requirements unchanged since the last install${extras.length ? ` (with ${extras.join(', ')})` : ''}; skipping pip`);
  process.exit(0);
}

const pip = ['-m', 'pip', 'install', '--retries', '0', '--disable-pip-version-check'];
function install(args, what) {
  const started = Date.now();
  const done = run(venvPython, [...pip, ...args]);
  if (!done.ok) {
    rmSync(stampPath, { force: true });
    fail(`pip install failed (${done.why}) while installing ${what}; fix the error above and run \`node scripts/setup-python.mjs${extras.length ? ` --extras ${extras.join(',')}` : ''}\` again.`);
  }
  say(`installed ${what} in ${((Date.now() - started) / 1000).toFixed(1)} s`);
}

say('installing the worker requirements');
install(baseRequirements.flatMap((f) => ['-r', relative(root, f)]), 'the worker requirements');
for (const [i, name] of extras.entries()) {
  const file = extraFiles[i];
  const first = firstPins(file);
  if (first.length) install(first, `${first.join(' ')} (first, on their own)`);
  install(['-r', relative(root, file)], `the ${name} extras (${relative(root, file)})`);
}
writeFileSync(stampPath, wanted + '\n');
say(`done: ${relative(root, venvPython)}${extras.length ? ` with ${extras.join(', ')}` : ''}`);
