import { resolve } from 'node:path';
import { execa } from 'execa';
import { describe, expect, it } from 'vitest';

const here = import.meta.dirname;

/** Runs a small ESM program (TypeScript through tsx) in a process of its own. */
function run(source: string) {
  return execa(process.execPath, ['--import', 'tsx', '--input-type=module', '-e', source], {
    cwd: resolve(here, '../../..'),
    env: { LOG_FORMAT: 'json' },
    reject: false,
    timeout: 20_000,
  });
}

describe('guardProcess: the last resort for a rejection nobody handled', () => {
  it('logs what escaped as one JSON line and keeps the process running', async () => {
    const r = await run(`
      import { createLogger } from '${resolve(here, 'logger.ts')}';
      import { guardProcess } from '${resolve(here, 'shutdown.ts')}';
      guardProcess(createLogger('test'));
      Promise.reject(new Error('a background upload failed'));
      setTimeout(() => { console.log('still running'); }, 200);
    `);
    expect(r.exitCode, r.stderr).toBe(0);
    const lines = r.stdout.split('\n').filter(Boolean);
    const logged = JSON.parse(lines.find((l) => l.includes('unhandled rejection'))!);
    expect(logged).toMatchObject({ level: 50, name: 'test', err: { message: 'a background upload failed' } });
    expect(lines.at(-1)).toBe('still running');
    expect(r.stderr).toBe('');
  });
});
