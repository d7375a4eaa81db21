// A real Prometheus (Debian's package; `bash tools/prometheus/ensure-prometheus.sh` installs it)
// scrapes the exporter on 127.0.0.1 with the project's own scrape config, while the test feeds the
// exporter a two-worker run through the methods the launcher calls. Then every PromQL expression
// of the Grafana dashboard must return data, the exported names must follow the rules, and what
// Prometheus stored must equal what was reported.
import { spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { findMetricDef, metricNameProblems, METRIC_DEFS } from '@dtrain/core';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startMetricsServer, TrainingMetrics, type MetricsServer } from './metrics.js';
import { dashboardQueries, ENSURE_PROMETHEUS as ENSURE, findPrometheus, IN_CI as inCi, metricNames, PROMETHEUS_CONFIG, resolveGrafanaVariables } from './testing/dashboard.js';
import { emptyTotals, epochReport, feedSteps, freePort } from './testing/metrics-fixtures.js';

const bin = findPrometheus();
if (!bin && !inCi) console.warn(`prometheus.test.ts skipped: no prometheus binary (install it with: bash ${ENSURE})`);

interface Sample {
  metric: Record<string, string>;
  value: [number, string];
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

describe.runIf(bin || inCi)('a real Prometheus scraping the exporter', () => {
  let prom: ChildProcess | null = null;
  let promLog = '';
  let promUrl = '';
  let tmp = '';
  let server: MetricsServer | null = null;
  let feeder: NodeJS.Timeout | null = null;
  const metrics = new TrainingMetrics();
  const totals = emptyTotals();
  let step = 1;
  const checkpointAt = new Date(Date.UTC(2025, 0, 2, 3, 4, 5));

  async function query(expr: string): Promise<Sample[]> {
    const res = await fetch(`${promUrl}/api/v1/query?query=${encodeURIComponent(expr)}`, { signal: AbortSignal.timeout(5000) });
    const body = (await res.json()) as { status: string; error?: string; data?: { resultType: string; result: Sample[] | [number, string] } };
    if (body.status !== 'success') throw new Error(`Prometheus refused ${expr}: ${body.error}`);
    if (body.data!.resultType === 'scalar') return [{ metric: {}, value: body.data!.result as [number, string] }];
    return body.data!.result as Sample[];
  }

  async function value(expr: string): Promise<number> {
    const r = await query(expr);
    if (r.length !== 1) throw new Error(`${expr}: ${r.length} series, expected 1`);
    return Number(r[0].value[1]);
  }

  beforeAll(async () => {
    if (!bin) throw new Error(`CI=true and no prometheus binary: run \`bash ${ENSURE}\` first (it installs Debian's prometheus package; .ci/run does)`);
    tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'dtrain-prom-'));
    server = await startMetricsServer(metrics, { port: await freePort(), host: '127.0.0.1' });
    const promPort = await freePort();
    promUrl = `http://127.0.0.1:${promPort}`;

    // The project's scrape config, pointed at this exporter and scraping every second.
    const original = fs.readFileSync(PROMETHEUS_CONFIG, 'utf8');
    const config = original.replace("'host.docker.internal:9455'", `'127.0.0.1:${server!.port}'`).replace(/scrape_interval: 5s/, 'scrape_interval: 1s').replace(/scrape_timeout: 4s/, 'scrape_timeout: 1s');
    expect(config).toContain(`127.0.0.1:${server!.port}`);
    expect(config).toContain('scrape_interval: 1s');
    fs.writeFileSync(path.join(tmp, 'prometheus.yml'), config);

    metrics.setBuildInfo({ version: '0.1.0', tfjs: '4.22.0', tensorflow: '2.9.1', node: process.versions.node, backend: 'cpu', worldSize: 2 });
    metrics.setRun({ epochs: 3, lr: 0.01 });
    metrics.setWorkers(2, 2);
    feedSteps(metrics, { epoch: 1, fromStep: 1, steps: 10, totals, stepsPerEpoch: 10 });
    step = 11;
    const e1 = epochReport(1, 37.25);
    metrics.observeEpoch(e1);
    totals.epochs.push(e1);
    metrics.observeCheckpoint(checkpointAt);
    metrics.countMalformedMessages(3);
    // Failure handling: a worker lost and a regroup, heartbeat ages, a stall warning.
    metrics.countWorkerLost('signal');
    metrics.countRegroup();
    metrics.setHeartbeatAge(0, 'gpu-a', 0.5);
    metrics.setHeartbeatAge(1, 'gpu-b', 2.25);
    metrics.countStallWarning(1, 'gpu-b');

    prom = spawn(bin, [`--config.file=${path.join(tmp, 'prometheus.yml')}`, `--storage.tsdb.path=${path.join(tmp, 'data')}`, `--web.listen-address=127.0.0.1:${promPort}`, '--log.level=warn'], { stdio: ['ignore', 'pipe', 'pipe'] });
    prom.stdout!.on('data', (d: Buffer) => (promLog += d.toString()));
    prom.stderr!.on('data', (d: Buffer) => (promLog += d.toString()));
    const deadline = Date.now() + 20_000;
    for (;;) {
      if (prom.exitCode !== null) throw new Error(`prometheus exited with ${prom.exitCode}:\n${promLog}`);
      const ok = await fetch(`${promUrl}/-/ready`, { signal: AbortSignal.timeout(1000) }).then((r) => r.ok, () => false);
      if (ok) break;
      if (Date.now() > deadline) throw new Error(`prometheus not ready on ${promUrl} after 20 s:\n${promLog}`);
      await sleep(200);
    }
    // Training goes on while Prometheus scrapes: a step of both workers every 250 ms.
    feeder = setInterval(() => {
      feedSteps(metrics, { epoch: 2, fromStep: step, steps: 1, totals });
      step++;
    }, 250);
  });

  afterAll(async () => {
    if (feeder) clearInterval(feeder);
    if (prom && prom.exitCode === null) {
      const exited = new Promise((r) => prom!.once('exit', r));
      prom.kill('SIGTERM');
      await Promise.race([exited, sleep(5000)]);
      if (prom.exitCode === null && prom.signalCode === null) prom.kill('SIGKILL');
    }
    await server?.close();
    if (tmp) fs.rmSync(tmp, { recursive: true, force: true });
  });

  it('every PromQL expression of the dashboard returns finite data', async () => {
    const queries = dashboardQueries();
    expect(queries.length).toBeGreaterThan(20);
    const deadline = Date.now() + 30_000;
    let missing: string[] = [];
    for (;;) {
      missing = [];
      for (const q of queries) {
        const r = await query(resolveGrafanaVariables(q.expr));
        if (r.length === 0 || !r.every((s) => Number.isFinite(Number(s.value[1])))) missing.push(`${q.panel} (${q.refId}): ${q.expr} -> ${JSON.stringify(r.map((s) => s.value[1]))}`);
      }
      if (missing.length === 0 || Date.now() > deadline) break;
      await sleep(500);
    }
    expect(missing, `expressions without data after 30 s; prometheus log:\n${promLog}`).toEqual([]);
    // Per-worker panels show both workers, each under its host.
    const perWorker = await query(resolveGrafanaVariables(queries.find((q) => q.panel === 'Step time per worker')!.expr));
    expect(perWorker.map((s) => `${s.metric.rank}@${s.metric.host}`).sort()).toEqual(['0@gpu-a', '1@gpu-b']);
    // The straggler panel names rank 1, whose compute is 1.5x slower.
    const own = await query(resolveGrafanaVariables(queries.find((q) => q.panel.startsWith('Own work'))!.expr));
    const slowest = own.reduce((a, b) => (Number(b.value[1]) > Number(a.value[1]) ? b : a));
    expect(slowest.metric.rank).toBe('1');
    expect(Number(slowest.value[1])).toBeCloseTo(0.18 + 0.013, 3);
  });

  it('what Prometheus scraped follows the naming rules and matches the core definitions', async () => {
    const res = await fetch(`${promUrl}/api/v1/metadata`, { signal: AbortSignal.timeout(5000) });
    const meta = ((await res.json()) as { data: Record<string, Array<{ type: string; help: string }>> }).data;
    const dtrainNames = Object.keys(meta).filter((n) => n.startsWith('dtrain_'));
    expect(dtrainNames.sort()).toEqual(METRIC_DEFS.map((d) => d.name).sort());
    for (const n of dtrainNames) {
      const d = findMetricDef(n)!;
      expect(metricNameProblems(d)).toEqual([]);
      expect(meta[n][0]).toMatchObject({ type: d.type, help: d.help });
    }
    for (const [n, [m]] of Object.entries(meta)) if (m.type === 'counter') expect(n, 'counters end in _total').toMatch(/_total$/);
    const used = new Set(dashboardQueries().flatMap((q) => metricNames(q.expr)));
    for (const n of used) expect(n.startsWith('dtrain_') ? findMetricDef(n) : true, n).toBeTruthy();
  });

  it('the values are the ones reported', async () => {
    clearInterval(feeder!);
    feeder = null;
    // Wait for a scrape after the last step.
    const deadline = Date.now() + 15_000;
    while ((await value('sum(dtrain_steps_completed_total)')) !== totals.steps) {
      if (Date.now() > deadline) throw new Error(`Prometheus never saw all ${totals.steps} steps`);
      await sleep(300);
    }
    expect(totals.steps).toBeGreaterThan(20);
    expect(await value('sum(dtrain_images_processed_total)')).toBe(totals.images);
    expect(await value('dtrain_images_processed_total{rank="1",host="gpu-b"}')).toBe(totals.imagesByRank[1]);
    expect(await value('sum(dtrain_allreduce_bytes_total)')).toBe(totals.allReduceBytes);
    expect(await value('sum(dtrain_step_phase_duration_seconds_count)')).toBe(4 * totals.steps);
    expect(await value('sum(dtrain_step_duration_seconds_count)')).toBe(totals.steps);
    for (const [phase, key] of [['data', 'data'], ['compute', 'compute'], ['allreduce', 'allReduce'], ['optimizer', 'optimizer']] as const) {
      expect(await value(`sum(dtrain_step_phase_duration_seconds_sum{phase="${phase}"})`)).toBeCloseTo(totals.phaseSec[key], 6);
    }
    expect(await value('sum(dtrain_allreduce_duration_seconds_sum)')).toBeCloseTo(totals.phaseSec.allReduce, 6);
    expect(await value('dtrain_current_step')).toBe(step - 1);
    expect(await value('dtrain_current_epoch')).toBe(2);
    expect(await value('dtrain_epoch_duration_seconds_count')).toBe(1);
    expect(await value('dtrain_epoch_duration_seconds_sum')).toBe(37.25);
    expect(await value('dtrain_last_epoch_duration_seconds')).toBe(37.25);
    expect(await value('dtrain_test_accuracy_ratio')).toBeCloseTo(totals.epochs[0].testAcc, 9);
    expect(await value('dtrain_last_checkpoint_timestamp_seconds')).toBe(checkpointAt.getTime() / 1000);
    expect(await value('dtrain_malformed_messages_rejected_total')).toBe(3);
    expect(await value('dtrain_workers_connected')).toBe(2);
    expect(await value('dtrain_workers_lost_total{reason="signal"}')).toBe(1);
    expect(await value('sum(dtrain_workers_lost_total)')).toBe(1);
    expect(await value('dtrain_regroups_total')).toBe(1);
    expect(await value('dtrain_heartbeat_age_seconds{rank="1",host="gpu-b"}')).toBe(2.25);
    expect(await value('dtrain_stall_warnings_total{rank="1",host="gpu-b"}')).toBe(1);
    expect((await query('dtrain_connections_refused_total')).length).toBe(5);
    const [info] = await query('dtrain_build_info');
    expect(info.metric).toMatchObject({ version: '0.1.0', backend: 'cpu', world_size: '2', job: 'dtrain' });
    expect(await value('up{job="dtrain"}')).toBe(1);
  });
});
