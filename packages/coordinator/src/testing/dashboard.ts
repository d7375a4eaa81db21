// Reading the project's Grafana dashboard and Prometheus config from tools/, for the tests.
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

export const REPO_ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../../..');
export const DASHBOARD_FILE = path.join(REPO_ROOT, 'tools/grafana/dashboards/dtrain-training.json');
export const DATASOURCE_FILE = path.join(REPO_ROOT, 'tools/grafana/provisioning/datasources/prometheus.yml');
export const PROMETHEUS_CONFIG = path.join(REPO_ROOT, 'tools/prometheus/prometheus.yml');
/** What installs Prometheus (`.ci/run` runs it). */
export const ENSURE_PROMETHEUS = path.join(REPO_ROOT, 'tools/prometheus/ensure-prometheus.sh');
/** Under CI a test that needs Prometheus fails without it instead of skipping. */
export const IN_CI = process.env.CI === 'true' || process.env.CI === '1';

/** The prometheus binary: $PROMETHEUS_BIN, the one on PATH, or /usr/bin/prometheus; null when none. */
export function findPrometheus(): string | null {
  const candidates = [process.env.PROMETHEUS_BIN, spawnSync('sh', ['-c', 'command -v prometheus'], { encoding: 'utf8' }).stdout.trim(), '/usr/bin/prometheus'];
  return candidates.find((c): c is string => !!c && fs.existsSync(c)) ?? null;
}

export interface DashboardQuery {
  panel: string;
  refId: string;
  expr: string;
  datasourceUid: unknown;
}

interface PanelJson {
  title?: string;
  type?: string;
  datasource?: { uid?: unknown };
  targets?: Array<{ refId?: string; expr?: string; datasource?: { uid?: unknown } }>;
  panels?: PanelJson[];
}

/** Every PromQL expression of the dashboard, with the panel it belongs to. */
export function dashboardQueries(file = DASHBOARD_FILE): DashboardQuery[] {
  const dash = JSON.parse(fs.readFileSync(file, 'utf8')) as { panels: PanelJson[] };
  const out: DashboardQuery[] = [];
  const walk = (panels: PanelJson[]) => {
    for (const p of panels) {
      for (const t of p.targets ?? []) {
        if (typeof t.expr === 'string') out.push({ panel: p.title ?? '?', refId: t.refId ?? '?', expr: t.expr, datasourceUid: t.datasource?.uid ?? p.datasource?.uid });
      }
      walk(p.panels ?? []);
    }
  };
  walk(dash.panels);
  return out;
}

/**
 * Grafana's interval variables replaced by a window that suits a test Prometheus scraping every
 * second (Grafana derives $__rate_interval from the datasource's scrape interval the same way).
 */
export function resolveGrafanaVariables(expr: string, window = '10s'): string {
  return expr.replace(/\$__rate_interval|\$__interval|\$__range/g, window);
}

const PROMQL_WORDS = new Set(['by', 'without', 'on', 'ignoring', 'group_left', 'group_right', 'and', 'or', 'unless', 'bool', 'offset', 'inf', 'nan']);

/** Metric names an expression reads (label matchers, strings, ranges, grouping lists and functions left out). */
export function metricNames(expr: string): string[] {
  const bare = expr
    .replace(/"(?:[^"\\]|\\.)*"/g, '""')
    .replace(/\{[^}]*\}/g, ' ')
    .replace(/\[[^\]]*\]/g, ' ')
    .replace(/\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)/g, ' ');
  const names = new Set<string>();
  for (const m of bare.matchAll(/[a-zA-Z_:][a-zA-Z0-9_:]*/g)) {
    const after = bare.slice(m.index + m[0].length);
    if (/^\s*\(/.test(after)) continue; // a function call
    if (PROMQL_WORDS.has(m[0].toLowerCase())) continue;
    names.add(m[0]);
  }
  return [...names];
}
