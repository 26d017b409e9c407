import { mkdirSync } from 'node:fs';
import { resolve } from 'node:path';
import { execa, type ResultPromise } from 'execa';
import S3rver from 's3rver';

/**
 * Pieces shared by `npm start` (scripts/farm.ts) and the cross-process tests: an embedded
 * S3-compatible server, and Kiln's processes started the way an operator would start them.
 */

export const REPO_ROOT = resolve(import.meta.dirname, '..');

export const ENTRY = {
  api: resolve(REPO_ROOT, 'apps/api/src/main.ts'),
  dispatcher: resolve(REPO_ROOT, 'apps/dispatcher/src/main.ts'),
  agent: resolve(REPO_ROOT, 'apps/gpu-agent/src/main.ts'),
} as const;

export interface EmbeddedS3 {
  endpoint: string;
  /** the address it listens on: loopback only, it is for local use */
  host: string;
  /** s3rver accepts only these credentials */
  accessKey: string;
  secretKey: string;
  close(): Promise<void>;
  /** fault injection: drops every connection and stops listening (an outage); `resume` serves the same objects again on the same port */
  stop(): Promise<void>;
  resume(): Promise<void>;
}

/**
 * s3rver on loopback only: a real S3 HTTP server for local use and tests, never for a network
 * (it skips signature checks, so anyone who can reach it can read and write every object).
 */
export async function startEmbeddedS3(directory: string, port = 0): Promise<EmbeddedS3> {
  mkdirSync(directory, { recursive: true });
  const serve = async (p: number) => {
    const s = new S3rver({ address: '127.0.0.1', port: p, directory, silent: true, allowMismatchedSignatures: true });
    return { s, addr: await s.run() };
  };
  let { s: server, addr } = await serve(port);
  let running = true;
  const stop = async () => {
    if (!running) return;
    running = false;
    const closed = server.close();
    (server as unknown as { httpServer: import('node:http').Server }).httpServer.closeAllConnections();
    await closed;
  };
  return {
    endpoint: `http://127.0.0.1:${addr.port}`,
    host: addr.address,
    accessKey: 'S3RVER',
    secretKey: 'S3RVER',
    close: stop,
    stop,
    resume: async () => {
      if (running) return;
      ({ s: server, addr } = await serve(addr.port));
      running = true;
    },
  };
}

/**
 * Starts one Kiln process (TypeScript through tsx, no build step). `detached` gives it a
 * process group of its own (its workers join it), so a terminal's Ctrl-C, which signals the
 * whole foreground group, reaches only the parent, which then stops each child exactly once.
 */
export function startProcess(
  entry: string,
  env: Record<string, string>,
  stdio: 'inherit' | 'pipe' = 'inherit',
  opts: { detached?: boolean } = {},
): ResultPromise {
  return execa(process.execPath, ['--import', 'tsx', entry], {
    cwd: REPO_ROOT,
    env,
    extendEnv: true,
    detached: opts.detached ?? false,
    stdio: stdio === 'inherit' ? ['ignore', 'inherit', 'inherit'] : ['ignore', 'pipe', 'pipe'],
    reject: false,
    buffer: false,
    forceKillAfterDelay: false,
  });
}
