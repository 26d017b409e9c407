// `npm test`: every test Kiln has, in one command.
//  1. typecheck (tsc, strict)
//  2. pytest for the Python worker (workers-py/.venv, made by `npm install`)
//  3. vitest: unit tests and the cross-process farm tests (real Redis, S3 server, workers)
// Prints one closing line, "kiln: N passed, N failed, N skipped", and exits non-zero on any failure.
import { spawnSync } from 'node:child_process';
import { existsSync, mkdirSync, readFileSync } from 'node:fs';
import { resolve } from 'node:path';

const root = resolve(import.meta.dirname, '..');
const out = resolve(root, '.kiln');
mkdirSync(out, { recursive: true });
const python = resolve(root, 'workers-py/.venv/bin/python');
const extra = process.argv.slice(2);

function run(title, cmd, args) {
  process.stdout.write(`\n== ${title}: ${cmd} ${args.join(' ')}\n`);
  const r = spawnSync(cmd, args, { cwd: root, stdio: 'inherit', env: process.env });
  return r.status ?? 1;
}

const totals = { passed: 0, failed: 0, skipped: 0 };
const failures = [];

if (run('typecheck', process.execPath, [resolve(root, 'node_modules/typescript/bin/tsc'), '--noEmit', '-p', 'tsconfig.json']) !== 0) {
  totals.failed += 1;
  failures.push('typecheck');
}

if (!existsSync(python)) {
  process.stderr.write(`workers-py/.venv is missing: run \`npm install\` (it runs scripts/setup-python.mjs)\n`);
  totals.failed += 1;
  failures.push('python venv');
} else {
  const xml = resolve(out, 'pytest.xml');
  const code = run('pytest', python, ['-m', 'pytest', 'workers-py', '-q', `--junitxml=${xml}`]);
  if (existsSync(xml)) {
    const head = readFileSync(xml, 'utf8').match(/<testsuite [^>]*>/)?.[0] ?? '';
    const n = (k) => Number(head.match(new RegExp(`${k}="(\\d+)"`))?.[1] ?? 0);
    const failed = n('failures') + n('errors');
    totals.failed += failed;
    totals.skipped += n('skipped');
    totals.passed += n('tests') - failed - n('skipped');
  }
  if (code !== 0 && code !== 5) failures.push('pytest');
}

const report = resolve(out, 'vitest-report.json');
const vcode = run('vitest', process.execPath, [
  resolve(root, 'node_modules/vitest/vitest.mjs'),
  'run',
  '--reporter=default',
  '--reporter=json',
  `--outputFile.json=${report}`,
  ...extra,
]);
if (existsSync(report)) {
  const r = JSON.parse(readFileSync(report, 'utf8'));
  totals.passed += r.numPassedTests;
  totals.failed += r.numFailedTests;
  totals.skipped += r.numPendingTests + r.numTodoTests;
  if (r.numFailedTestSuites > 0 && r.numFailedTests === 0) totals.failed += r.numFailedTestSuites; // a suite that failed to start
}
if (vcode !== 0) failures.push('vitest');

process.stdout.write(`\n${failures.length ? `failed: ${failures.join(', ')}\n` : ''}`);
process.stdout.write(`kiln: ${totals.passed} passed, ${totals.failed} failed, ${totals.skipped} skipped\n`);
process.exit(failures.length || totals.failed ? 1 : 0);
