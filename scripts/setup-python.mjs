#!/usr/bin/env node
// Prepares the Python worker's virtual environment; run by `npm install` (root postinstall).
//
// 1. KILN_SKIP_PYTHON_SETUP=1 → do nothing (e.g. the API's Docker image has no Python).
// 2. Create workers-py/.venv with `$PYTHON -m venv` (python3 by default) unless it exists.
// 3. pip install the base and dev requirements, unless the stamp in the venv records the
//    sha256 of both requirement files and they have not changed since.
// Idempotent: a second run with unchanged requirements only checks the stamp.
import { spawnSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { existsSync, readFileSync, writeFileSync, rmSync } from 'node:fs';
import { dirname, join, relative } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const workerDir = join(root, 'workers-py');
const venv = join(workerDir, '.venv');
const venvPython = process.platform === 'win32' ? join(venv, 'Scripts', 'python.exe') : join(venv, 'bin', 'python');
const requirements = [join(workerDir, 'requirements.txt'), join(workerDir, 'requirements-dev.txt')];
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

if (process.env.KILN_SKIP_PYTHON_SETUP === '1') {
  say('KILN_SKIP_PYTHON_SETUP=1: skipping the Python worker setup');
  process.exit(0);
}

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
  say('requirements unchanged since the last install; skipping pip');
  process.exit(0);
}

say('installing the worker requirements');
const args = ['-m', 'pip', 'install', '--retries', '0', '--disable-pip-version-check'];
for (const file of requirements) args.push('-r', relative(root, file));
const installed = run(venvPython, args);
if (!installed.ok) {
  rmSync(stampPath, { force: true });
  fail(`pip install failed (${installed.why}); fix the error above and run \`node scripts/setup-python.mjs\` again.`);
}
writeFileSync(stampPath, wanted + '\n');
say(`done: ${relative(root, venvPython)}`);
