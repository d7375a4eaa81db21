// Issue 6 end to end: a real Prometheus (Debian's package; `bash tools/prometheus/ensure-prometheus.sh`)
// on 127.0.0.1 scrapes a real 2-worker `pnpm cli launch` (synthetic 12x12 images, 2 short epochs)
// through the project's scrape config. Then, evaluated at a moment after the last step (the
// launcher keeps serving for --metrics-linger-s), every PromQL expression of the Grafana dashboard
// must return finite data, the images Prometheus counted must equal the images the run trained
// (metrics.jsonl, summary.json), and the epoch durations it stored must match the run's own log.
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { readMetrics } from '@dtrain/worker';
// The dashboard and scrape-config readers the coordinator's own Prometheus test uses (test helpers,
// deliberately not part of the coordinator's public API).
import { dashboardQueries, ENSURE_PROMETHEUS as ENSURE, findPrometheus, IN_CI as inCi, PROMETHEUS_CONFIG, resolveGrafanaVariables } from '../../coordinator/src/testing/dashboard.js';
import { freePort } from '../../coordinator/src/testing/metrics-fixtures.js';
import { runCli, startProcess, testTimeoutFor } from './testing/processes.js';

const bin = findPrometheus();
if (!bin && !inCi) console.warn(`prometheus-launch.test.ts skipped: no prometheus binary (install it with: bash ${ENSURE})`);

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

interface Sample {
  metric: Record<string, string>;
  value: [number, string];
}

describe.runIf(bin || inCi)('a real Prometheus scraping a real 2-worker launch', () => {
  let tmp = '';

  // Prometheus and the run are killed by testing/processes.ts when the test ends, before this.
  afterAll(() => {
    if (tmp) fs.rmSync(tmp, { recursive: true, force: true });
  });

  it('every dashboard expression returns data; images counted == images trained; epoch durations match the log', async (ctx) => {
    if (!bin) throw new Error(`CI=true and no prometheus binary: run \`bash ${ENSURE}\` first`);
    tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'dtrain-promlaunch-'));
    const metricsPort = await freePort();
    const promPort = await freePort();
    const promUrl = `http://127.0.0.1:${promPort}`;
    const config = fs
      .readFileSync(PROMETHEUS_CONFIG, 'utf8')
      .replace("'host.docker.internal:9455'", `'127.0.0.1:${metricsPort}'`)
      .replace(/scrape_interval: 5s/, 'scrape_interval: 1s')
      .replace(/scrape_timeout: 4s/, 'scrape_timeout: 1s');
    expect(config).toContain(`127.0.0.1:${metricsPort}`);
    fs.writeFileSync(path.join(tmp, 'prometheus.yml'), config);
    const prom = startProcess(ctx, bin, [`--config.file=${path.join(tmp, 'prometheus.yml')}`, `--storage.tsdb.path=${path.join(tmp, 'data')}`, `--web.listen-address=127.0.0.1:${promPort}`, '--log.level=warn']);
    const promLog = () => prom.run.out;
    for (const deadline = Date.now() + 20_000; ; ) {
      if (prom.child.exitCode !== null) throw new Error(`prometheus exited with ${prom.child.exitCode}:\n${promLog()}`);
      if (await fetch(`${promUrl}/-/ready`, { signal: AbortSignal.timeout(1000) }).then((r) => r.ok, () => false)) break;
      if (Date.now() > deadline) throw new Error(`prometheus not ready on ${promUrl} after 20 s:\n${promLog()}`);
      await sleep(200);
    }

    // The run. Its metrics server lingers 4 s after the end: at least 3 scrapes see the final figures.
    const out = path.join(tmp, 'run');
    const args = ['launch', '--workers', '2', '--synthetic-test-data', '96:32:12', '--batch-size', '8', '--epochs', '2', '--seed', '1', '--out', out, '--metrics-port', String(metricsPort), '--metrics-linger-s', '4'];
    const run = await runCli(ctx, args);
    const { code, stdout, stderr } = run;
    const doneAt = run.lines.find((l) => /^done: /.test(l.text))?.t ?? 0;
    const lastEpochAt = run.lines.find((l) => /^epoch 2\/2 /.test(l.text))?.t ?? 0;
    expect(stderr).toBe('');
    expect(code, stdout).toBe(0);
    expect(stdout).toContain(`metrics: http://127.0.0.1:${metricsPort}/metrics`);
    expect(doneAt).toBeGreaterThan(0);
    // After the last epoch's line (every step and the epoch were reported by then) and while the
    // exporter still serves (it lingers 4 s after the run; "done:" is printed after that).
    expect(lastEpochAt).toBeGreaterThan(0);
    const at = (lastEpochAt + 1500) / 1000;

    const queryAt = async (expr: string, t: number): Promise<Sample[]> => {
      const res = await fetch(`${promUrl}/api/v1/query?query=${encodeURIComponent(expr)}&time=${t}`, { signal: AbortSignal.timeout(5000) });
      const body = (await res.json()) as { status: string; error?: string; data?: { resultType: string; result: Sample[] | [number, string] } };
      if (body.status !== 'success') throw new Error(`Prometheus refused ${expr}: ${body.error}`);
      if (body.data!.resultType === 'scalar') return [{ metric: {}, value: body.data!.result as [number, string] }];
      return body.data!.result as Sample[];
    };
    // A scrape that timed out on a loaded machine marks every series stale until the next one:
    // an empty answer at `at` is asked again a scrape later and earlier (all after the last step:
    // the same final figures).
    const query = async (expr: string): Promise<Sample[]> => {
      let r = await queryAt(expr, at);
      for (const t of [at + 1, at - 1, at + 2]) if (r.length === 0) r = await queryAt(expr, t);
      return r;
    };
    const value = async (expr: string): Promise<number> => {
      const r = await query(expr);
      if (r.length !== 1) throw new Error(`${expr}: ${r.length} series, expected 1`);
      return Number(r[0].value[1]);
    };

    const missing: string[] = [];
    const queries = dashboardQueries();
    expect(queries.length).toBeGreaterThan(20);
    for (const q of queries) {
      const r = await query(resolveGrafanaVariables(q.expr));
      if (r.length === 0 || !r.every((s) => Number.isFinite(Number(s.value[1])))) missing.push(`${q.panel} (${q.refId}): ${q.expr} -> ${JSON.stringify(r.map((s) => s.value[1]))}`);
    }
    expect(missing, `expressions without data at the end of the run; prometheus log:\n${promLog()}`).toEqual([]);

    // Both workers, each under this machine's host name.
    const perWorker = await query('dtrain_steps_completed_total');
    expect(perWorker.map((s) => s.metric.rank).sort()).toEqual(['0', '1']);
    expect(new Set(perWorker.map((s) => s.metric.host))).toEqual(new Set([os.hostname()]));

    // Images counted == images trained.
    const lines = await readMetrics(out);
    const epochs = lines.filter((l) => (l as { kind: string }).kind === 'epoch') as unknown as { images: number; elapsedSec: number; trainSec: number; step: number }[];
    const summary = JSON.parse(fs.readFileSync(path.join(out, 'summary.json'), 'utf8')) as { steps: number; epochs: number };
    expect(epochs).toHaveLength(2);
    const trained = epochs.reduce((a, e) => a + e.images, 0);
    expect(trained).toBe(2 * 96);
    expect(await value('sum(dtrain_images_processed_total)')).toBe(trained);
    expect(await value('sum(dtrain_steps_completed_total)')).toBe(2 * summary.steps);
    expect(await value('dtrain_current_step')).toBe(summary.steps);
    expect(await value('dtrain_current_epoch')).toBe(2);
    expect(await value('dtrain_workers_expected')).toBe(2);
    // 11,180,810 float32 per step and worker (the 1-channel 12x12 model has the same layers).
    const gradientBytes = (await value('sum(dtrain_allreduce_bytes_total)')) / (2 * summary.steps);
    expect(gradientBytes % 4).toBe(0);
    expect(gradientBytes).toBeGreaterThan(4 * 11_000_000);

    // Epoch durations: Prometheus's against the launcher's epoch lines (one decimal) and metrics.jsonl.
    const logged = stdout.split('\n').filter((l) => l.startsWith('epoch ')).map((l) => Number(/ (\d+\.\d) s /.exec(l)![1]));
    expect(logged).toHaveLength(2);
    expect(await value('dtrain_epoch_duration_seconds_count')).toBe(2);
    const sum = await value('dtrain_epoch_duration_seconds_sum');
    expect(Math.abs(sum - (logged[0] + logged[1]))).toBeLessThanOrEqual(0.1 + 1e-9);
    expect(sum).toBeCloseTo(epochs[0].elapsedSec + epochs[1].elapsedSec, 6);
    expect(Math.abs((await value('dtrain_last_epoch_duration_seconds')) - logged[1])).toBeLessThanOrEqual(0.05 + 1e-9);
    // Independently measured: rank 0's step wall times add up to its training time (evaluation
    // excluded), within 15% and half a second.
    const stepSum = await value('dtrain_step_duration_seconds_sum{rank="0"}');
    const trainSec = epochs[0].trainSec + epochs[1].trainSec;
    expect(Math.abs(stepSum - trainSec), `steps ${stepSum} s, training ${trainSec} s`).toBeLessThan(0.15 * trainSec + 0.5);
    expect(await value('dtrain_last_checkpoint_timestamp_seconds')).toBeGreaterThan(at - 120);
    const [info] = await query('dtrain_build_info');
    expect(info.metric).toMatchObject({ backend: 'cpu', world_size: '2', node: process.versions.node });
    expect(info.metric.tfjs).toMatch(/^\d+\.\d+\.\d+$/);
  }, testTimeoutFor(1));
});
