// Static checks of tools/grafana and tools/prometheus; the live ones are in prometheus.test.ts.
import fs from 'node:fs';
import { findMetricDef } from '@dtrain/core';
import { describe, expect, it } from 'vitest';
import { TrainingMetrics } from './metrics.js';
import { dashboardQueries, DASHBOARD_FILE, DATASOURCE_FILE, metricNames, PROMETHEUS_CONFIG } from './testing/dashboard.js';

describe('metricNames', () => {
  it('finds the metrics of an expression and nothing else', () => {
    expect(metricNames('sum by (rank, host) (rate(dtrain_a_total{phase=~"data|compute"}[5m])) / ignoring(x) dtrain_b and up{job="dtrain"} > 0')).toEqual(['dtrain_a_total', 'dtrain_b', 'up']);
    expect(metricNames('histogram_quantile(0.9, sum by (le) (rate(x_bucket[$__rate_interval])))')).toEqual(['x_bucket']);
    expect(metricNames('time() - dtrain_t')).toEqual(['dtrain_t']);
  });
});

describe('the Grafana dashboard', () => {
  const queries = dashboardQueries();
  const text = fs.readFileSync(DASHBOARD_FILE, 'utf8');

  it('has the panels the issue asks for', () => {
    const panels = new Set(queries.map((q) => q.panel));
    for (const p of ['Throughput (images/s)', 'Epoch time', 'Loss', 'Accuracy', 'Step-phase breakdown (s/step)', 'All-reduce bandwidth', 'Step time per worker', 'Workers up', 'Memory', 'CPU']) expect(panels).toContain(p);
  });

  it('names the provisioned datasource by its uid in every panel and target, never ${DS_PROMETHEUS}', () => {
    const uid = /^\s+uid:\s*(\S+)$/m.exec(fs.readFileSync(DATASOURCE_FILE, 'utf8'))?.[1];
    expect(uid).toBe('dtrain-prometheus');
    expect(text).not.toMatch(/\$\{DS_/);
    expect(text).not.toContain('__inputs');
    for (const q of queries) expect(q.datasourceUid, `${q.panel} ${q.refId}`).toBe(uid);
  });

  it('reads only metrics defined in core, the process metrics the exporter serves, or up', async () => {
    const served = new Set((await new TrainingMetrics().metrics()).split('\n').filter((l) => l.startsWith('# TYPE ')).map((l) => l.split(' ')[2]));
    const unknown: string[] = [];
    for (const q of queries) {
      for (const n of metricNames(q.expr)) {
        const ok = n.startsWith('dtrain_') ? findMetricDef(n) !== undefined : n === 'up' || served.has(n.replace(/_(bucket|sum|count)$/, ''));
        if (!ok) unknown.push(`${q.panel}: ${n}`);
      }
    }
    expect(unknown).toEqual([]);
  });

  it('the scrape config targets the default metrics port', () => {
    expect(fs.readFileSync(PROMETHEUS_CONFIG, 'utf8')).toMatch(/targets: \['host\.docker\.internal:9455'\]/);
  });
});
