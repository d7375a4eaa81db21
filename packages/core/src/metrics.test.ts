import { describe, expect, it } from 'vitest';
import { findMetricDef, METRIC_DEFS, METRICS, metricNameProblems, REFUSAL_REASONS, STEP_PHASES, WORKER_LOST_REASONS, type MetricDef } from './metrics.js';

describe('metric definitions', () => {
  it('every definition follows the naming rules', () => {
    expect(METRIC_DEFS.flatMap(metricNameProblems)).toEqual([]);
  });

  it('names are unique, also against the series names of histograms', () => {
    const names = METRIC_DEFS.flatMap((d) => (d.type === 'histogram' ? [d.name, `${d.name}_bucket`, `${d.name}_sum`, `${d.name}_count`] : [d.name]));
    expect(new Set(names).size).toBe(names.length);
  });

  it('covers what the issue asks for', () => {
    const names = METRIC_DEFS.map((d) => d.name);
    for (const n of ['dtrain_images_processed_total', 'dtrain_step_phase_duration_seconds', 'dtrain_allreduce_bytes_total', 'dtrain_test_accuracy_ratio', 'dtrain_workers_expected', 'dtrain_build_info', 'dtrain_last_checkpoint_timestamp_seconds', 'dtrain_malformed_messages_rejected_total']) {
      expect(names).toContain(n);
    }
    expect(STEP_PHASES).toEqual(['data', 'compute', 'allreduce', 'optimizer']);
  });

  it('covers failure handling and refused connections, with fixed reason lists', () => {
    expect(METRICS.workersLost).toMatchObject({ name: 'dtrain_workers_lost_total', type: 'counter', labelNames: ['reason'], labelValues: { reason: ['exit', 'signal', 'timeout', 'connection', 'stalled'] } });
    expect(WORKER_LOST_REASONS).toEqual(['exit', 'signal', 'timeout', 'connection', 'stalled']);
    expect(METRICS.regroups).toMatchObject({ name: 'dtrain_regroups_total', type: 'counter', labelNames: [] });
    expect(METRICS.heartbeatAge).toMatchObject({ name: 'dtrain_heartbeat_age_seconds', type: 'gauge', labelNames: ['rank', 'host'] });
    expect(METRICS.stallWarnings).toMatchObject({ name: 'dtrain_stall_warnings_total', type: 'counter', labelNames: ['rank', 'host'] });
    expect(METRICS.connectionsRefused).toMatchObject({ name: 'dtrain_connections_refused_total', type: 'counter', labelNames: ['reason'], labelValues: { reason: REFUSAL_REASONS } });
  });

  it('the checker rejects names that break the rules', () => {
    const base: MetricDef = { name: 'dtrain_x_seconds', help: 'a perfectly fine help text', type: 'gauge', unit: 'seconds', labelNames: ['rank'] };
    expect(metricNameProblems(base)).toEqual([]);
    const bad = (d: Partial<MetricDef>) => metricNameProblems({ ...base, ...d });
    expect(bad({ name: 'x_seconds' }).join()).toMatch(/dtrain_/);
    expect(bad({ type: 'counter' }).join()).toMatch(/_total/);
    expect(bad({ name: 'dtrain_x_ms' }).join()).toMatch(/_seconds/);
    expect(bad({ name: 'dtrain_x_milliseconds', unit: 'loss' }).join()).toMatch(/base units/);
    expect(bad({ name: 'dtrain_acc', unit: 'ratio' }).join()).toMatch(/_ratio/);
    expect(bad({ labelNames: ['run_id'] }).join()).toMatch(/label run_id/);
    expect(bad({ type: 'histogram', buckets: [1, 0.5] }).join()).toMatch(/increase/);
    expect(bad({ name: 'dtrain_Step_seconds' }).join()).toMatch(/snake_case/);
    expect(bad({ labelNames: ['reason'] }).join()).toMatch(/reason needs its list of values/);
    expect(bad({ labelNames: ['reason'], labelValues: { reason: ['a', 'a'] } }).join()).toMatch(/distinct snake_case/);
    expect(bad({ labelNames: ['reason'], labelValues: { reason: ['Bad Value'] } }).join()).toMatch(/distinct snake_case/);
    expect(bad({ labelValues: { reason: ['a'] } }).join()).toMatch(/not one of its labels/);
    expect(bad({ labelNames: ['reason'], labelValues: { reason: ['a', 'b'] } })).toEqual([]);
  });

  it('finds the definition behind histogram series', () => {
    expect(findMetricDef('dtrain_step_phase_duration_seconds_bucket')).toBe(METRICS.stepPhaseDuration);
    expect(findMetricDef('dtrain_epoch_duration_seconds_sum')).toBe(METRICS.epochDuration);
    expect(findMetricDef('dtrain_images_processed_total')).toBe(METRICS.imagesProcessed);
    expect(findMetricDef('dtrain_images_processed_total_sum')).toBeUndefined();
    expect(findMetricDef('dtrain_nope')).toBeUndefined();
  });
});
