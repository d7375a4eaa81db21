// The coordinator of a run: it binds the control socket, starts the local workers (one process
// per CPU slot or GPU, torchrun-style environment), waits for everyone's Hello, hands every worker
// its rank and the ring membership (Welcome), relays the workers' reports, and decides the outcome:
// success only when every worker exited 0 after a final report and all replicas hash the same.
// Who is in the run is membership.ts's business; the local processes are worker-process.ts's;
// the offered data files file-offer.ts's; reports into Prometheus report-metrics.ts's.
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import { hostname, tmpdir } from 'node:os';
import path from 'node:path';
import {
  ControlServer, curveServerSecurity, dtrain, initKeyDir, isLoopback, loadKeyDir, SecurityError, transportCounters, workerEnv, writeWorkerEnv,
  readRegroupReport, type ControlEnvelope, type KeyMaterial,
} from '@dtrain/transport';
import { JoinTimeoutError, replicaDivergence, RunStoppedError, WorkerFailedError } from './errors.js';
import type { RunEvent } from './events.js';
import { FileOffer, type FileRequest } from './file-offer.js';
import { deviceForLocalRank } from './gpus.js';
import { Membership } from './membership.js';
import { startMetricsServer, TrainingMetrics } from './metrics.js';
import { num, observeRank0, observeStep, reportDetail, type StepReportBody } from './report-metrics.js';
import { running, startWorker, stopWorkers, type WorkerProcess } from './worker-process.js';

const Code = dtrain.Error.Code;

export type { RunEvent } from './events.js';

export interface LaunchOptions {
  /** Worker processes to start on this machine (ranks 0..workers-1). */
  workers: number;
  /** Machines in the run, this one included (default 1); the others' workers come with `dtrain join`. */
  nodes?: number;
  /** The worker script (run as `node --import tsx <entry>`), e.g. @dtrain/worker's WORKER_ENTRY. */
  entry: string;
  /** Run folder: worker logs go to `<runDir>/logs/rank-<r>.log`. */
  runDir: string;
  /** The training request, sent to every worker as Welcome.config_json (JSON; opaque here). */
  config: unknown;
  /** Worker i sees only the i-th GPU of the user's CUDA_VISIBLE_DEVICES (unset: GPU i); see gpus.ts. */
  gpus?: boolean;
  /** Control socket address and port (default 127.0.0.1, any free port). */
  listen?: string;
  port?: number;
  /**
   * Address of this machine that the other machines reach: MASTER_ADDR and the ring address of the
   * local workers (default: `listen`, or the host name when listening on 0.0.0.0).
   */
  advertise?: string;
  /** Local worker i binds its ring socket on port ringPortBase + i (default: any free port). */
  ringPortBase?: number;
  /**
   * CURVE (issue 7): this machine's key pair and allow-list (loadKeyDir). The control socket
   * admits only allow-listed keys; local workers get `keys.dir` (DTRAIN_KEYS_DIR) and this public
   * key (DTRAIN_COORDINATOR_KEY); a Hello whose curve_public_key is not allow-listed is refused
   * and counted; each worker's key goes to the others in Welcome.peers. Absent (and not
   * `insecure`): keys made for this run alone (perRunKeys), so that only this launch's workers get
   * in, also on loopback where every local user can connect.
   */
  keys?: KeyMaterial;
  /**
   * No encryption and no authentication (`--insecure`): anyone who reaches the control socket or a
   * ring can join the run. Workers get DTRAIN_INSECURE=1, which lets them bind beyond loopback.
   */
  insecure?: boolean;
  /** Data set files sent to workers of other machines that lack them: names relative to `root`. */
  offerFiles?: { root: string; names: string[] };
  /** Workers that have not joined by then fail the run (default 120 s). */
  joinTimeoutMs?: number;
  /**
   * Silence after which a peer counts as gone: a ring neighbour in a collective, a worker's
   * heartbeats here, the coordinator's heartbeats at the workers (DTRAIN_TIMEOUT_MS, default 60 s).
   */
  timeoutMs?: number;
  /** Heartbeat interval, both ways (default 1000 ms). */
  heartbeatMs?: number;
  /**
   * Elastic training: a lost worker makes the others roll back the step in flight, regroup
   * without it and continue; workers of `pnpm cli join` are admitted while the run is in progress.
   * Off by default: then any lost worker ends the run (checkpoints stay intact for --resume).
   */
  elastic?: boolean;
  /** Elastic: with fewer workers than this the run stops after a checkpoint (default 1). */
  minWorkers?: number;
  /** Extra environment for the workers. */
  env?: NodeJS.ProcessEnv;
  onEvent?: (e: RunEvent) => void;
  /** Serve Prometheus metrics (GET /metrics, /healthz) on this port; 0 or absent: none. */
  metricsPort?: number;
  /** Address the metrics server binds (default 127.0.0.1: they carry no authentication; 0.0.0.0 for a Prometheus elsewhere). */
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
  /** Host of each rank (of the last group). */
  hosts: string[];
  wallSec: number;
  /** Ring generations the run went through (1 without regroups). */
  generations: number;
  /** Workers lost on the way (elastic), with their rank at the time and why. */
  lost: { rank: number; host: string; reason: string }[];
}

/**
 * Starts `workers` local workers (and, with `nodes` > 1, waits for the workers of the other
 * machines) and runs them to the end. Rejects with a CoordinatorError on failure.
 */
export async function launch(o: LaunchOptions): Promise<LaunchResult> {
  if (o.keys && o.insecure) throw new RangeError('launch: keys and insecure exclude each other');
  const listen = o.listen ?? '127.0.0.1';
  if (!o.keys && !o.insecure && !isLoopback(listen)) {
    throw new SecurityError(`launch: listening on ${listen} reaches beyond this machine: give keys (loadKeyDir, pnpm cli keys init) or choose insecure: true explicitly`);
  }
  const perRun = o.keys || o.insecure ? undefined : perRunKeys();
  try {
    return await launchWith({ ...o, keys: o.keys ?? perRun }, listen);
  } finally {
    if (perRun) fs.rmSync(perRun.dir, { recursive: true, force: true });
  }
}

/**
 * A key pair made for one run, in a fresh directory only this user can enter (mkdtemp: mode 0700;
 * host.key 0600): the workers this launch starts read it through DTRAIN_KEYS_DIR, which is in their
 * environment (readable by this user and root only), never in argv or a world-readable file. It
 * admits itself only, so a process of another local user fails the CURVE handshake.
 */
function perRunKeys(): KeyMaterial {
  const dir = fs.mkdtempSync(path.join(tmpdir(), 'dtrain-run-keys-'));
  try {
    return loadKeyDir(initKeyDir({ dir, name: 'this-run' }).dir);
  } catch (e) {
    fs.rmSync(dir, { recursive: true, force: true });
    throw e;
  }
}

/** LaunchOptions' numbers with their defaults, checked. */
function settingsOf(o: LaunchOptions) {
  const s = {
    n: o.workers,
    nodesExpected: o.nodes ?? 1,
    tailLines: o.tailLines ?? 15,
    joinTimeoutMs: o.joinTimeoutMs ?? 120_000,
    timeoutMs: o.timeoutMs ?? 60_000,
    heartbeatMs: o.heartbeatMs ?? 1000,
    elastic: o.elastic === true,
    minWorkers: o.minWorkers ?? 1,
  };
  if (!Number.isInteger(s.n) || s.n < 1) throw new RangeError(`workers must be a positive integer, got ${s.n}`);
  if (!Number.isInteger(s.nodesExpected) || s.nodesExpected < 1) throw new RangeError(`nodes must be a positive integer, got ${s.nodesExpected}`);
  if (o.gpus) deviceForLocalRank(0, s.n, { ...process.env, ...o.env }); // too few visible GPUs: refused before anything starts
  if (!Number.isInteger(s.minWorkers) || s.minWorkers < 1) throw new RangeError(`minWorkers must be a positive integer, got ${s.minWorkers}`);
  if (!(s.heartbeatMs > 0) || s.heartbeatMs * 3 > s.timeoutMs) throw new RangeError(`the heartbeat interval (${s.heartbeatMs} ms) must be positive and at most a third of the timeout (${s.timeoutMs} ms)`);
  return { ...s, multi: s.nodesExpected > 1 };
}

/** The first failure anywhere ends the run; later ones follow from it. */
function firstFailure() {
  let error: Error | undefined;
  let resolve!: () => void;
  const happened = new Promise<void>((r) => (resolve = r));
  const fail = (e: Error) => {
    if (error) return;
    error = e;
    resolve();
  };
  return { fail, happened, error: () => error };
}

/**
 * The exporter: a Prometheus server when asked for (started first: a port in use fails the launch
 * before any process starts), and the transport's count of dropped messages copied into it.
 */
async function startExporter(metrics: TrainingMetrics, o: LaunchOptions, emit: (e: RunEvent) => void): Promise<{ stop(): Promise<void> }> {
  const server = o.metricsPort ? await startMetricsServer(metrics, { port: o.metricsPort, host: o.metricsHost }) : null;
  if (server) emit({ kind: 'metrics', url: server.url, port: server.port });
  let rejectedSeen = transportCounters().rejected;
  const countRejected = () => {
    const now = transportCounters().rejected;
    if (now > rejectedSeen) metrics.countMalformedMessages(now - rejectedSeen);
    rejectedSeen = now;
  };
  const timer = setInterval(countRejected, 1000);
  timer.unref();
  const stop = async () => {
    clearInterval(timer);
    countRejected();
    if (!server) return;
    if (o.metricsLingerMs) await new Promise((r) => setTimeout(r, o.metricsLingerMs));
    await server.close();
  };
  return { stop };
}

/** A local worker: its process, and `done` once its exit was judged (clean, lost or a failure). */
interface LocalWorker {
  process: WorkerProcess;
  done: Promise<void>;
}

async function launchWith(o: LaunchOptions, listen: string): Promise<LaunchResult> {
  const t0 = performance.now();
  const s = settingsOf(o);
  const runId = randomBytes(8).toString('hex');
  const emit = o.onEvent ?? (() => undefined);
  const localHost = o.env?.DTRAIN_HOST || process.env.DTRAIN_HOST || hostname();
  const offer = await FileOffer.prepare(s.multi ? o.offerFiles : undefined);
  if (offer.size) emit({ kind: 'offered', files: offer.list() });
  const metrics = o.metrics ?? new TrainingMetrics();
  const exporter = await startExporter(metrics, o, emit);
  const logDir = path.join(o.runDir, 'logs');
  fs.mkdirSync(logDir, { recursive: true });
  const security = o.keys ? curveServerSecurity(o.keys) : { kind: 'none' as const };
  const server = await ControlServer.bind({ listen, port: o.port ?? 0, runId, timeoutMs: s.timeoutMs, security }).catch(async (err: unknown) => {
    await exporter.stop();
    throw err;
  });
  emit({ kind: 'listening', endpoint: server.endpoint, runId, logDir });
  const advertise = o.advertise ?? (listen === '0.0.0.0' ? undefined : listen);

  const outcome = firstFailure();
  const locals: LocalWorker[] = [];
  const membership = new Membership(
    { localWorkers: s.n, nodesExpected: s.nodesExpected, localHost, elastic: s.elastic, minWorkers: s.minWorkers, heartbeatMs: s.heartbeatMs, timeoutMs: s.timeoutMs, joinTimeoutMs: s.joinTimeoutMs, keys: o.keys },
    {
      send: (peer, kind, body) => server.send(peer, kind, body),
      logOf: (slot) => ({ tail: locals[slot].process.tail, logFile: locals[slot].process.logFile }),
      kill: (slot) => void (running(locals[slot].process.child) && locals[slot].process.child.kill('SIGKILL')),
      emit,
      fail: outcome.fail,
      failed: () => outcome.error() !== undefined,
    },
    metrics,
  );
  for (let rank = 0; rank < s.n; rank++) {
    const env = writeWorkerEnv(
      {
        rank,
        // Several machines: the world size is known only when the others have joined (the Welcome says it).
        worldSize: s.multi ? undefined : s.n,
        localRank: rank,
        localWorldSize: s.n,
        masterAddr: advertise ?? hostname(),
        masterPort: server.port,
        joinTimeoutMs: s.joinTimeoutMs,
        timeoutMs: s.timeoutMs,
        ...(s.multi ? { listen, advertise, host: localHost } : {}),
        ringPort: o.ringPortBase !== undefined ? o.ringPortBase + rank : undefined,
        cudaVisibleDevices: o.gpus ? deviceForLocalRank(rank, s.n, { ...process.env, ...o.env }) : undefined,
        keys: o.keys ? { dir: o.keys.dir, coordinatorKey: o.keys.publicKey } : undefined,
        insecure: !o.keys,
      },
      { ...process.env, ...o.env },
    );
    const w = startWorker({ entry: o.entry, env: workerEnv(env), logFile: path.join(logDir, `rank-${rank}.log`), tailLines: s.tailLines, prefix: () => `[rank ${rank}]` });
    const done = w.exited.then(async (x) => {
      membership.localClosed(rank);
      await w.logged;
      await membership.localExited(rank, x);
    });
    locals.push({ process: w, done });
    emit({ kind: 'spawned', rank, pid: w.child.pid ?? -1, logFile: w.logFile });
  }

  const reports: LaunchResult['reports'] = [];
  server.onMessage((e) => onControlMessage(e, { membership, metrics, server, offer, reports, localHost, emit }));
  const heartbeatTimer = setInterval(() => membership.inspect(Date.now()), s.heartbeatMs);
  heartbeatTimer.unref();
  const allLocalDone = Promise.all(locals.map((w) => w.done));
  const failWith = async (err: Error): Promise<never> => {
    clearInterval(heartbeatTimer);
    membership.stop();
    membership.shutDownAgents(err.message);
    const grace = stopWorkers(locals.map((w) => w.process.child));
    await allLocalDone;
    clearTimeout(grace);
    await server.close();
    await exporter.stop();
    throw err;
  };

  // Rendezvous, with a deadline.
  let joinTimer: NodeJS.Timeout | undefined;
  const joinDeadline = new Promise<'timeout'>((resolve) => (joinTimer = setTimeout(() => resolve('timeout'), s.joinTimeoutMs)));
  const first = await Promise.race([membership.joined.then(() => 'joined' as const), outcome.happened.then(() => 'failed' as const), joinDeadline]);
  clearTimeout(joinTimer);
  if (first === 'failed') return failWith(outcome.error()!);
  if (first === 'timeout') {
    const address = advertise ?? hostname();
    return failWith(new JoinTimeoutError(membership.joinTimeoutMessage({ endpoint: server.endpoint, port: server.port, authRefused: server.stats().authRefused, address })));
  }
  await membership.welcome(o.config, offer.list());

  await trainingEnd(membership, allLocalDone, outcome, s.timeoutMs);
  if (outcome.error()) return failWith(outcome.error()!);
  clearInterval(heartbeatTimer);
  membership.stop();
  await membership.tellNotAdmitted('the run completed before it was admitted (it came after the last step boundary)');
  await server.close();
  await exporter.stop();
  return verdict(membership, locals, { runId, reports, wallSec: (performance.now() - t0) / 1000, minWorkers: s.minWorkers });
}

/**
 * Training ends when every local worker exited and every other machine's worker sent its final
 * report, or at the first failure anywhere (then outcome.error() says it).
 */
async function trainingEnd(membership: Membership, allLocalDone: Promise<unknown>, outcome: ReturnType<typeof firstFailure>, timeoutMs: number): Promise<void> {
  const all = Promise.all([allLocalDone, membership.remoteDone]);
  // Once this machine's workers are done, the others' final reports are at most a timeout away:
  // a machine that vanished after the last collective must not leave the coordinator waiting.
  let lateTimer: NodeJS.Timeout | undefined;
  let settled = false;
  const late = allLocalDone.then(() => new Promise<'late'>((resolve) => {
    if (!settled) lateTimer = setTimeout(() => resolve('late'), timeoutMs);
  }));
  const end = await Promise.race([all.then(() => 'exited' as const), outcome.happened.then(() => 'failed' as const), late]);
  settled = true;
  clearTimeout(lateTimer);
  if (end === 'late' && !outcome.error()) {
    const silent = membership.byRank.filter((x) => !x.local && x.final === undefined);
    const why = `sent no final report within ${timeoutMs} ms after this machine's workers completed (ranks without one: ${silent.map((x) => `${x.rank} on ${x.host}`).join(', ')}): its machine, its join process or the network went away`;
    outcome.fail(new WorkerFailedError(silent[0].rank, silent[0].host, null, null, why, [], `its log on host ${silent[0].host}`));
  }
  if (end !== 'exited' || outcome.error()) return;
  // Workers admitted during an elastic run on other machines: their final reports follow at most a timeout later.
  for (const until = Date.now() + timeoutMs; membership.withoutFinal().length && Date.now() < until && !outcome.error(); ) await new Promise((r) => setTimeout(r, 50));
  const missing = membership.withoutFinal();
  if (missing.length > 0 && !outcome.error()) {
    outcome.fail(new WorkerFailedError(missing[0].rank, missing[0].host, null, null, `sent no final report within ${timeoutMs} ms after the others completed`, [], `its log on host ${missing[0].host}`));
  }
}

/** A completed run's result, unless the replicas diverged or an elastic run stopped short. */
function verdict(membership: Membership, locals: LocalWorker[], r: { runId: string; reports: LaunchResult['reports']; wallSec: number; minWorkers: number }): LaunchResult {
  const { byRank } = membership;
  const finals = byRank.map((x) => x.final!);
  const diverged = replicaDivergence(
    byRank.map((x) => ({ rank: x.rank, host: x.host, stateSha256: String(x.final!.stateSha256), log: x.local ? locals[x.slot].process.logFile : `its log on host ${x.host}` })),
  );
  if (diverged) throw diverged;
  const summary0 = finals[0]?.summary as { status?: string; stopReason?: string; lastCheckpoint?: string | null; runDir?: string | null } | undefined;
  if (summary0?.status === 'stopped') {
    throw new RunStoppedError(
      `the run stopped: ${summary0.stopReason ?? `fewer than ${r.minWorkers} workers are left`}. ` +
        `Rank 0 wrote ${summary0.lastCheckpoint ?? 'a checkpoint'}; continue with: pnpm cli launch --resume ${summary0.runDir ?? '<run folder>'} --workers N`,
    );
  }
  const lost = membership.lostMembers.map((x) => ({ rank: x.rank, host: x.host, reason: x.lost ?? '' }));
  return { runId: r.runId, worldSize: membership.worldSize, finals, reports: r.reports, hosts: byRank.map((x) => x.host), wallSec: r.wallSec, generations: membership.generation, lost };
}

interface Dispatch {
  membership: Membership;
  metrics: TrainingMetrics;
  server: ControlServer;
  offer: FileOffer;
  reports: LaunchResult['reports'];
  localHost: string;
  emit: (e: RunEvent) => void;
}

/** The control socket's messages from workers and join processes (ControlServer admits only these kinds from them). */
function onControlMessage(e: ControlEnvelope, d: Dispatch): void {
  const m = e.message;
  if (m.kind === 'hello') d.membership.hello(e.peer, m.body as dtrain.Hello.$Properties, e.authenticatedKey);
  else if (m.kind === 'heartbeat') d.membership.heartbeat(e.peer, m.body as { activity?: number; step?: number });
  else if (m.kind === 'stepReport') onStepReport(e.peer, m.body as StepReportBody, d);
  else if (m.kind === 'error') onError(e.peer, m.body as dtrain.Error.$Properties, d);
  else if (m.kind === 'fileRequest' && d.membership.memberOf(e.peer)) {
    const refuse = (peer: Buffer, message: string) => void d.server.send(peer, 'error', { code: Code.REFUSED, message, rank: -1, host: d.localHost }).catch(() => undefined);
    d.offer.serve(e.peer, m.body as FileRequest, { chunk: (peer, header, bytes) => d.server.send(peer, 'fileChunk', header, [bytes]), refuse });
  }
}

/** A step report: its figures into the exporter, or a report: a regroup, a count of dropped messages, rank 0's progress or a final report. */
function onStepReport(peer: Buffer, r: StepReportBody, { membership, metrics, reports, emit }: Dispatch): void {
  // The connection says who sent it, not the message (proto3 also omits rank 0).
  const member = membership.memberOf(peer);
  if (!member || !membership.welcomed) return;
  member.lastHeard = Date.now();
  member.started = true;
  const rank = member.rank;
  if (r.regroup) {
    const report = readRegroupReport(r.regroup);
    return report ? membership.regroupReport(member, report) : metrics.countMalformedMessages();
  }
  if (r.rejected) {
    // A worker's sockets dropped messages (garbage, strangers, replays): into the run's metric.
    const total = num(r.rejected.total);
    if (total > member.rejectedSeen) metrics.countMalformedMessages(total - member.rejectedSeen);
    member.rejectedSeen = Math.max(member.rejectedSeen, total);
    return;
  }
  const detail = reportDetail(r);
  if (!detail) {
    if (r.stepMs !== undefined) member.stepMs = r.stepMs;
    // The host label is the one it joined with: a report cannot mint new series.
    return observeStep(metrics, rank, member.host, r);
  }
  reports.push({ rank, detail });
  if (rank === 0) observeRank0(metrics, detail, membership.worldSize);
  if (detail.kind === 'done') membership.finalReport(member, detail);
  emit({ kind: 'report', rank, detail });
}

/** A worker's Error, or a join process's report that one of its workers exited. */
function onError(peer: Buffer, err: dtrain.Error.$Properties, { membership, metrics }: Dispatch): void {
  const agentHost = membership.agentHost(peer);
  if (agentHost !== undefined) {
    const we = err.workerExit;
    if (!we) return metrics.countMalformedMessages();
    return membership.agentReport(agentHost, {
      localRank: we.localRank ?? 0,
      exitCode: we.signal ? null : (we.exitCode ?? 0),
      signal: we.signal || null,
      reason: err.message || undefined,
      logTail: err.logTail ?? [],
      logFile: we.logFile ?? '',
    });
  }
  const member = membership.memberOf(peer);
  if (member) membership.workerError(member, err.message ?? undefined);
}
