// The coordinator of a run: it binds the control socket, starts the local workers (one process
// per CPU slot or GPU, torchrun-style environment), collects their Hellos, hands every worker its
// rank and the ring membership (Welcome), relays rank 0's reports, and decides the outcome:
// success only when every worker exited 0 after a final report and all replicas hash the same.
import { spawn, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import { hostname } from 'node:os';
import path from 'node:path';
import { createInterface } from 'node:readline';
import { ControlServer, transportCounters, workerEnv, type ControlEnvelope } from '@dtrain/transport';
import { startMetricsServer, TrainingMetrics, type MetricsServer } from './metrics.js';

export class CoordinatorError extends Error {
  override get name(): string {
    return this.constructor.name;
  }
}

/** A worker exited before the run completed (or with a non-zero code). */
export class WorkerFailedError extends CoordinatorError {
  readonly code = 'E_WORKER_FAILED' as const;
  constructor(
    readonly rank: number,
    readonly host: string,
    readonly exitCode: number | null,
    readonly signal: NodeJS.Signals | null,
    readonly reason: string | undefined,
    readonly logTail: string[],
    readonly logFile: string,
  ) {
    const how = signal ? `was killed by ${signal}` : `exited with code ${exitCode}`;
    super(
      `rank ${rank} on host ${host} ${how}${reason ? `: ${reason}` : ''}. ` +
        `Last lines of its log (${logFile}):\n${logTail.map((l) => `  ${l}`).join('\n') || '  (empty)'}`,
    );
  }
}

/** Not every worker joined within the join timeout. */
export class JoinTimeoutError extends CoordinatorError {
  readonly code = 'E_JOIN_TIMEOUT' as const;
}

/** Workers finished with different final states: the replicas diverged (a bug, never expected). */
export class ReplicaDivergedError extends CoordinatorError {
  readonly code = 'E_REPLICAS_DIVERGED' as const;
}

export type RunEvent =
  | { kind: 'listening'; endpoint: string; runId: string; logDir: string }
  | { kind: 'metrics'; url: string; port: number }
  | { kind: 'spawned'; rank: number; pid: number; logFile: string }
  | { kind: 'joined'; rank: number; host: string; device: string; joined: number; expected: number }
  | { kind: 'welcomed'; worldSize: number }
  | { kind: 'report'; rank: number; detail: Record<string, unknown> };

export interface LaunchOptions {
  /** Worker processes to start on this machine. */
  workers: number;
  /** The worker script (run as `node --import tsx <entry>`), e.g. @dtrain/worker's WORKER_ENTRY. */
  entry: string;
  /** Run folder: worker logs go to `<runDir>/logs/rank-<r>.log`. */
  runDir: string;
  /** Sent to every worker as Welcome.config_json (opaque here). */
  config: unknown;
  /** Worker i sees only GPU i (CUDA_VISIBLE_DEVICES=i). */
  gpus?: boolean;
  /** Control socket address and port (default 127.0.0.1, any free port). */
  listen?: string;
  port?: number;
  /** Workers that have not joined by then fail the run (default 120 s). */
  joinTimeoutMs?: number;
  /** Ring collective timeout of the workers (DTRAIN_TIMEOUT_MS, default 120 s). */
  timeoutMs?: number;
  /** Extra environment for the workers. */
  env?: NodeJS.ProcessEnv;
  onEvent?: (e: RunEvent) => void;
  /** Serve Prometheus metrics (GET /metrics, /healthz) on this port; 0 or absent: none. */
  metricsPort?: number;
  /** Address the metrics server binds (default 0.0.0.0, so a Prometheus elsewhere can scrape it). */
  metricsHost?: string;
  /** Keep serving metrics this long after the run ended, so a last scrape sees the final figures (default 0). */
  metricsLingerMs?: number;
  /** The exporter to feed (default: a new TrainingMetrics); tests pass one to look at it. */
  metrics?: TrainingMetrics;
  /** Lines of a failed worker's log to show (default 15). */
  tailLines?: number;
}

export interface LaunchResult {
  runId: string;
  worldSize: number;
  /** Each rank's final report (`kind: 'done'`), by rank. */
  finals: Record<string, unknown>[];
  /** Every report from workers (rank 0's start and epochs, everyone's done), in arrival order. */
  reports: { rank: number; detail: Record<string, unknown> }[];
  wallSec: number;
}

interface Slot {
  rank: number;
  child: ChildProcess;
  logFile: string;
  tail: string[];
  exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
  host: string;
  error?: string;
  final?: Record<string, unknown>;
}

/** Starts `workers` local workers and runs them to the end. Rejects with a CoordinatorError on failure. */
export async function launch(o: LaunchOptions): Promise<LaunchResult> {
  const t0 = performance.now();
  const n = o.workers;
  if (!Number.isInteger(n) || n < 1) throw new RangeError(`workers must be a positive integer, got ${n}`);
  const tailLines = o.tailLines ?? 15;
  const joinTimeoutMs = o.joinTimeoutMs ?? 120_000;
  const runId = randomBytes(8).toString('hex');
  const emit = o.onEvent ?? (() => undefined);

  // Metrics first: a port in use fails the launch before any process starts.
  const metrics = o.metrics ?? new TrainingMetrics();
  const metricsServer: MetricsServer | null = o.metricsPort ? await startMetricsServer(metrics, { port: o.metricsPort, host: o.metricsHost }) : null;
  if (metricsServer) emit({ kind: 'metrics', url: metricsServer.url, port: metricsServer.port });
  metrics.setWorkers(0, n);
  let rejectedSeen = transportCounters().rejected;
  const countRejected = () => {
    const now = transportCounters().rejected;
    if (now > rejectedSeen) metrics.countMalformedMessages(now - rejectedSeen);
    rejectedSeen = now;
  };
  const rejectedTimer = setInterval(countRejected, 1000);
  rejectedTimer.unref();
  const stopMetrics = async () => {
    clearInterval(rejectedTimer);
    countRejected();
    if (!metricsServer) return;
    if (o.metricsLingerMs) await new Promise((r) => setTimeout(r, o.metricsLingerMs));
    await metricsServer.close();
  };

  const logDir = path.join(o.runDir, 'logs');
  fs.mkdirSync(logDir, { recursive: true });

  const listen = o.listen ?? '127.0.0.1';
  const server = await ControlServer.bind({ listen, port: o.port ?? 0, runId, timeoutMs: o.timeoutMs ?? 120_000 }).catch(async (err: unknown) => {
    await stopMetrics();
    throw err;
  });
  emit({ kind: 'listening', endpoint: server.endpoint, runId, logDir });
  const masterAddr = listen === '0.0.0.0' ? hostname() : listen;

  const slots: Slot[] = [];
  const reports: LaunchResult['reports'] = [];
  const joined = new Map<number, { peer: Buffer; host: string; endpoints: string[] }>();
  let connected = 0;
  let failure: { slot: Slot; code: number | null; signal: NodeJS.Signals | null } | undefined;
  let failed!: (s: Slot, code: number | null, signal: NodeJS.Signals | null) => void;
  const firstFailure = new Promise<void>((resolve) => {
    failed = (slot, code, signal) => {
      if (failure) return;
      failure = { slot, code, signal };
      resolve();
    };
  });
  for (let rank = 0; rank < n; rank++) {
    const env: NodeJS.ProcessEnv = {
      ...process.env,
      ...o.env,
      RANK: String(rank),
      LOCAL_RANK: String(rank),
      WORLD_SIZE: String(n),
      LOCAL_WORLD_SIZE: String(n),
      MASTER_ADDR: masterAddr,
      MASTER_PORT: String(server.port),
      DTRAIN_JOIN_TIMEOUT_MS: String(joinTimeoutMs),
      DTRAIN_TIMEOUT_MS: String(o.timeoutMs ?? 120_000),
    };
    if (o.gpus) env.CUDA_VISIBLE_DEVICES = String(rank);
    const child = spawn(process.execPath, ['--import', 'tsx', o.entry], { env: workerEnv(env), stdio: ['ignore', 'pipe', 'pipe'] });
    const logFile = path.join(logDir, `rank-${rank}.log`);
    const log = fs.createWriteStream(logFile, { flags: 'a' });
    const slot: Slot = { rank, child, logFile, tail: [], host: hostname(), exited: undefined as never };
    let open = 2;
    const streamsDone = new Promise<void>((resolve) => {
      for (const stream of [child.stdout!, child.stderr!]) {
        const rl = createInterface({ input: stream });
        rl.on('line', (line) => {
          log.write(`[rank ${rank}] ${line}\n`);
          slot.tail.push(line);
          if (slot.tail.length > tailLines) slot.tail.shift();
        });
        rl.on('close', () => {
          if (--open === 0) log.end(() => resolve());
        });
      }
    });
    slot.exited = new Promise((resolve) => {
      child.on('error', (e) => {
        slot.error = `could not start ${process.execPath}: ${e.message}`;
      });
      child.on('close', (code, signal) => {
        if (joined.has(rank)) metrics.setWorkers(--connected, n);
        void streamsDone.then(async () => {
          // The final report travels over the control socket, the exit over a pipe: give the
          // report a moment to arrive before calling a clean exit a failure.
          for (let i = 0; i < 40 && code === 0 && slot.final === undefined; i++) await new Promise((r) => setTimeout(r, 50));
          if (code !== 0 || slot.final === undefined) failed(slot, code, signal);
          resolve({ code, signal });
        });
      });
    });
    slots.push(slot);
    emit({ kind: 'spawned', rank, pid: child.pid ?? -1, logFile });
  }

  let welcomed = false;
  let allJoined!: () => void;
  const everyoneJoined = new Promise<void>((resolve) => (allJoined = resolve));
  const rankOf = (peer: Buffer) => {
    for (const [r, j] of joined) if (j.peer.equals(peer)) return r;
    return -1;
  };
  server.onMessage((e: ControlEnvelope) => {
    const m = e.message;
    if (m.kind === 'hello') {
      const h = m.body as { host?: string; requestedRank?: number; dataEndpoints?: string[]; device?: string };
      const rank = h.requestedRank ?? 0; // proto3 omits 0
      const refuse = (why: string) => void server.send(e.peer, 'error', { code: 3, message: why, rank, host: h.host ?? '' }).catch(() => undefined);
      if (welcomed) return refuse(`the run already started with ${n} workers`);
      if (!Number.isInteger(rank) || rank < 0 || rank >= n) return refuse(`RANK ${rank} is not in 0..${n - 1}`);
      if (joined.has(rank)) return refuse(`rank ${rank} already joined from host ${joined.get(rank)!.host}`);
      if (!h.host || !(h.dataEndpoints ?? []).length) return refuse('a Hello needs a host and the ring endpoints');
      joined.set(rank, { peer: e.peer, host: h.host, endpoints: h.dataEndpoints ?? [] });
      if (slots[rank]) slots[rank].host = h.host;
      metrics.setWorkers(++connected, n);
      emit({ kind: 'joined', rank, host: h.host, device: h.device ?? '', joined: joined.size, expected: n });
      if (joined.size === n) allJoined();
    } else if (m.kind === 'stepReport') {
      const r = m.body as StepReportBody;
      // The connection says who sent it, not the message (proto3 also omits rank 0).
      const rank = rankOf(e.peer);
      if (rank < 0) return;
      if (!r.detailJson) return observeStep(metrics, rank, r.host || joined.get(rank)!.host, r);
      let detail: Record<string, unknown>;
      try {
        detail = JSON.parse(r.detailJson) as Record<string, unknown>;
        if (typeof detail !== 'object' || detail === null) return metrics.countMalformedMessages();
      } catch {
        return metrics.countMalformedMessages();
      }
      reports.push({ rank, detail });
      if (rank === 0) observeRank0(metrics, detail, n);
      if (detail.kind === 'done' && slots[rank]) {
        slots[rank].final = detail;
        // The acknowledgement lets the worker exit knowing its report arrived.
        void server.send(e.peer, 'command', { kind: 6, reason: 'done' }).catch(() => undefined);
      }
      emit({ kind: 'report', rank, detail });
    } else if (m.kind === 'error') {
      const err = m.body as { rank?: number; message?: string };
      const slot = slots[rankOf(e.peer)];
      if (slot && slot.error === undefined) slot.error = err.message;
    }
  });

  const killAll = async () => {
    for (const s of slots) if (s.child.exitCode === null && s.child.signalCode === null) s.child.kill('SIGTERM');
    const grace = setTimeout(() => {
      for (const s of slots) if (s.child.exitCode === null && s.child.signalCode === null) s.child.kill('SIGKILL');
    }, 5000);
    await Promise.all(slots.map((s) => s.exited));
    clearTimeout(grace);
  };
  const failWith = async (err: Error): Promise<never> => {
    await killAll();
    await server.close();
    await stopMetrics();
    throw err;
  };
  const workerFailure = () => {
    const f = failure!;
    return new WorkerFailedError(f.slot.rank, f.slot.host, f.code, f.signal, f.slot.error ?? (f.code === 0 ? 'it exited before sending its final report' : undefined), f.slot.tail, f.slot.logFile);
  };

  // Rendezvous, with a deadline.
  let joinTimer: NodeJS.Timeout | undefined;
  const joinDeadline = new Promise<'timeout'>((resolve) => (joinTimer = setTimeout(() => resolve('timeout'), joinTimeoutMs)));
  const first = await Promise.race([everyoneJoined.then(() => 'joined' as const), firstFailure.then(() => 'failed' as const), joinDeadline]);
  clearTimeout(joinTimer);
  if (first === 'failed') return failWith(workerFailure());
  if (first === 'timeout') {
    const missing = Array.from({ length: n }, (_, r) => r).filter((r) => !joined.has(r));
    return failWith(
      new JoinTimeoutError(
        `only ${joined.size} of ${n} workers joined the coordinator at ${server.endpoint} within ${joinTimeoutMs} ms; missing ranks ${missing.join(', ')} ` +
          `(their logs: ${missing.map((r) => slots[r].logFile).join(', ')})`,
      ),
    );
  }

  const peers = Array.from({ length: n }, (_, r) => ({ rank: r, host: joined.get(r)!.host, dataEndpoints: joined.get(r)!.endpoints }));
  const configJson = JSON.stringify(o.config);
  welcomed = true;
  await Promise.all(
    peers.map((p) =>
      server.send(joined.get(p.rank)!.peer, 'welcome', { rank: p.rank, worldSize: n, generation: 1, peers, timeoutMs: o.timeoutMs ?? 120_000, configJson }),
    ),
  );
  emit({ kind: 'welcomed', worldSize: n });

  // Training: ends when every worker exited, or at the first failure.
  const all = Promise.all(slots.map((s) => s.exited));
  const outcome = await Promise.race([all.then(() => 'exited' as const), firstFailure.then(() => 'failed' as const)]);
  if (outcome === 'failed' || failure) return failWith(workerFailure());
  await server.close();
  await stopMetrics();

  const finals = slots.map((s) => s.final!);
  const hashes = new Set(finals.map((f) => f.stateSha256));
  if (hashes.size !== 1) {
    throw new ReplicaDivergedError(`the workers finished with different weights: ${finals.map((f, r) => `rank ${r} ${String(f.stateSha256).slice(0, 12)}`).join(', ')}`);
  }
  return { runId, worldSize: n, finals, reports, wallSec: (performance.now() - t0) / 1000 };
}

/** The StepReport fields the coordinator reads (proto3: absent fields are undefined). */
interface StepReportBody {
  epoch?: number;
  step?: number;
  loss?: number;
  examples?: number;
  dataMs?: number;
  computeMs?: number;
  allReduceMs?: number;
  optimizerMs?: number;
  allReduceBytes?: number;
  host?: string;
  rssBytes?: number;
  cpuSec?: number;
  stepMs?: number;
  detailJson?: string;
}

/** A worker's per-step report into the exporter; one with impossible figures counts as malformed. */
function observeStep(metrics: TrainingMetrics, rank: number, host: string, r: StepReportBody): void {
  const ms = (x: number | undefined) => (x ?? 0) / 1000;
  try {
    metrics.observeStep({
      rank,
      host,
      epoch: r.epoch ?? 0,
      step: r.step ?? 0,
      images: r.examples ?? 0,
      loss: r.loss ?? 0,
      phaseSec: { data: ms(r.dataMs), compute: ms(r.computeMs), allReduce: ms(r.allReduceMs), optimizer: ms(r.optimizerMs) },
      allReduceBytes: r.allReduceBytes ?? 0,
      stepSec: r.stepMs !== undefined ? r.stepMs / 1000 : undefined,
      rssBytes: r.rssBytes,
      cpuSec: r.cpuSec,
    });
  } catch {
    metrics.countMalformedMessages();
  }
}

const num = (x: unknown, fallback = 0): number => (typeof x === 'number' && Number.isFinite(x) ? x : fallback);
const str = (x: unknown): string => (typeof x === 'string' && x ? x : 'unknown');

/** Rank 0's start, checkpoint and epoch reports (the worker's JSON, see @dtrain/worker's WorkerReport). */
function observeRank0(metrics: TrainingMetrics, d: Record<string, unknown>, worldSize: number): void {
  if (d.kind === 'start') {
    const info = (d.info ?? {}) as Record<string, unknown>;
    const v = (d.versions ?? {}) as Record<string, unknown>;
    metrics.setBuildInfo({ version: str(v.dtrain), tfjs: str(v.tfjs), tensorflow: str(v.tensorflow), node: str(v.node), backend: str(d.backend), worldSize });
    metrics.setRun({ epochs: num(info.epochs), lr: num(d.lr), startEpoch: num(info.startEpoch, 1) });
  } else if (d.kind === 'checkpoint') {
    metrics.observeCheckpoint(new Date(num(d.unixMs, Date.now())));
  } else if (d.kind === 'epoch' && typeof d.metrics === 'object' && d.metrics !== null) {
    const e = d.metrics as Record<string, unknown>;
    metrics.observeEpoch({
      epoch: num(e.epoch),
      epochs: num(e.epochs),
      loss: num(e.loss, NaN),
      trainAcc: num(e.trainAcc),
      testLoss: num(e.testLoss, NaN),
      testAcc: num(e.testAcc),
      elapsedSec: num(e.elapsedSec),
      imagesPerSec: num(e.imagesPerSec),
      lr: num(e.lr),
    });
  }
}
