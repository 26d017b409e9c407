import { spawnSync } from 'node:child_process';
import { existsSync, readFileSync } from 'node:fs';
import { resolve } from 'node:path';
import { describe, expect, it } from 'vitest';
import { parse } from 'yaml';
import { REPO_ROOT } from '../scripts/farm-lib.js';

/**
 * docker-compose.yml against the README, and the observability profile against what it
 * provisions — checked by parsing, since `docker compose config` needs a compose plugin a
 * machine may not have; where one is installed (the plugin or docker-compose), it runs too.
 */
const read = (path: string) => readFileSync(resolve(REPO_ROOT, path), 'utf8');
const compose = parse(read('docker-compose.yml'), { merge: true }) as { services: Record<string, any>; volumes: Record<string, unknown> };
const composeText = read('docker-compose.yml');
const readme = read('README.md');

/** The README's configuration table: variable → its documented default and its whole row. */
function documented(): Map<string, { def: string; row: string }> {
  const table = readme.split('\n## Configuration\n')[1]!.split('\n## ')[0]!;
  const out = new Map<string, { def: string; row: string }>();
  for (const line of table.split('\n')) {
    const cells = line.split(' | ').map((c) => c.replace(/^\|\s*|\s*\|$/g, '').trim());
    if (cells.length < 4 || !cells[0]!.startsWith('`')) continue;
    const vars = [...cells[0]!.matchAll(/`([A-Z0-9_]+)`/g)].map((m) => m[1]!);
    const defs = vars.length > 1 ? cells[2]!.split(/,\s*/) : [cells[2]!];
    vars.forEach((v, i) => out.set(v, { def: (defs[i] ?? '').replace(/`/g, '').trim(), row: line }));
  }
  return out;
}

/** Every default compose gives a variable: `${VAR:-default}` anywhere, and each literal value a service's environment sets. */
function composeDefaults(): { name: string; value: string; where: string }[] {
  const out: { name: string; value: string; where: string }[] = [];
  for (const m of composeText.matchAll(/\$\{([A-Z0-9_]+):-([^}]*)\}/g)) out.push({ name: m[1]!, value: m[2]!, where: m[0] });
  for (const [service, s] of Object.entries(compose.services)) {
    for (const [name, raw] of Object.entries<unknown>(s.environment ?? {})) {
      const value = String(raw);
      if (!value.includes('${')) out.push({ name, value, where: `${service}.environment.${name}` });
    }
  }
  return out;
}

describe('docker-compose.yml matches the README', () => {
  const docs = documented();

  it('every variable it sets or substitutes is in the configuration table (services’ own images aside)', () => {
    const theirs = /^(MINIO_ROOT_|GF_)/;
    const missing = [...new Set(composeDefaults().map((d) => d.name))].filter((n) => !theirs.test(n) && !docs.has(n));
    expect(missing).toEqual([]);
  });

  it('every default equals the documented one, unless the README row says what compose uses instead', () => {
    const differ: string[] = [];
    for (const d of composeDefaults()) {
      const doc = docs.get(d.name);
      if (!doc || d.value === '') continue; // empty: unset, so the process's own default applies
      if (d.value === doc.def) continue;
      // the README names compose's value in that row (e.g. "compose: `redis://redis:6379`")
      if (/compose/.test(doc.row) && doc.row.includes(`\`${d.value}\``)) continue;
      differ.push(`${d.where}: compose ${JSON.stringify(d.value)}, README ${JSON.stringify(doc.def)}`);
    }
    expect(differ).toEqual([]);
  });

  it('the body limit is the documented 48 MiB, room for base64 images (the issue compose users hit)', () => {
    expect(compose.services.api.environment.BODY_LIMIT_BYTES).toBe(`${'${'}BODY_LIMIT_BYTES:-${48 * 1024 * 1024}}`);
    expect(docs.get('BODY_LIMIT_BYTES')?.def).toBe(String(48 * 1024 * 1024));
  });
});

/** `docker compose` or `docker-compose`, whichever answers; null if neither is installed. */
function composeCli(): string[] | null {
  for (const cmd of [['docker', 'compose'], ['docker-compose']]) {
    if (spawnSync(cmd[0]!, [...cmd.slice(1), 'version'], { stdio: 'ignore' }).status === 0) return cmd;
  }
  return null;
}
const cli = composeCli();

describe('the observability profile', () => {
  // CI installs a compose CLI (.ci/run), so there a missing one fails instead of skipping
  it.skipIf(!cli && !process.env.CI)('`docker compose config` accepts the file with the profile', () => {
    expect(cli, 'no `docker compose` or `docker-compose` on PATH (CI installs Debian\'s docker-compose)').not.toBeNull();
    const run = spawnSync(cli![0]!, [...cli!.slice(1), '--profile', 'observability', 'config', '-q'], {
      cwd: REPO_ROOT,
      env: { ...process.env, WEBHOOK_SECRET: `whsec_${Buffer.from('compose-config-test-key-0123').toString('base64')}` },
      encoding: 'utf8',
    });
    expect(run.status, run.stderr).toBe(0);
  });

  const prom = parse(read('observability/prometheus.yml')) as { scrape_configs: { job_name: string; static_configs: { targets: string[] }[] }[] };
  const dashboard = JSON.parse(read('observability/grafana/kiln.json')) as { uid: string; panels: any[] };
  const datasources = parse(read('observability/grafana/datasources.yml')) as { datasources: { uid: string; url: string; type: string }[] };
  const providers = parse(read('observability/grafana/dashboards.yml')) as { providers: { options: { path: string } }[] };

  it('adds Prometheus and Grafana only under the profile, their files mounted from the repository', () => {
    for (const [name, s] of Object.entries(compose.services)) {
      if (name === 'prometheus' || name === 'grafana') expect(s.profiles, name).toEqual(['observability']);
      else expect(s.profiles, name).toBeUndefined();
    }
    for (const name of ['prometheus', 'grafana']) {
      for (const v of compose.services[name].volumes as string[]) {
        const [from] = v.split(':');
        if (from!.startsWith('./')) expect(existsSync(resolve(REPO_ROOT, from!)), v).toBe(true);
        else expect(compose.volumes, v).toHaveProperty(from!);
      }
      // on the host's loopback only
      for (const p of compose.services[name].ports as string[]) expect(p).toMatch(/^127\.0\.0\.1:/);
    }
  });

  it('Prometheus scrapes every Kiln service on the port compose gives its metrics', () => {
    const targets = prom.scrape_configs.flatMap((c) => c.static_configs.flatMap((s) => s.targets));
    const kiln = Object.entries(compose.services).filter(([, s]) => /apps\/(api|dispatcher|gpu-agent)\//.test(JSON.stringify(s.command ?? '')));
    expect(kiln.map(([n]) => n).sort()).toEqual(['api', 'dispatcher', 'gpu-agent']);
    for (const [name, s] of kiln) {
      expect(s.environment.METRICS_HOST, name).toBe('0.0.0.0');
      expect(targets, name).toContain(`${name}:${s.environment.METRICS_PORT}`);
      expect(s.ports ?? [], `${name}'s metrics port is not published`).not.toContainEqual(expect.stringContaining(String(s.environment.METRICS_PORT)));
    }
  });

  it('Grafana is provisioned with that Prometheus and the dashboard, where compose mounts them', () => {
    const ds = datasources.datasources[0]!;
    expect(ds).toMatchObject({ type: 'prometheus', url: 'http://prometheus:9090' });
    const mount = (compose.services.grafana.volumes as string[]).find((v) => v.startsWith('./observability/grafana/kiln.json:'))!;
    expect(mount.split(':')[1]!.startsWith(`${providers.providers[0]!.options.path}/`)).toBe(true);
    for (const p of dashboard.panels.filter((p) => p.type !== 'row')) {
      expect(p.datasource?.uid, p.title).toBe(ds.uid);
      for (const t of p.targets) expect(t.datasource?.uid, p.title).toBe(ds.uid);
    }
  });

  it('the dashboard is valid and has a panel for every metric family Kiln exports', async () => {
    const ids = dashboard.panels.map((p) => p.id);
    expect(new Set(ids).size).toBe(ids.length);
    const exprs: string[] = dashboard.panels.filter((p) => p.type !== 'row').flatMap((p) => {
      expect(p.targets.length, p.title).toBeGreaterThan(0);
      return p.targets.map((t: { expr: string }) => t.expr);
    });
    for (const e of exprs) {
      // balanced brackets and quotes: the cheapest check that a hand edit did not break a query
      const stack: string[] = [];
      for (const ch of e.replace(/"[^"]*"/g, '""')) {
        if ('({['.includes(ch)) stack.push(ch);
        else if (')}]'.includes(ch)) expect(stack.pop(), e).toBe({ ')': '(', '}': '{', ']': '[' }[ch]);
      }
      expect(stack, e).toEqual([]);
    }
    // the families every process registers: import each process's metrics module
    const { registry } = await import('@kiln/runtime');
    await import('../apps/api/src/plugins/metrics.js');
    await import('../apps/gpu-agent/src/metrics.js');
    const { registerQueueGauges } = await import('../apps/dispatcher/src/metrics.js');
    registerQueueGauges({} as never, {} as never, {} as never, {} as never); // defines its gauges; nothing is read until a scrape
    const families = registry.getMetricsAsArray().map((m) => m.name).filter((n) => n.startsWith('kiln_'));
    expect(families.length).toBeGreaterThanOrEqual(24);
    const uncovered = families.filter((f) => !exprs.some((e) => new RegExp(`\\b${f}(_bucket|_sum|_count)?\\b`).test(e)));
    expect(uncovered).toEqual([]);
  });
});
