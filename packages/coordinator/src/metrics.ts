// The coordinator's Prometheus exporter: the metrics defined in @dtrain/core, registered with
// prom-client, fed from the workers' step reports, served over HTTP.
//
// Why the coordinator and not each worker: workers already report every step over the control
// channel, so one endpoint sees every worker on every machine (labelled rank and host), and one
// Prometheus job with one static target finds everything. Per-worker endpoints would need a port
// per worker on every machine, open to the Prometheus host, and service discovery to find them.

import http from 'node:http';
import type { AddressInfo } from 'node:net';
import { METRICS, REFUSAL_REASONS, STEP_PHASES, WORKER_LOST_REASONS, type MetricDef, type MetricKey, type RefusalReason, type StepPhase, type WorkerLostReason } from '@dtrain/core';
import { transportCounters, type TransportCounters } from '@dtrain/transport';
import { Counter, Gauge, Histogram, Registry, collectDefaultMetrics } from 'prom-client';

/** Seconds one step spent in each phase (the trainer's PhaseTimes). */
export interface PhaseSeconds {
  data: number;
  compute: number;
  allReduce: number;
  optimizer: number;
}

/** What a worker reports after each training step (the launcher builds it from a StepReport). */
export interface WorkerStepReport {
  rank: number;
  host: string;
  epoch: number;
  /** Optimiser steps completed in the run after this step, 1-based. */
  step: number;
  /** Images in this worker's batch. */
  images: number;
  /** Mean loss of this worker's batch. */
  loss: number;
  phaseSec: PhaseSeconds;
  /** Size of the gradient buffer the all-reduce averaged (4 bytes x parameters for float32). */
  allReduceBytes: number;
  /** Wall time of the whole step; the sum of the phases when omitted. */
  stepSec?: number;
  /** The worker process's resident memory and cumulative CPU seconds, when it sends them. */
  rssBytes?: number;
  cpuSec?: number;
}

/** What rank 0 reports after each epoch (the fields of the trainer's `kind: 'epoch'` metrics line). */
export interface EpochReport {
  epoch: number;
  epochs: number;
  loss: number;
  trainAcc: number;
  testLoss: number;
  testAcc: number;
  elapsedSec: number;
  imagesPerSec: number;
  lr: number;
}

export interface BuildInfo {
  version: string;
  tfjs: string;
  tensorflow: string;
  node: string;
  backend: string;
  worldSize: number;
}

type AnyMetric = Counter<string> | Gauge<string> | Histogram<string>;

const phaseKey: Record<StepPhase, keyof PhaseSeconds> = { data: 'data', compute: 'compute', allreduce: 'allReduce', optimizer: 'optimizer' };

function build(def: MetricDef, registry: Registry, collect?: () => void): AnyMetric {
  const common = { name: def.name, help: def.help, labelNames: [...def.labelNames], registers: [registry], ...(collect ? { collect } : {}) };
  switch (def.type) {
    case 'counter':
      return new Counter(common);
    case 'gauge':
      return new Gauge(common);
    case 'histogram':
      return new Histogram({ ...common, buckets: [...(def.buckets ?? [])] });
  }
}

function finite(x: number | undefined): x is number {
  return typeof x === 'number' && Number.isFinite(x);
}

/**
 * The `reason` label of dtrain_connections_refused_total for a reason the transport counted
 * (`transportCounters().authByReason`; its keys are sentences, ours a fixed list).
 */
export function refusalReason(transportReason: string): RefusalReason {
  if (transportReason === 'hello key not allowed') return 'hello_key_not_allowed';
  if (transportReason === 'hello key not proven') return 'hello_key_not_proven';
  if (transportReason === 'key not allowed') return 'key_not_allowed';
  if (transportReason.startsWith('handshake failed') || transportReason.startsWith('mechanism ')) return 'handshake_failed';
  return 'other';
}

function refusalsByReason(c: TransportCounters): Map<RefusalReason, number> {
  const out = new Map<RefusalReason, number>(REFUSAL_REASONS.map((r) => [r, 0]));
  for (const [reason, n] of Object.entries(c.authByReason)) {
    const k = refusalReason(reason);
    out.set(k, out.get(k)! + n);
  }
  return out;
}

/**
 * Every metric of the run in one registry, with prom-client's process metrics (CPU, memory, event
 * loop, heap) of the coordinator process. Update methods take what workers and rank 0 report.
 */
export class TrainingMetrics {
  readonly registry = new Registry();
  private readonly m: Record<MetricKey, AnyMetric>;
  /** Last cumulative CPU seconds per worker, to turn reports into counter increments. */
  private readonly cpuSeen = new Map<string, number>();
  private maxStep = 0;
  /** Hosts each rank's heartbeat-age series were set with, so forgetWorker can drop them. */
  private readonly heartbeatHosts = new Map<number, Set<string>>();
  private readonly transport: () => TransportCounters;
  /** The transport's refusal counts already exported (those before this exporter existed are not). */
  private readonly refusalsSeen: Map<RefusalReason, number>;

  /**
   * `transport`: where refused connections are read at each scrape (default: this process's
   * `transportCounters()` from @dtrain/transport; tests pass their own).
   */
  constructor(o: { defaultMetrics?: boolean; transport?: () => TransportCounters } = {}) {
    // prom-client calls a metric's collect() at every scrape, however the registry is read.
    const collectors: Partial<Record<MetricKey, () => void>> = { connectionsRefused: () => this.collectRefusals() };
    this.m = Object.fromEntries(Object.entries(METRICS).map(([k, d]) => [k, build(d, this.registry, collectors[k as MetricKey])])) as Record<MetricKey, AnyMetric>;
    if (o.defaultMetrics !== false) collectDefaultMetrics({ register: this.registry });
    this.gauge('lastCheckpoint').set(0);
    this.counter('malformedMessages').inc(0);
    this.counter('regroups').inc(0);
    // Every reason's series exists from the start (a counter that appears at its first increment
    // hides that first increment from rate() and increase()).
    for (const reason of WORKER_LOST_REASONS) this.counter('workersLost').inc({ reason }, 0);
    for (const reason of REFUSAL_REASONS) this.counter('connectionsRefused').inc({ reason }, 0);
    this.transport = o.transport ?? transportCounters;
    this.refusalsSeen = refusalsByReason(this.transport());
  }

  /** Brings dtrain_connections_refused_total up to the transport's counters (run at each scrape). */
  private collectRefusals(): void {
    const now = refusalsByReason(this.transport());
    for (const [reason, n] of now) {
      const seen = this.refusalsSeen.get(reason) ?? 0;
      if (n > seen) this.counter('connectionsRefused').inc({ reason }, n - seen);
      this.refusalsSeen.set(reason, Math.max(seen, n));
    }
  }

  private gauge(k: MetricKey): Gauge<string> {
    return this.m[k] as Gauge<string>;
  }
  private counter(k: MetricKey): Counter<string> {
    return this.m[k] as Counter<string>;
  }
  private histogram(k: MetricKey): Histogram<string> {
    return this.m[k] as Histogram<string>;
  }

  setBuildInfo(b: BuildInfo): void {
    const g = this.gauge('buildInfo');
    g.reset();
    g.set({ version: b.version, tfjs: b.tfjs, tensorflow: b.tensorflow, node: b.node, backend: b.backend, world_size: String(b.worldSize) }, 1);
    this.gauge('workersExpected').set(b.worldSize);
  }

  setWorkers(connected: number, expected?: number): void {
    this.gauge('workersConnected').set(connected);
    if (expected !== undefined) this.gauge('workersExpected').set(expected);
  }

  /** Run-level facts known at start (planned epochs, learning rate). */
  setRun(o: { epochs: number; lr: number; startEpoch?: number }): void {
    this.gauge('plannedEpochs').set(o.epochs);
    this.gauge('learningRate').set(o.lr);
    this.gauge('currentEpoch').set(o.startEpoch ?? 1);
  }

  /** One worker's training step. Reports with non-finite or negative figures are refused. */
  observeStep(r: WorkerStepReport): void {
    const phases = STEP_PHASES.map((p) => r.phaseSec[phaseKey[p]]);
    if (!Number.isInteger(r.rank) || r.rank < 0 || !r.host || !(r.images >= 0) || !phases.every((x) => finite(x) && x >= 0) || !(r.allReduceBytes >= 0)) {
      throw new RangeError(`a step report from rank ${r.rank} (${r.host}) has a negative or missing figure: ${JSON.stringify(r)}`);
    }
    const labels = { rank: String(r.rank), host: r.host };
    const stepSec = finite(r.stepSec) ? r.stepSec : phases.reduce((a, b) => a + b, 0);
    this.counter('imagesProcessed').inc(labels, r.images);
    this.counter('stepsCompleted').inc(labels);
    // A worker's stall-warning series exists (at 0) from its first report, so rate() sees its first warning.
    this.counter('stallWarnings').inc(labels, 0);
    if (stepSec > 0) this.gauge('throughput').set(labels, r.images / stepSec);
    this.histogram('stepDuration').observe(labels, stepSec);
    STEP_PHASES.forEach((p, i) => this.histogram('stepPhaseDuration').observe({ ...labels, phase: p }, phases[i]));
    this.histogram('allReduceDuration').observe(labels, r.phaseSec.allReduce);
    this.counter('allReduceBytes').inc(labels, r.allReduceBytes);
    if (finite(r.loss)) this.gauge('batchLoss').set(labels, r.loss);
    if (finite(r.rssBytes)) this.gauge('workerResidentMemory').set(labels, r.rssBytes);
    if (finite(r.cpuSec)) {
      const key = `${r.rank}@${r.host}`;
      const before = this.cpuSeen.get(key) ?? 0;
      // A restarted worker starts again from 0: count its new total, never a negative increment.
      this.counter('workerCpu').inc(labels, r.cpuSec >= before ? r.cpuSec - before : r.cpuSec);
      this.cpuSeen.set(key, r.cpuSec);
    }
    this.gauge('workerLastReport').set(labels, Date.now() / 1000);
    this.maxStep = Math.max(this.maxStep, r.step);
    this.gauge('currentStep').set(this.maxStep);
    this.gauge('currentEpoch').set(r.epoch);
  }

  /** Rank 0's figures for a completed epoch (all workers together). */
  observeEpoch(e: EpochReport): void {
    this.histogram('epochDuration').observe(e.elapsedSec);
    this.gauge('lastEpochDuration').set(e.elapsedSec);
    this.gauge('epochThroughput').set(e.imagesPerSec);
    this.gauge('trainLoss').set(e.loss);
    this.gauge('testLoss').set(e.testLoss);
    this.gauge('trainAccuracy').set(e.trainAcc);
    this.gauge('testAccuracy').set(e.testAcc);
    this.gauge('learningRate').set(e.lr);
    this.gauge('plannedEpochs').set(e.epochs);
  }

  observeCheckpoint(at: Date = new Date()): void {
    this.gauge('lastCheckpoint').set(at.getTime() / 1000);
  }

  countMalformedMessages(n = 1): void {
    this.counter('malformedMessages').inc(n);
  }

  /** A worker was lost; `reason` is what happened to it (WORKER_LOST_REASONS). */
  countWorkerLost(reason: WorkerLostReason): void {
    if (!(WORKER_LOST_REASONS as readonly string[]).includes(reason)) {
      throw new RangeError(`countWorkerLost: reason must be one of ${WORKER_LOST_REASONS.join(', ')}, got ${JSON.stringify(reason)}`);
    }
    this.counter('workersLost').inc({ reason });
  }

  /** The workers rebuilt their ring with a new membership (elastic training). */
  countRegroup(): void {
    this.counter('regroups').inc();
  }

  /** Seconds since the last heartbeat of worker `rank` on `host`. */
  setHeartbeatAge(rank: number, host: string, seconds: number): void {
    if (!Number.isInteger(rank) || rank < 0 || !host || !finite(seconds) || seconds < 0) {
      throw new RangeError(`setHeartbeatAge: rank ${rank} (${host || 'no host'}) needs a non-negative integer rank, a host and a finite age >= 0, got ${seconds}`);
    }
    let hosts = this.heartbeatHosts.get(rank);
    if (hosts === undefined) this.heartbeatHosts.set(rank, (hosts = new Set()));
    hosts.add(host);
    this.gauge('heartbeatAge').set({ rank: String(rank), host }, seconds);
  }

  /**
   * Drops the heartbeat-age series of worker `rank` (it left the run: a lost worker's age would
   * otherwise stand still at its last value, or keep a departed rank on the dashboard). Its
   * counters (steps, images, stall warnings) stay, as counters must.
   */
  forgetWorker(rank: number): void {
    for (const host of this.heartbeatHosts.get(rank) ?? []) this.gauge('heartbeatAge').remove({ rank: String(rank), host });
    this.heartbeatHosts.delete(rank);
  }

  /** Worker `rank` on `host` is late (a stall warning was printed) but not yet past the timeout. */
  countStallWarning(rank: number, host: string): void {
    if (!Number.isInteger(rank) || rank < 0 || !host) throw new RangeError(`countStallWarning: needs a non-negative integer rank and a host, got rank ${rank}, host ${JSON.stringify(host)}`);
    this.counter('stallWarnings').inc({ rank: String(rank), host });
  }

  /** Prometheus text format. */
  metrics(): Promise<string> {
    return this.registry.metrics();
  }
}

export interface MetricsServer {
  readonly port: number;
  readonly host: string;
  /** `http://host:port/metrics`. */
  readonly url: string;
  close(): Promise<void>;
}

export class MetricsPortError extends Error {
  readonly code = 'E_METRICS_PORT' as const;
  constructor(host: string, port: number, cause: NodeJS.ErrnoException) {
    const why = cause.code === 'EADDRINUSE' ? 'the port is in use' : (cause.code ?? cause.message);
    super(`cannot serve metrics on ${host}:${port} (${why}); choose another --metrics-port, or --metrics-port 0 to serve none`, { cause });
    this.name = 'MetricsPortError';
  }
}

/**
 * Serves GET /metrics (Prometheus text format) and GET /healthz on `host:port`. Port 0 means
 * metrics are off: nothing listens and the result is null. `host` defaults to 127.0.0.1: the
 * metrics carry host names, ranks, losses and versions without authentication, so reaching them
 * from another machine (or a container) is the operator's choice (`--metrics-host`).
 */
export async function startMetricsServer(metrics: TrainingMetrics, o: { port: number; host?: string }): Promise<MetricsServer | null> {
  if (o.port === 0) return null;
  if (!Number.isInteger(o.port) || o.port < 0 || o.port > 65535) throw new RangeError(`metrics port must be 0-65535, got ${o.port}`);
  const host = o.host ?? '127.0.0.1';
  const server = http.createServer((req, res) => {
    const url = (req.url ?? '/').split('?')[0];
    if (req.method !== 'GET' && req.method !== 'HEAD') {
      res.writeHead(405, { allow: 'GET, HEAD' }).end();
      return;
    }
    if (url === '/healthz') {
      res.writeHead(200, { 'content-type': 'text/plain; charset=utf-8' }).end('ok\n');
    } else if (url === '/metrics') {
      metrics.metrics().then(
        (text) => res.writeHead(200, { 'content-type': metrics.registry.contentType }).end(req.method === 'HEAD' ? undefined : text),
        (err: Error) => res.writeHead(500, { 'content-type': 'text/plain; charset=utf-8' }).end(`${err.message}\n`),
      );
    } else {
      res.writeHead(404, { 'content-type': 'text/plain; charset=utf-8' }).end('not found: try /metrics or /healthz\n');
    }
  });
  // A scraper that opens a connection and says nothing must not hold a socket forever.
  server.requestTimeout = 10_000;
  server.headersTimeout = 10_000;
  await new Promise<void>((resolve, reject) => {
    server.once('error', (err: NodeJS.ErrnoException) => reject(new MetricsPortError(host, o.port, err)));
    server.listen(o.port, host, () => resolve());
  });
  const port = (server.address() as AddressInfo).port;
  const shown = host === '0.0.0.0' ? '127.0.0.1' : host;
  return {
    port,
    host,
    url: `http://${shown}:${port}/metrics`,
    close: () =>
      new Promise<void>((resolve, reject) => {
        server.close((err) => (err ? reject(err) : resolve()));
        // Prometheus keeps connections alive between scrapes; close() alone would wait for them.
        server.closeAllConnections();
      }),
  };
}
