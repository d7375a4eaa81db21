import fs from 'node:fs';
import http from 'node:http';
import { METRIC_DEFS, METRICS } from '@dtrain/core';
import { afterEach, describe, expect, it } from 'vitest';
import { countAuthRefused, type TransportCounters } from '@dtrain/transport';
import { MetricsPortError, refusalReason, startMetricsServer, TrainingMetrics, type MetricsServer } from './metrics.js';
import { emptyTotals, epochReport, feedSteps, freePort, GRADIENT_BYTES } from './testing/metrics-fixtures.js';

function get(url: string, method = 'GET'): Promise<{ status: number; type: string; body: string }> {
  return new Promise((resolve, reject) => {
    const req = http.request(url, { method, timeout: 5000 }, (res) => {
      let body = '';
      res.setEncoding('utf8');
      res.on('data', (c: string) => (body += c));
      res.on('end', () => resolve({ status: res.statusCode ?? 0, type: String(res.headers['content-type'] ?? ''), body }));
    });
    req.on('timeout', () => req.destroy(new Error(`timeout: ${url}`)));
    req.on('error', reject);
    req.end();
  });
}

/** `name{labels} value` lines of the text format, as a map from `name{labels}` to the value. */
function samples(text: string): Map<string, number> {
  const out = new Map<string, number>();
  for (const line of text.split('\n')) {
    if (!line || line.startsWith('#')) continue;
    const i = line.lastIndexOf(' ');
    out.set(line.slice(0, i), Number(line.slice(i + 1)));
  }
  return out;
}

let server: MetricsServer | null = null;
afterEach(async () => {
  await server?.close();
  server = null;
});

describe('TrainingMetrics', () => {
  it('registers every core definition with its help and type, plus the process metrics', async () => {
    const text = await new TrainingMetrics().metrics();
    for (const d of METRIC_DEFS) {
      expect(text).toContain(`# HELP ${d.name} ${d.help.replace(/\\/g, '\\\\')}`);
      expect(text).toContain(`# TYPE ${d.name} ${d.type}`);
    }
    expect(text).toContain('process_resident_memory_bytes');
    expect(text).toContain('process_cpu_seconds_total');
  });

  it('counts what the workers reported, per rank and host', async () => {
    const m = new TrainingMetrics({ defaultMetrics: false });
    const t = emptyTotals();
    feedSteps(m, { epoch: 1, fromStep: 1, steps: 5, totals: t, stepsPerEpoch: 5 });
    m.observeEpoch(epochReport(1, 42.5));
    m.observeCheckpoint(new Date(1_700_000_000_000));
    m.setWorkers(2, 2);
    m.countMalformedMessages();
    const s = samples(await m.metrics());
    expect(s.get('dtrain_images_processed_total{rank="0",host="gpu-a"}')).toBe(t.imagesByRank[0]);
    expect(s.get('dtrain_images_processed_total{rank="1",host="gpu-b"}')).toBe(t.imagesByRank[1]);
    expect(t.imagesByRank[0]).toBe(4 * 64 + 17);
    expect(s.get('dtrain_step_phase_duration_seconds_count{rank="1",host="gpu-b",phase="compute"}')).toBe(5);
    expect(s.get('dtrain_step_phase_duration_seconds_sum{rank="1",host="gpu-b",phase="compute"}')).toBeCloseTo(5 * 0.18, 9);
    expect(s.get('dtrain_allreduce_bytes_total{rank="0",host="gpu-a"}')).toBe(5 * GRADIENT_BYTES);
    expect(s.get('dtrain_current_step')).toBe(5);
    expect(s.get('dtrain_epoch_duration_seconds_sum')).toBe(42.5);
    expect(s.get('dtrain_last_epoch_duration_seconds')).toBe(42.5);
    expect(s.get('dtrain_test_accuracy_ratio')).toBeCloseTo(0.38, 9);
    expect(s.get('dtrain_last_checkpoint_timestamp_seconds')).toBe(1_700_000_000);
    expect(s.get('dtrain_workers_connected')).toBe(2);
    expect(s.get('dtrain_malformed_messages_rejected_total')).toBe(1);
    expect(s.get('dtrain_worker_cpu_seconds_total{rank="0",host="gpu-a"}')).toBeCloseTo(1.5, 9);
    expect(s.get('dtrain_stall_warnings_total{rank="1",host="gpu-b"}')).toBe(0);
    // the last step of the epoch: 17 images in (data + compute + allreduce + optimizer) seconds
    expect(s.get('dtrain_throughput_images_per_second{rank="0",host="gpu-a"}')).toBeCloseTo(17 / (0.012 + 0.12 + 0.042 + 0.008), 6);
  });

  it('build info is one series with the versions as labels', async () => {
    const m = new TrainingMetrics({ defaultMetrics: false });
    m.setBuildInfo({ version: '0.1.0', tfjs: '4.22.0', tensorflow: '2.9.1', node: '20.20.2', backend: 'cpu', worldSize: 4 });
    const s = samples(await m.metrics());
    expect(s.get('dtrain_build_info{version="0.1.0",tfjs="4.22.0",tensorflow="2.9.1",node="20.20.2",backend="cpu",world_size="4"}')).toBe(1);
    expect(s.get(METRICS.workersExpected.name)).toBe(4);
  });

  it('lost workers, regroups, heartbeat ages and stall warnings; every reason series from the start', async () => {
    const m = new TrainingMetrics({ defaultMetrics: false });
    let s = samples(await m.metrics());
    for (const reason of ['exit', 'signal', 'timeout', 'connection', 'stalled']) expect(s.get(`dtrain_workers_lost_total{reason="${reason}"}`)).toBe(0);
    expect(s.get('dtrain_regroups_total')).toBe(0);
    m.countWorkerLost('signal');
    m.countWorkerLost('timeout');
    m.countWorkerLost('timeout');
    m.countRegroup();
    m.setHeartbeatAge(0, 'gpu-a', 0.25);
    m.setHeartbeatAge(1, 'gpu-b', 3.5);
    m.setHeartbeatAge(1, 'gpu-b', 4.5);
    m.countStallWarning(1, 'gpu-b');
    m.countStallWarning(1, 'gpu-b');
    s = samples(await m.metrics());
    expect(s.get('dtrain_workers_lost_total{reason="signal"}')).toBe(1);
    expect(s.get('dtrain_workers_lost_total{reason="timeout"}')).toBe(2);
    expect(s.get('dtrain_workers_lost_total{reason="exit"}')).toBe(0);
    expect(s.get('dtrain_regroups_total')).toBe(1);
    expect(s.get('dtrain_heartbeat_age_seconds{rank="0",host="gpu-a"}')).toBe(0.25);
    expect(s.get('dtrain_heartbeat_age_seconds{rank="1",host="gpu-b"}')).toBe(4.5);
    expect(s.get('dtrain_stall_warnings_total{rank="1",host="gpu-b"}')).toBe(2);
    // A lost worker's heartbeat age goes; the others' and its counters stay.
    m.forgetWorker(1);
    m.forgetWorker(7);
    s = samples(await m.metrics());
    expect(s.has('dtrain_heartbeat_age_seconds{rank="1",host="gpu-b"}')).toBe(false);
    expect(s.get('dtrain_heartbeat_age_seconds{rank="0",host="gpu-a"}')).toBe(0.25);
    expect(s.get('dtrain_stall_warnings_total{rank="1",host="gpu-b"}')).toBe(2);
    m.setHeartbeatAge(1, 'gpu-c', 0);
    expect(samples(await m.metrics()).get('dtrain_heartbeat_age_seconds{rank="1",host="gpu-c"}')).toBe(0);
    // Wrong arguments are errors, not new series.
    expect(() => m.countWorkerLost('bored' as 'exit')).toThrow(/reason must be one of exit, signal, timeout, connection, stalled/);
    expect(() => m.setHeartbeatAge(-1, 'h', 1)).toThrow(RangeError);
    expect(() => m.setHeartbeatAge(0, 'h', Number.NaN)).toThrow(RangeError);
    expect(() => m.setHeartbeatAge(0, '', 1)).toThrow(RangeError);
    expect(() => m.countStallWarning(1.5, 'h')).toThrow(RangeError);
  });

  it('refused connections are read from the transport counters at each scrape, by reason', async () => {
    const counters: TransportCounters = { accepted: 0, rejected: 0, byReason: {}, authRefused: 0, authByReason: { 'key not allowed': 5 } };
    const m = new TrainingMetrics({ defaultMetrics: false, transport: () => counters });
    let s = samples(await m.metrics());
    // What was refused before the exporter started is not its to count.
    for (const r of ['handshake_failed', 'key_not_allowed', 'hello_key_not_allowed', 'hello_key_not_proven', 'other']) expect(s.get(`dtrain_connections_refused_total{reason="${r}"}`)).toBe(0);
    counters.authByReason = {
      'key not allowed': 7,
      'handshake failed (EPROTO; no or wrong CURVE keys)': 2,
      'handshake failed (unspecified)': 1,
      'mechanism NULL (no CURVE)': 1,
      'hello key not allowed': 1,
      'hello key not proven': 3,
      'malformed CURVE credentials': 1,
    };
    s = samples(await m.metrics());
    expect(s.get('dtrain_connections_refused_total{reason="key_not_allowed"}')).toBe(2);
    expect(s.get('dtrain_connections_refused_total{reason="handshake_failed"}')).toBe(4);
    expect(s.get('dtrain_connections_refused_total{reason="hello_key_not_allowed"}')).toBe(1);
    expect(s.get('dtrain_connections_refused_total{reason="hello_key_not_proven"}')).toBe(3);
    expect(s.get('dtrain_connections_refused_total{reason="other"}')).toBe(1);
    // Reading the registry directly collects too; nothing is counted twice.
    counters.authByReason = { ...counters.authByReason, 'hello key not proven': 4 };
    s = samples(await m.registry.metrics());
    expect(s.get('dtrain_connections_refused_total{reason="hello_key_not_proven"}')).toBe(4);
    expect(s.get('dtrain_connections_refused_total{reason="key_not_allowed"}')).toBe(2);
    expect(refusalReason('something new')).toBe('other');
  });

  it('by default it reads this process\'s transport counters', async () => {
    const m = new TrainingMetrics({ defaultMetrics: false });
    const before = samples(await m.metrics()).get('dtrain_connections_refused_total{reason="hello_key_not_proven"}');
    countAuthRefused('hello key not proven');
    countAuthRefused('client key abc not in the allow-list');
    const s = samples(await m.metrics());
    expect(s.get('dtrain_connections_refused_total{reason="hello_key_not_proven"}')).toBe(before! + 1);
    expect(s.get('dtrain_connections_refused_total{reason="key_not_allowed"}')).toBe(1);
  });

  it('refuses a report with a negative or missing figure, naming the rank and host', () => {
    const m = new TrainingMetrics({ defaultMetrics: false });
    const ok = { rank: 3, host: 'h', epoch: 1, step: 1, images: 64, loss: 1, phaseSec: { data: 0, compute: 1, allReduce: 0, optimizer: 0 }, allReduceBytes: 4 };
    expect(() => m.observeStep(ok)).not.toThrow();
    expect(() => m.observeStep({ ...ok, phaseSec: { ...ok.phaseSec, compute: -1 } })).toThrow(/rank 3 \(h\)/);
    expect(() => m.observeStep({ ...ok, images: Number.NaN })).toThrow(RangeError);
  });
});

describe('startMetricsServer', () => {
  it('serves /metrics in the text format and /healthz; 404 elsewhere, 405 for POST', async () => {
    const m = new TrainingMetrics({ defaultMetrics: false });
    m.setWorkers(1, 2);
    server = await startMetricsServer(m, { port: await freePort(), host: '127.0.0.1' });
    expect(server).not.toBeNull();
    const r = await get(server!.url);
    expect(r.status).toBe(200);
    expect(r.type).toContain('text/plain');
    expect(samples(r.body).get('dtrain_workers_connected')).toBe(1);
    expect(await get(`http://127.0.0.1:${server!.port}/healthz`)).toMatchObject({ status: 200, body: 'ok\n' });
    expect((await get(`http://127.0.0.1:${server!.port}/nope`)).status).toBe(404);
    expect((await get(server!.url, 'POST')).status).toBe(405);
  });

  it('binds 127.0.0.1 unless told otherwise: the metrics have no authentication', async () => {
    server = await startMetricsServer(new TrainingMetrics({ defaultMetrics: false }), { port: await freePort() });
    expect(server!.host).toBe('127.0.0.1');
    expect(server!.url).toBe(`http://127.0.0.1:${server!.port}/metrics`);
    // What the socket is bound to, as the kernel has it (not only what we asked for).
    const bound = fs.readFileSync('/proc/net/tcp', 'utf8').split('\n').map((l) => l.trim().split(/\s+/)[1]).filter((a) => a?.endsWith(`:${server!.port.toString(16).toUpperCase().padStart(4, '0')}`));
    expect(bound).toEqual(['0100007F:' + server!.port.toString(16).toUpperCase().padStart(4, '0')]);
  });

  it('port 0 serves nothing', async () => {
    expect(await startMetricsServer(new TrainingMetrics({ defaultMetrics: false }), { port: 0 })).toBeNull();
  });

  it('a busy port is a MetricsPortError naming the port; close() frees it even with a kept-alive connection', async () => {
    const m = new TrainingMetrics({ defaultMetrics: false });
    const port = await freePort();
    server = await startMetricsServer(m, { port, host: '127.0.0.1' });
    await expect(startMetricsServer(m, { port, host: '127.0.0.1' })).rejects.toThrow(MetricsPortError);
    await expect(startMetricsServer(m, { port, host: '127.0.0.1' })).rejects.toThrow(new RegExp(`127.0.0.1:${port}.*--metrics-port`));
    const agent = new http.Agent({ keepAlive: true });
    await new Promise<void>((resolve) => http.get(server!.url, { agent }, (res) => res.resume().on('end', resolve)));
    const t0 = Date.now();
    await server!.close();
    expect(Date.now() - t0).toBeLessThan(2000);
    agent.destroy();
    server = await startMetricsServer(m, { port, host: '127.0.0.1' });
    expect(server!.port).toBe(port);
  });
});
