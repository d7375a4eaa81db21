// The coordinator of a run: it binds the control socket, starts the local workers (one process
// per CPU slot or GPU, torchrun-style environment), collects their Hellos, hands every worker its
// rank and the ring membership (Welcome), relays rank 0's reports, and decides the outcome:
// success only when every worker exited 0 after a final report and all replicas hash the same.
import { spawn, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import { hostname, tmpdir } from 'node:os';
import path from 'node:path';
import { createInterface } from 'node:readline';
import {
  ControlServer, countAuthRefused, curveServerSecurity, dtrain, initKeyDir, isLoopback, loadKeyDir, SecurityError, transportCounters, workerEnv, writeWorkerEnv,
  type ControlEnvelope, type KeyMaterial, type RegroupReport, type Security,
} from '@dtrain/transport';

// The protocol's enums (proto/dtrain.proto), as the worker uses them.
const Kind = dtrain.Command.Kind;
const Code = dtrain.Error.Code;
import { deviceForLocalRank } from './gpus.js';
import { startMetricsServer, TrainingMetrics, type MetricsServer } from './metrics.js';

/** What a Hello may call its host (RFC 1123 names, and '_' as some machines have). */
const HOST_NAME = /^[A-Za-z0-9][A-Za-z0-9._-]{0,252}$/;

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
    /** How to name it when it has no rank yet (it failed before the Welcome), e.g. "local rank 1". */
    who?: string,
  ) {
    const how = signal ? `was killed by ${signal}` : exitCode === null ? 'failed' : `exited with code ${exitCode}`;
    super(
      `${who ?? `rank ${rank}`} on host ${host} ${how}${reason ? `: ${reason}` : ''}. ` +
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
  constructor(
    message: string,
    /** The ranks whose state differs from the reference state (see replicaDivergence), by rank. */
    readonly diverged: ReplicaState[],
    /** The ranks that hold the reference state. */
    readonly agreeing: ReplicaState[],
  ) {
    super(message);
  }
}

/** A rank's final report as the divergence check sees it; `log` says where its log is. */
export interface ReplicaState {
  rank: number;
  host: string;
  stateSha256: string;
  log: string;
}

/**
 * The invariant every "replicas identical" line rests on: all ranks finish with the same state
 * hash. The reference is the hash most ranks hold (rank 0's on a tie, since rank 0 wrote the
 * run's files); every other rank is named with its host. Undefined when all agree.
 */
export function replicaDivergence(states: ReplicaState[]): ReplicaDivergedError | undefined {
  const groups = new Map<string, ReplicaState[]>();
  for (const s of states) groups.set(s.stateSha256, [...(groups.get(s.stateSha256) ?? []), s]);
  if (groups.size <= 1) return undefined;
  const most = Math.max(...[...groups.values()].map((g) => g.length));
  const tied = [...groups.values()].filter((g) => g.length === most);
  const reference = tied.find((g) => g.some((s) => s.rank === 0)) ?? tied[0];
  const diverged = states.filter((s) => !reference.includes(s));
  const short = (h: string) => h.slice(0, 12);
  const ranks = (xs: ReplicaState[]) => `rank${xs.length > 1 ? 's' : ''} ${xs.map((s) => s.rank).join(', ')}`;
  const basis = most * 2 > states.length ? 'the majority' : reference.some((s) => s.rank === 0) ? "no majority: compared with rank 0's" : 'no majority: compared with the most common state';
  const rank0 = states.find((s) => s.rank === 0);
  return new ReplicaDivergedError(
    `the replicas diverged: ${diverged.map((s) => `rank ${s.rank} on host ${s.host} (state sha256 ${short(s.stateSha256)}, log ${s.log})`).join('; ')} ` +
      `finished with another state than ${ranks(reference)} (state sha256 ${short(reference[0].stateSha256)}, ${basis}). ` +
      `Rank 0 wrote the run's checkpoints and summary.json from its own copy${rank0 && diverged.includes(rank0) ? ', one of those that differ' : ''}. ` +
      `Next: check that every machine runs the same dtrain, Node.js and TensorFlow.js versions and backend (pnpm cli doctor on each), ` +
      `compare the logs of the ranks named with rank 0's${rank0 ? ` (${rank0.log})` : ''}, and run again (or continue with --resume from a checkpoint); ` +
      `equal versions must give equal states, so if it happens again report it as a bug with these logs`,
    diverged,
    reference,
  );
}

/**
 * An elastic run stopped because fewer workers than --min-workers were left; rank 0 wrote a
 * checkpoint of the position reached, and `--resume` continues it with any number of workers.
 */
export class RunStoppedError extends CoordinatorError {
  readonly code = 'E_RUN_STOPPED' as const;
}

/** Files offered to other machines could not be read. */
export class OfferedFileError extends CoordinatorError {
  readonly code = 'E_OFFERED_FILE' as const;
}

/**
 * Hello.requested_rank of a `dtrain join` process itself (not a worker): it registers its host and
 * how many workers it will start, and receives Command START (which carries the run id), so it can
 * later report its workers' exits (Error with a WorkerExit) and hear about the end.
 */
export const NODE_AGENT_RANK = -2;

/** What a `dtrain join` process reports when one of its workers exits non-zero (Error.worker_exit, read). */
interface AgentExitReport {
  localRank: number;
  exitCode: number | null;
  signal: string | null;
  reason?: string;
  logTail: string[];
  logFile: string;
}

export type RunEvent =
  | { kind: 'listening'; endpoint: string; runId: string; logDir: string }
  | { kind: 'metrics'; url: string; port: number }
  | { kind: 'spawned'; rank: number; pid: number; logFile: string }
  | { kind: 'node'; host: string; workers: number; nodes: number; expectedNodes: number }
  | { kind: 'joined'; rank: number; host: string; device: string; joined: number; expected: number }
  | { kind: 'offered'; files: { name: string; size: number; sha256: string }[] }
  | { kind: 'welcomed'; worldSize: number; hosts: { host: string; ranks: number[] }[] }
  | { kind: 'report'; rank: number; detail: Record<string, unknown> }
  /** A worker is late (the stall inspector): no heartbeat for `silentSec`; it is declared lost only after the timeout. */
  | { kind: 'stall'; rank: number; host: string; silentSec: number; activity: string; step: number; timeoutSec: number }
  /** Elastic: a worker was lost (died, timed out, cut off); the others regroup without it. */
  | { kind: 'lost'; rank: number; host: string; reason: string; logTail: string[]; logFile: string; remaining: number }
  /** Elastic: the run completed (others sent final reports) while this worker's last collective failed: it was stopped. */
  | { kind: 'released'; rank: number; host: string; reason: string }
  /** Elastic: a new group formed (after a loss, or to admit joining workers). */
  | { kind: 'regrouped'; generation: number; worldSize: number; root: number; reason: string; stop: boolean; hosts: { host: string; ranks: number[] }[] };

export interface LaunchOptions {
  /** Worker processes to start on this machine (ranks 0..workers-1). */
  workers: number;
  /** Machines in the run, this one included (default 1); the others' workers come with `dtrain join`. */
  nodes?: number;
  /** The worker script (run as `node --import tsx <entry>`), e.g. @dtrain/worker's WORKER_ENTRY. */
  entry: string;
  /** Run folder: worker logs go to `<runDir>/logs/rank-<r>.log`. */
  runDir: string;
  /** Sent to every worker as Welcome.config_json (opaque here; an object gets `offeredFiles` added). */
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

interface Slot {
  rank: number;
  child: ChildProcess;
  logFile: string;
  tail: string[];
  exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
}

/** A worker that said Hello: one of ours (local, requested its RANK) or one of another machine's. */
interface Member {
  peer: Buffer;
  host: string;
  localRank: number;
  local: boolean;
  endpoints: string[];
  device: string;
  /** Hello.curve_public_key ('' without CURVE): its ring's key, passed on in Welcome.peers. */
  key: string;
  /** Local workers: their RANK until the Welcome; then the rank in the current group. */
  rank: number;
  /** Local workers: the RANK they were started with (their slot and log file). */
  slot: number;
  error?: string;
  final?: Record<string, unknown>;
  /** Heartbeats and the stall inspector. */
  lastHeard: number;
  activity: string;
  step: number;
  stepMs: number;
  warned: boolean;
  /**
   * Training began (a heartbeat with an activity, or a step report). Before that the worker loads
   * TensorFlow and builds the model, long synchronous stretches without heartbeats: it is held to
   * the join timeout instead, and not reported as late.
   */
  started: boolean;
  /** The worker process's count of dropped messages, as last reported (a RejectedReport). */
  rejectedSeen: number;
  /** Why it was declared lost (elastic); a lost member is out of every later group. */
  lost?: string;
  /** Elastic: released with STOP because the run completed while its last collective failed. */
  released?: string;
}

const ACTIVITY_NAMES = ['idle', 'compute', 'all-reduce', 'evaluate', 'checkpoint', 'data'];

/** Another machine, known from its `join` process's registration or its first worker's Hello. */
interface Node {
  host: string;
  expected: number;
  agent?: Buffer;
}

const FILE_CHUNK_BYTES = 4 << 20;

async function sha256Of(file: string): Promise<string> {
  const { createHash } = await import('node:crypto');
  const h = createHash('sha256');
  for await (const c of fs.createReadStream(file)) h.update(c as Buffer);
  return h.digest('hex');
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

async function launchWith(o: LaunchOptions, listen: string): Promise<LaunchResult> {
  const t0 = performance.now();
  const n = o.workers;
  const nodesExpected = o.nodes ?? 1;
  if (!Number.isInteger(n) || n < 1) throw new RangeError(`workers must be a positive integer, got ${n}`);
  if (!Number.isInteger(nodesExpected) || nodesExpected < 1) throw new RangeError(`nodes must be a positive integer, got ${nodesExpected}`);
  if (o.gpus) deviceForLocalRank(0, n, { ...process.env, ...o.env }); // too few visible GPUs: refused before anything starts
  const multi = nodesExpected > 1;
  const tailLines = o.tailLines ?? 15;
  const joinTimeoutMs = o.joinTimeoutMs ?? 120_000;
  const timeoutMs = o.timeoutMs ?? 60_000;
  const heartbeatMs = o.heartbeatMs ?? 1000;
  const elastic = o.elastic === true;
  const minWorkers = o.minWorkers ?? 1;
  if (!Number.isInteger(minWorkers) || minWorkers < 1) throw new RangeError(`minWorkers must be a positive integer, got ${minWorkers}`);
  if (!(heartbeatMs > 0) || heartbeatMs * 3 > timeoutMs) throw new RangeError(`the heartbeat interval (${heartbeatMs} ms) must be positive and at most a third of the timeout (${timeoutMs} ms)`);
  const runId = randomBytes(8).toString('hex');
  const emit = o.onEvent ?? (() => undefined);
  const localHost = o.env?.DTRAIN_HOST || process.env.DTRAIN_HOST || hostname();

  // Files to offer: checked and hashed before anything starts, so a missing file is one clear error.
  const offered = new Map<string, { name: string; file: string; size: number; sha256: string }>();
  if (multi && o.offerFiles) {
    for (const name of o.offerFiles.names) {
      const file = path.join(o.offerFiles.root, name);
      let size: number;
      try {
        size = fs.statSync(file).size;
      } catch (e) {
        throw new OfferedFileError(`cannot offer ${file} to the other machines: ${(e as Error).message}`);
      }
      offered.set(name, { name, file, size, sha256: await sha256Of(file) });
    }
    emit({ kind: 'offered', files: [...offered.values()].map(({ name, size, sha256 }) => ({ name, size, sha256 })) });
  }

  // Metrics first: a port in use fails the launch before any process starts.
  const metrics = o.metrics ?? new TrainingMetrics();
  const metricsServer: MetricsServer | null = o.metricsPort ? await startMetricsServer(metrics, { port: o.metricsPort, host: o.metricsHost }) : null;
  if (metricsServer) emit({ kind: 'metrics', url: metricsServer.url, port: metricsServer.port });
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

  const security: Security = o.keys ? curveServerSecurity(o.keys) : { kind: 'none' };
  const allowedKeys = new Map((o.keys?.allowed ?? []).map((k) => [k.publicKey, k.name]));
  const server = await ControlServer.bind({ listen, port: o.port ?? 0, runId, timeoutMs, security }).catch(async (err: unknown) => {
    await stopMetrics();
    throw err;
  });
  emit({ kind: 'listening', endpoint: server.endpoint, runId, logDir });
  const advertise = o.advertise ?? (listen === '0.0.0.0' ? undefined : listen);
  const masterAddr = advertise ?? hostname();

  const slots: Slot[] = [];
  const reports: LaunchResult['reports'] = [];
  const members = new Map<string, Member>(); // by peer (hex routing id)
  const nodes = new Map<string, Node>(); // other machines, by host
  const agents = new Map<string, string>(); // agent peer (hex) -> host
  const fileRequestsInFlight = new Set<string>(); // peers (hex) whose file chunk is being read and sent
  let welcomed = false;
  let worldSize = 0;
  const byRank: Member[] = [];
  const localJoined = () => [...members.values()].filter((m) => m.local).length;
  const joinedOn = (host: string) => [...members.values()].filter((m) => !m.local && m.host === host).length;
  const expectedWorld = () => n + [...nodes.values()].reduce((a, x) => a + x.expected, 0);
  metrics.setWorkers(0, n);
  let localExits = 0;

  let failure: Error | undefined;
  let failed!: (e: Error) => void;
  const firstFailure = new Promise<void>((resolve) => {
    failed = (e) => {
      if (failure) return;
      failure = e;
      resolve();
    };
  });
  let allJoined!: () => void;
  const everyoneJoined = new Promise<void>((resolve) => (allJoined = resolve));
  let remoteFinished!: () => void;
  const remoteDone = new Promise<void>((resolve) => (remoteFinished = resolve));
  const checkJoined = () => {
    if (welcomed || localJoined() < n || nodes.size < nodesExpected - 1) return;
    for (const node of nodes.values()) if (joinedOn(node.host) < node.expected) return;
    allJoined();
  };

  for (let rank = 0; rank < n; rank++) {
    const env = writeWorkerEnv(
      {
        rank,
        // Several machines: the world size is known only when the others have joined (the Welcome says it).
        worldSize: multi ? undefined : n,
        localRank: rank,
        localWorldSize: n,
        masterAddr,
        masterPort: server.port,
        joinTimeoutMs,
        timeoutMs,
        ...(multi ? { listen, advertise, host: localHost } : {}),
        ringPort: o.ringPortBase !== undefined ? o.ringPortBase + rank : undefined,
        cudaVisibleDevices: o.gpus ? deviceForLocalRank(rank, n, { ...process.env, ...o.env }) : undefined,
        keys: o.keys ? { dir: o.keys.dir, coordinatorKey: o.keys.publicKey } : undefined,
        insecure: !o.keys,
      },
      { ...process.env, ...o.env },
    );
    const child = spawn(process.execPath, ['--import', 'tsx', o.entry], { env: workerEnv(env), stdio: ['ignore', 'pipe', 'pipe'] });
    const logFile = path.join(logDir, `rank-${rank}.log`);
    const log = fs.createWriteStream(logFile, { flags: 'a' });
    const slot: Slot = { rank, child, logFile, tail: [], exited: undefined as never };
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
    let spawnError: string | undefined;
    slot.exited = new Promise((resolve) => {
      child.on('error', (e) => {
        spawnError = `could not start ${process.execPath}: ${e.message}`;
      });
      child.on('close', (code, signal) => {
        if ([...members.values()].some((x) => x.local && x.rank === rank)) metrics.setWorkers(members.size - ++localExits, welcomed ? worldSize : expectedWorld());
        void streamsDone.then(async () => {
          // The final report travels over the control socket, the exit over a pipe: give the
          // report a moment to arrive before calling a clean exit a failure.
          const mm = () => [...members.values()].find((x) => x.local && x.slot === rank);
          for (let i = 0; i < 40 && code === 0 && mm()?.final === undefined; i++) await new Promise((r) => setTimeout(r, 50));
          const member = mm() ?? lostMembers.find((x) => x.local && x.slot === rank);
          if (member?.lost !== undefined || member?.released !== undefined) return resolve({ code, signal });
          if (elastic && welcomed && member && (code !== 0 || member.final === undefined)) {
            const how = signal ? `was killed by ${signal}` : `exited with code ${code}`;
            declareLost(member, `${how}${member.error ? `: ${member.error}` : ''}`, signal ? 'signal' : 'exit');
            return resolve({ code, signal });
          }
          if (code !== 0 || member?.final === undefined) {
            const reason = spawnError ?? member?.error ?? (code === 0 ? 'it exited before sending its final report' : undefined);
            const err = new WorkerFailedError(rank, member?.host ?? localHost, code, signal, reason, slot.tail, slot.logFile);
            // Failures on other machines came first: their root cause is being chosen; this one follows from it.
            if (remoteGrace) pendingLocal ??= err;
            else failed(err);
          }
          resolve({ code, signal });
        });
      });
    });
    slots.push(slot);
    emit({ kind: 'spawned', rank, pid: child.pid ?? -1, logFile });
  }

  // Failures on other machines arrive as messages (the worker's own Error, then its join
  // process's exit report), often from several ranks at once when a ring link breaks. They are
  // collected for a moment and the root cause is named: a rank that could not reach its
  // neighbour (the message names both hosts and the endpoint) before ranks that only waited.
  let remoteGrace: NodeJS.Timeout | undefined;
  let pendingLocal: WorkerFailedError | undefined;
  const remoteExits: { host: string; report: AgentExitReport }[] = [];
  const collectRemoteFailures = () => {
    if (remoteGrace) return;
    remoteGrace = setTimeout(() => {
      const failedMembers = [...members.values()].filter((x) => !x.local && x.error !== undefined);
      const exitOf = (x: Member) => remoteExits.find((r) => r.host === x.host && r.report.localRank === x.localRank)?.report;
      const culprit = failedMembers.find((x) => /could not reach/.test(x.error!)) ?? failedMembers[0];
      if (culprit) {
        const x = exitOf(culprit);
        const rank = welcomed ? culprit.rank : -1;
        return failed(
          new WorkerFailedError(rank, culprit.host, x?.exitCode ?? null, (x?.signal as NodeJS.Signals | null) ?? null, culprit.error, x?.logTail ?? [], x ? `${x.logFile} on host ${culprit.host}` : `its log on host ${culprit.host}`, rank < 0 ? `local rank ${culprit.localRank}` : undefined),
        );
      }
      // A worker that died before saying Hello, or without a word: only its join process speaks.
      const r = remoteExits[0];
      if (!r) return pendingLocal && failed(pendingLocal);
      const w = [...members.values()].find((mm) => !mm.local && mm.host === r.host && mm.localRank === r.report.localRank);
      const rank = w && welcomed ? w.rank : -1;
      failed(
        new WorkerFailedError(rank, r.host, r.report.exitCode, (r.report.signal as NodeJS.Signals | null) ?? null, r.report.reason, r.report.logTail ?? [], `${r.report.logFile} on host ${r.host}`, rank < 0 ? `local rank ${r.report.localRank}` : undefined),
      );
    }, 2000);
  };
  // ---- elastic membership (issue 7) ----------------------------------------------------------
  // The group is `byRank` (ranks 0..n-1 of the current generation). A lost member leaves it at
  // once; the survivors are told to roll back (ROLLBACK: the step in flight is abandoned), each
  // answers with a regroup report (how far it got, its new ring endpoints), and when all have
  // answered (or the timeout passed) the Welcome of the next generation goes out, naming the root
  // whose state everyone adopts. Joiners wait in `pendingJoiners` for the next step boundary.
  let generation = 1;
  const lostMembers: Member[] = [];
  const pendingJoiners: Member[] = [];
  let regroupState: { reasons: string[]; ready: Map<Member, RegroupReport>; timer: NodeJS.Timeout; rollback: boolean } | undefined;
  // A survivor may wait a whole ring timeout for a neighbour that died during the new ring's
  // setup before it fails and reports: the regroup's deadline leaves it half a timeout more, or
  // both neighbours of the dead one would be declared lost at the same moment.
  const regroupDeadlineMs = timeoutMs + timeoutMs / 2;
  /** Tells each machine's node agent the rank of each of its workers in the group just welcomed. */
  const tellAgents = () => {
    for (const node of nodes.values()) {
      if (node.agent === undefined) continue;
      const mine = byRank.filter((x) => !x.local && x.host === node.host);
      const ranks = new Array<number>(Math.max(0, ...mine.map((x) => x.localRank + 1))).fill(-1);
      for (const x of mine) ranks[x.localRank] = x.rank;
      void server.send(node.agent, 'rankAssignment', { generation, worldSize, ranks }).catch(() => undefined);
    }
  };
  const groupHosts = () => {
    const hs: { host: string; ranks: number[] }[] = [];
    for (const x of byRank) {
      const last = hs.at(-1);
      if (last?.host === x.host) last.ranks.push(x.rank);
      else hs.push({ host: x.host, ranks: [x.rank] });
    }
    return hs;
  };
  function checkRemoteFinished(): void {
    if (welcomed && byRank.every((x) => x.local || x.final !== undefined)) remoteFinished();
  }
  function declareLost(member: Member, reason: string, kind: 'exit' | 'signal' | 'timeout' | 'connection' | 'stalled', logTail?: string[], logFile?: string): void {
    if (member.lost !== undefined || member.released !== undefined || failure) return;
    member.lost = reason;
    members.delete(member.peer.toString('hex'));
    lostMembers.push(member);
    const inGroup = byRank.indexOf(member);
    if (inGroup >= 0) byRank.splice(inGroup, 1);
    const joining = pendingJoiners.indexOf(member);
    if (joining >= 0) pendingJoiners.splice(joining, 1);
    const slot = member.local ? slots[member.slot] : undefined;
    // A worker cut off but alive learns it is out (and exits) instead of waiting for a Welcome.
    void server.send(member.peer, 'error', { code: Code.PEER_LOST, message: `this worker was declared lost: ${reason}`, rank: member.rank, host: member.host }).catch(() => undefined);
    // A hung (or stopped) process must not come back into a group that moved on.
    if (slot && slot.child.exitCode === null && slot.child.signalCode === null) slot.child.kill('SIGKILL');
    metrics.countWorkerLost(kind);
    metrics.forgetWorker(member.rank);
    emit({ kind: 'lost', rank: member.rank, host: member.host, reason, logTail: logTail ?? slot?.tail ?? [], logFile: logFile ?? slot?.logFile ?? `its log on host ${member.host}`, remaining: byRank.length });
    if (inGroup < 0 && joining >= 0) return;
    if (byRank.length === 0) {
      failed(new WorkerFailedError(member.rank, member.host, null, null, `${reason}; no workers are left`, logTail ?? slot?.tail ?? [], logFile ?? slot?.logFile ?? `its log on host ${member.host}`));
      return;
    }
    // Once any member sent its final report, training is over: a worker finishes only after the
    // run's last collective, which every member (this one included) completed. Only this one's
    // final report is missing; there is nothing to roll back, and finished members cannot regroup.
    if (byRank.some((x) => x.final !== undefined)) {
      if (member.rank === 0 && member.final === undefined) {
        // Rank 0 writes the run's files after the last collective: they may be incomplete.
        failed(lastFilesMissing(member, `${reason} after training completed`, logTail, logFile));
        return;
      }
      checkRemoteFinished();
      return;
    }
    startRegroup('rollback', `rank ${member.rank} on host ${member.host} was lost (${reason})`);
  }
  function refuseJoiners(why: string): void {
    for (const x of pendingJoiners.splice(0)) {
      members.delete(x.peer.toString('hex'));
      void server.send(x.peer, 'error', { code: Code.REFUSED, message: why, rank: -1, host: x.host }).catch(() => undefined);
    }
  }
  function startRegroup(kind: 'rollback' | 'join', reason: string): void {
    if (failure) return;
    if (kind === 'join' && !regroupState && byRank.some((x) => x.final !== undefined)) {
      return refuseJoiners('the run is finishing: its workers completed training; join the next run');
    }
    if (!regroupState) {
      const timer = setTimeout(() => {
        const st = regroupState;
        if (!st) return;
        if (!st.rollback) {
          // Only joiners were waiting, and the group reached no step boundary in time (the run is
          // in its last evaluation, or finishing): they are turned away; nobody is lost.
          clearTimeout(st.timer);
          regroupState = undefined;
          return refuseJoiners(`the run reached no step boundary within ${(regroupDeadlineMs + timeoutMs) / 1000} s (it may be finishing); try again`);
        }
        // Members that did not answer in time are lost too; the rest go on.
        for (const x of [...byRank]) if (!st.ready.has(x)) declareLost(x, `it did not answer the regroup within ${regroupDeadlineMs / 1000} s`, 'timeout');
        tryFinishRegroup();
      }, regroupDeadlineMs + (kind === 'join' ? timeoutMs : 0));
      timer.unref();
      regroupState = { reasons: [], ready: new Map(), timer, rollback: false };
    }
    regroupState.reasons.push(reason);
    if (kind === 'rollback') regroupState.rollback = true;
    for (const x of byRank) {
      if (regroupState.ready.has(x)) continue;
      void server.send(x.peer, 'command', { kind: kind === 'rollback' ? Kind.ROLLBACK : Kind.REGROUP, reason, generation }).catch(() => undefined);
    }
    tryFinishRegroup();
  }
  /** Rank 0 gone after the last collective, before confirming summary.json and the final checkpoint. */
  function lastFilesMissing(member: Member, what: string, logTail?: string[], logFile?: string): WorkerFailedError {
    const slot = member.local ? slots[member.slot] : undefined;
    return new WorkerFailedError(
      member.rank, member.host, null, null,
      `${what}, before confirming the run's last files (summary.json, the final checkpoint): check them; the checkpoints it had written are intact`,
      logTail ?? slot?.tail ?? [], logFile ?? slot?.logFile ?? `its log on host ${member.host}`,
    );
  }
  /**
   * The run completed (a member sent its final report) but `member`'s copy of the last collective
   * failed, so it asks to regroup: nobody finished can answer, and there is nothing to redo. It
   * is stopped instead and leaves the group; the others' final reports stand. If it is rank 0,
   * which writes the run's last files after that collective, they are missing: the run fails.
   */
  function release(member: Member, why: string): void {
    if (member.released !== undefined || member.lost !== undefined) return;
    member.released = why;
    const i = byRank.indexOf(member);
    if (i >= 0) byRank.splice(i, 1);
    void server.send(member.peer, 'command', { kind: Kind.STOP, reason: `the run is complete: ${why}` }).catch(() => undefined);
    emit({ kind: 'released', rank: member.rank, host: member.host, reason: why });
    if (member.rank === 0) {
      failed(lastFilesMissing(member, why));
      return;
    }
    checkRemoteFinished();
  }
  function onRegroupReport(member: Member, r: RegroupReport): void {
    if (r.generation !== generation || !byRank.includes(member)) return metrics.countMalformedMessages();
    if (!Array.isArray(r.endpoints) || !r.endpoints.length || typeof r.committed !== 'object' || r.committed === null) return metrics.countMalformedMessages();
    const key = typeof r.key === 'string' ? r.key : '';
    // With CURVE a member keeps the key it proved in its Hello: the others' rings admit the key
    // named here on their links to it.
    if (o.keys && key !== member.key) {
      process.stderr.write(`coordinator: ignored a regroup report of rank ${member.rank} on host ${member.host}: its ring key ${key.slice(0, 40) || '(none)'} is not the key it proved in its Hello (${member.key})\n`);
      return metrics.countMalformedMessages();
    }
    if (byRank.some((x) => x.final !== undefined)) {
      return release(member, `its last collective failed after the others completed it (${typeof r.reason === 'string' ? r.reason : 'its ring failed'})`);
    }
    // A worker whose ring failed (a neighbour died or went silent) regroups on its own, often
    // before this process has noticed anything: its report starts the regroup for everyone.
    if (!regroupState) startRegroup('rollback', `rank ${member.rank} on host ${member.host} left the group: ${typeof r.reason === 'string' ? r.reason : 'its ring failed'}`);
    if (!regroupState) return;
    member.endpoints = r.endpoints.map(String);
    member.key = key;
    member.lastHeard = Date.now();
    regroupState.ready.set(member, r);
    tryFinishRegroup();
  }
  function tryFinishRegroup(): void {
    const st = regroupState;
    if (!st || failure || byRank.length === 0 || !byRank.every((x) => st.ready.has(x))) return;
    clearTimeout(st.timer);
    regroupState = undefined;
    const survivors = [...byRank].sort((a, b) => a.rank - b.rank);
    const joiners = pendingJoiners.splice(0).sort((a, b) => (a.host < b.host ? -1 : a.host > b.host ? 1 : a.localRank - b.localRank));
    const ahead = (a: RegroupReport, b: RegroupReport) => a.committed.epoch - b.committed.epoch || a.committed.done - b.committed.done || a.committed.step - b.committed.step;
    let rootMember = survivors[0];
    for (const x of survivors) if (ahead(st.ready.get(x)!, st.ready.get(rootMember)!) > 0) rootMember = x;
    byRank.length = 0;
    byRank.push(...survivors, ...joiners);
    byRank.forEach((x, r) => {
      x.rank = r;
      x.lastHeard = Date.now();
      x.warned = false;
    });
    generation++;
    // Series are labelled by rank: ranks the smaller group no longer has are dropped.
    for (let r = byRank.length; r < worldSize; r++) metrics.forgetWorker(r);
    worldSize = byRank.length;
    const stop = worldSize < minWorkers;
    const regroup = { root: rootMember.rank, stop, reason: st.reasons.join('; ') };
    const peers = byRank.map((x) => ({ rank: x.rank, host: x.host, dataEndpoints: x.endpoints, curvePublicKey: x.key }));
    for (const x of byRank) {
      const configJson = joiners.includes(x) ? JSON.stringify({ ...(runConfig as object), regroup }) : JSON.stringify({ regroup });
      void server.send(x.peer, 'welcome', { rank: x.rank, worldSize, generation, peers, heartbeatMs, timeoutMs, configJson }).catch(() => undefined);
    }
    tellAgents();
    metrics.setWorkers(worldSize, worldSize);
    metrics.countRegroup();
    emit({ kind: 'regrouped', generation, worldSize, root: regroup.root, reason: regroup.reason, stop, hosts: groupHosts() });
  }
  let runConfig: unknown = o.config;

  // Heartbeats to every worker, and the stall inspector (Horovod's, in spirit): a late worker is
  // named first, and declared lost only after the timeout.
  const heartbeatTimer = setInterval(() => {
    if (!welcomed || failure) return;
    const now = Date.now();
    for (const x of [...byRank]) {
      void server.send(x.peer, 'heartbeat', { rank: x.rank, unixMs: now }).catch(() => undefined);
      if (x.final !== undefined || regroupState?.ready.has(x)) continue;
      const silent = now - x.lastHeard;
      metrics.setHeartbeatAge(x.rank, x.host, silent / 1000);
      // Late: past 5 intervals, 2 of its own step times (a step's compute blocks its heartbeats)
      // and a quarter of the timeout, whichever is longest.
      const warnAfter = Math.max(5 * heartbeatMs, 2 * x.stepMs, timeoutMs / 4);
      if (!x.started && silent <= Math.max(timeoutMs, joinTimeoutMs)) continue;
      if (silent > timeoutMs) {
        const why = `no heartbeat for ${(silent / 1000).toFixed(1)} s (timeout ${timeoutMs / 1000} s; last activity: ${x.activity} at step ${x.step}): it hung, was stopped, or its network is down`;
        if (elastic) declareLost(x, why, 'timeout');
        else {
          const slot = x.local ? slots[x.slot] : undefined;
          failed(new WorkerFailedError(x.rank, x.host, null, null, why, slot?.tail ?? [], slot?.logFile ?? `its log on host ${x.host}`));
        }
      } else if (silent > warnAfter && !x.warned) {
        x.warned = true;
        metrics.countStallWarning(x.rank, x.host);
        emit({ kind: 'stall', rank: x.rank, host: x.host, silentSec: silent / 1000, activity: x.activity, step: x.step, timeoutSec: timeoutMs / 1000 });
      } else if (silent <= warnAfter) x.warned = false;
    }
    for (const node of nodes.values()) if (node.agent) void server.send(node.agent, 'heartbeat', { rank: 0, unixMs: now }).catch(() => undefined);
  }, heartbeatMs);
  heartbeatTimer.unref();

  server.onMessage((e: ControlEnvelope) => {
    const m = e.message;
    const key = e.peer.toString('hex');
    if (m.kind === 'hello') {
      const h = m.body as { host?: string; localRank?: number; localWorldSize?: number; requestedRank?: number; dataEndpoints?: string[]; device?: string; curvePublicKey?: string };
      const requested = h.requestedRank ?? 0; // proto3 omits 0
      const host = h.host ?? '';
      const localRank = h.localRank ?? 0;
      const refuse = (why: string) => void server.send(e.peer, 'error', { code: Code.REFUSED, message: why, rank: requested, host }).catch(() => undefined);
      const during = welcomed && elastic;
      if (welcomed && !elastic) return refuse(`the run already started with ${worldSize} workers (start it with --elastic to admit workers while it runs)`);
      if (!host) return refuse('a Hello needs a host');
      // The host is printed to the operator's terminal and labels metrics: a name, not text.
      if (!HOST_NAME.test(host)) {
        const shown = JSON.stringify(host.slice(0, 64)) + (host.length > 64 ? ` (and ${host.length - 64} more characters)` : '');
        return refuse(`a Hello's host must be a host name: at most 253 letters, digits, '.', '-' and '_', starting with a letter or digit; got ${shown} (pnpm cli join --host NAME, or DTRAIN_HOST)`);
      }
      // The connection passed the CURVE handshake with an allow-listed key; the key a Hello names
      // for its ring must be allow-listed too, or the other workers would connect to a stranger.
      if (o.keys && !allowedKeys.has(e.authenticatedKey ?? h.curvePublicKey ?? '')) {
        const why = h.curvePublicKey ? `its key ${h.curvePublicKey}` : 'it sent no CURVE key (started without --keys?)';
        countAuthRefused(`hello key not allowed`);
        process.stderr.write(`coordinator: refused a Hello from host ${host}: ${why} is not in ${o.keys.dir}/allowed_keys\n`);
        return refuse(`host ${host} is not allowed: ${why} is not in the coordinator's allow-list (${o.keys.dir}/allowed_keys); on the coordinator's machine run: pnpm cli keys add-peer '<line of pnpm cli keys show on ${host}>'`);
      }
      const sameName = `host ${host} has the same name as the coordinator's machine: give every machine its own name (pnpm cli join --host NAME, or DTRAIN_HOST)`;
      if (requested === NODE_AGENT_RANK || requested === -1) {
        if (!multi && !during) return refuse(`this coordinator runs on one machine (${n} workers); start it with --nodes M --listen ADDR:PORT to accept workers of other machines, or --elastic to admit them while it runs`);
        if (host === localHost) return refuse(sameName);
        let node = nodes.get(host);
        if (during && requested === NODE_AGENT_RANK) {
          // Elastic: a machine (new, or back after losing its workers) adds workers to the running group.
          const more = h.localWorldSize ?? 0;
          if (more < 1) return refuse(`host ${host} did not say how many workers it starts (LOCAL_WORLD_SIZE): start them with pnpm cli join`);
          if (!node) nodes.set(host, (node = { host, expected: 0 }));
          node.expected = joinedOn(host) + more;
          emit({ kind: 'node', host, workers: more, nodes: nodes.size + 1, expectedNodes: nodes.size + 1 });
        }
        if (!node) {
          if (nodes.size >= nodesExpected - 1) {
            return refuse(`the run expects ${nodesExpected} machines and all have joined (this one${[...nodes.keys()].map((x) => `, ${x}`).join('')}); host ${host} is one too many`);
          }
          const expected = h.localWorldSize ?? 0;
          if (expected < 1) return refuse(`host ${host} did not say how many workers it starts (LOCAL_WORLD_SIZE): start them with pnpm cli join`);
          node = { host, expected };
          nodes.set(host, node);
          emit({ kind: 'node', host, workers: expected, nodes: nodes.size + 1, expectedNodes: nodesExpected });
          metrics.setWorkers(members.size, expectedWorld());
        }
        if (requested === NODE_AGENT_RANK) {
          node.agent = e.peer;
          agents.set(key, host);
          // The reply carries the run id, so the join process's later reports are accepted.
          void server.send(e.peer, 'command', { kind: Kind.START, reason: elastic ? 'registered (elastic)' : 'registered', elastic }).catch(() => undefined);
          return checkJoined();
        }
        if ([...members.values()].some((x) => x.host === host && x.localRank === localRank)) return refuse(`local rank ${localRank} of host ${host} already joined`);
        if (joinedOn(host) >= node.expected) return refuse(`host ${host} registered ${node.expected} workers, and all of them have joined`);
      } else {
        if (!Number.isInteger(requested) || requested < 0 || requested >= n) return refuse(`RANK ${requested} is not in 0..${n - 1}`);
        const taken = [...members.values()].find((x) => x.local && x.rank === requested);
        if (taken) return refuse(`rank ${requested} already joined from host ${taken.host}`);
      }
      if (!(h.dataEndpoints ?? []).length) return refuse('a Hello needs the ring endpoints');
      const member: Member = {
        peer: e.peer, host, localRank, local: requested >= 0, endpoints: h.dataEndpoints ?? [], device: h.device ?? '', key: o.keys ? (e.authenticatedKey ?? h.curvePublicKey ?? '') : (h.curvePublicKey ?? ''),
        rank: requested, slot: requested, lastHeard: Date.now(), activity: 'idle', step: 0, stepMs: 0, warned: false, started: false, rejectedSeen: 0,
      };
      members.set(key, member);
      if (during) {
        // Admitted at the next step boundary: the group finishes its step, then regroups with it.
        pendingJoiners.push(member);
        emit({ kind: 'joined', rank: -1, host, device: member.device, joined: members.size, expected: members.size });
        startRegroup('join', `host ${host} joins with local rank ${localRank}`);
        return;
      }
      metrics.setWorkers(members.size, expectedWorld());
      emit({ kind: 'joined', rank: requested, host, device: member.device, joined: members.size, expected: expectedWorld() });
      checkJoined();
    } else if (m.kind === 'heartbeat') {
      const member = members.get(key);
      if (!member) return;
      const hb = m.body as { activity?: number; step?: number | { toNumber(): number } };
      member.lastHeard = Date.now();
      member.activity = ACTIVITY_NAMES[hb.activity ?? 0] ?? 'unknown';
      if ((hb.activity ?? 0) !== 0) member.started = true;
      member.step = typeof hb.step === 'number' ? hb.step : (hb.step?.toNumber() ?? member.step);
    } else if (m.kind === 'stepReport') {
      const r = m.body as StepReportBody;
      // The connection says who sent it, not the message (proto3 also omits rank 0).
      const member = members.get(key);
      if (!member || !welcomed) return;
      member.lastHeard = Date.now();
      member.started = true;
      const rank = member.rank;
      if (!r.detailJson) {
        if (r.stepMs !== undefined) member.stepMs = r.stepMs;
        // The host label is the one it joined with: a report cannot mint new series.
        return observeStep(metrics, rank, member.host, r);
      }
      let detail: Record<string, unknown>;
      try {
        detail = JSON.parse(r.detailJson) as Record<string, unknown>;
        if (typeof detail !== 'object' || detail === null) return metrics.countMalformedMessages();
      } catch {
        return metrics.countMalformedMessages();
      }
      if (detail.kind === 'regroup') return onRegroupReport(member, detail as unknown as RegroupReport);
      if (detail.kind === 'rejected') {
        // A worker's sockets dropped messages (garbage, strangers, replays): into the run's metric.
        const total = num(detail.total);
        if (total > member.rejectedSeen) metrics.countMalformedMessages(total - member.rejectedSeen);
        member.rejectedSeen = Math.max(member.rejectedSeen, total);
        return;
      }
      reports.push({ rank, detail });
      if (rank === 0) observeRank0(metrics, detail, worldSize);
      if (detail.kind === 'done') {
        member.final = detail;
        // The acknowledgement lets the worker exit knowing its report arrived.
        void server.send(e.peer, 'command', { kind: Kind.STOP, reason: 'done' }).catch(() => undefined);
        // A regroup started before this report (a member failed in the last collective) is moot:
        // training is over. Those that already asked to regroup are released; later askers too.
        const st = regroupState;
        if (st) {
          clearTimeout(st.timer);
          regroupState = undefined;
          for (const x of [...st.ready.keys()]) if (x.final === undefined) release(x, 'its last collective failed after others completed it');
        }
        checkRemoteFinished();
      }
      emit({ kind: 'report', rank, detail });
    } else if (m.kind === 'error') {
      const err = m.body as dtrain.Error.$Properties;
      const agentHost = agents.get(key);
      if (agentHost !== undefined) {
        // A join process reports one of its workers' exit.
        const we = err.workerExit;
        if (!we) return metrics.countMalformedMessages();
        const x: AgentExitReport = {
          localRank: we.localRank ?? 0,
          exitCode: we.signal ? null : (we.exitCode ?? 0),
          signal: we.signal || null,
          reason: err.message || undefined,
          logTail: err.logTail ?? [],
          logFile: we.logFile ?? '',
        };
        remoteExits.push({ host: agentHost, report: x });
        if (elastic && welcomed) {
          const w = [...members.values()].find((mm) => !mm.local && mm.host === agentHost && mm.localRank === x.localRank);
          if (w) declareLost(w, x.signal ? `was killed by ${x.signal}` : `exited with code ${x.exitCode}${x.reason ? `: ${x.reason}` : ''}`, x.signal ? 'signal' : 'exit', x.logTail, `${x.logFile} on host ${agentHost}`);
          return;
        }
        return collectRemoteFailures();
      }
      const member = members.get(key);
      if (!member) return;
      if (member.error === undefined) member.error = err.message ?? undefined;
      if (elastic && welcomed) {
        // Its process exits next (a local child's exit, or its join process's report) and is
        // declared lost then; a remote one that says this much is lost already.
        if (!member.local) declareLost(member, `failed: ${err.message}`, 'exit');
        return;
      }
      if (!member.local) collectRemoteFailures();
    } else if (m.kind === 'fileRequest') {
      const req = m.body as { name?: string; offset?: number | { toNumber(): number } };
      if (!members.has(key)) return;
      const name = req.name ?? '';
      const offset = typeof req.offset === 'number' ? req.offset : (req.offset?.toNumber() ?? 0);
      const f = offered.get(name);
      // One request read at a time per peer (a worker fetches chunk after chunk): a flood of ~30-byte
      // requests would otherwise make the coordinator read a 4 MiB chunk for each; what is queued
      // to a peer that does not read is bounded by the control socket's send high-water mark.
      const refusal = !f ? `this coordinator does not offer '${name}'`
        : offset > f.size ? `offset ${offset} is beyond the ${f.size} bytes of ${name}`
        : fileRequestsInFlight.has(key) ? `one file request at a time: '${name}' at ${offset} came before the chunk of the previous one was sent`
        : undefined;
      if (!f || refusal !== undefined) {
        void server.send(e.peer, 'error', { code: Code.REFUSED, message: refusal, rank: -1, host: localHost }).catch(() => undefined);
        return;
      }
      fileRequestsInFlight.add(key);
      void (async () => {
        const fh = await fs.promises.open(f.file, 'r');
        try {
          const len = Math.min(FILE_CHUNK_BYTES, f.size - offset);
          const buf = Buffer.allocUnsafe(len);
          let got = 0;
          while (got < len) {
            const { bytesRead } = await fh.read(buf, got, len - got, offset + got);
            if (bytesRead === 0) break;
            got += bytesRead;
          }
          // Cleared before the send: the worker asks for the next chunk as soon as this one arrives.
          fileRequestsInFlight.delete(key);
          await server.send(e.peer, 'fileChunk', { name, offset, totalSize: f.size, sha256: f.sha256 }, [buf.subarray(0, got)]);
        } finally {
          await fh.close();
        }
      })().catch((err: unknown) => {
        fileRequestsInFlight.delete(key);
        void server.send(e.peer, 'error', { code: Code.REFUSED, message: `the coordinator could not read ${f.file}: ${(err as Error).message}`, rank: -1, host: localHost }).catch(() => undefined);
      });
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
  /**
   * Workers waiting for admission into an elastic run, and machines none of whose workers got in,
   * hear why the run ends without them (their join exits non-zero saying so), before the socket closes.
   */
  const tellNotAdmitted = async (why: string) => {
    const waiting = pendingJoiners.splice(0).map((x) => server.send(x.peer, 'error', { code: Code.SHUTDOWN, message: `${why}: local rank ${x.localRank} of host ${x.host}`, rank: -1, host: localHost }));
    const outside = [...nodes.values()].filter((node) => node.agent && !byRank.some((x) => x.host === node.host));
    const agents = outside.map((node) => server.send(node.agent!, 'error', { code: Code.SHUTDOWN, message: `${why}: host ${node.host}`, rank: -1, host: localHost }));
    await Promise.all([...waiting, ...agents].map((p) => p.catch(() => undefined)));
  };
  const failWith = async (err: Error): Promise<never> => {
    clearTimeout(remoteGrace);
    clearInterval(heartbeatTimer);
    if (regroupState) clearTimeout(regroupState.timer);
    // The join processes stop their workers and exit non-zero with this message.
    for (const node of nodes.values()) {
      if (node.agent) void server.send(node.agent, 'error', { code: Code.SHUTDOWN, message: err.message, rank: -1, host: localHost }).catch(() => undefined);
    }
    await killAll();
    await server.close();
    await stopMetrics();
    throw err;
  };

  // Rendezvous, with a deadline.
  let joinTimer: NodeJS.Timeout | undefined;
  const joinDeadline = new Promise<'timeout'>((resolve) => (joinTimer = setTimeout(() => resolve('timeout'), joinTimeoutMs)));
  const first = await Promise.race([everyoneJoined.then(() => 'joined' as const), firstFailure.then(() => 'failed' as const), joinDeadline]);
  clearTimeout(joinTimer);
  if (first === 'failed') return failWith(failure!);
  if (first === 'timeout') return failWith(new JoinTimeoutError(joinTimeoutMessage()));

  // Ranks: this machine's workers first (their RANK), then the other machines' by host name, each by local rank.
  const local = [...members.values()].filter((x) => x.local).sort((a, b) => a.rank - b.rank);
  const remote = [...members.values()].filter((x) => !x.local).sort((a, b) => (a.host < b.host ? -1 : a.host > b.host ? 1 : a.localRank - b.localRank));
  byRank.push(...local, ...remote);
  worldSize = byRank.length;
  byRank.forEach((x, r) => (x.rank = r));
  const peers = byRank.map((x) => ({ rank: x.rank, host: x.host, dataEndpoints: x.endpoints, curvePublicKey: x.key }));
  const config = offered.size && typeof o.config === 'object' && o.config !== null ? { ...o.config, offeredFiles: [...offered.values()].map(({ name, size, sha256 }) => ({ name, size, sha256 })) } : o.config;
  runConfig = elastic && typeof config === 'object' && config !== null ? { ...config, elastic: true } : config;
  const configJson = JSON.stringify(runConfig);
  welcomed = true;
  for (const x of byRank) x.lastHeard = Date.now();
  metrics.setWorkers(worldSize, worldSize);
  await Promise.all(byRank.map((x) => server.send(x.peer, 'welcome', { rank: x.rank, worldSize, generation: 1, peers, heartbeatMs, timeoutMs, configJson })));
  tellAgents();
  emit({ kind: 'welcomed', worldSize, hosts: groupHosts() });
  if (remote.length === 0) remoteFinished();

  // Training: ends when every local worker exited and every other machine's worker sent its final
  // report, or at the first failure anywhere.
  const all = Promise.all([...slots.map((s) => s.exited), remoteDone]);
  // Once this machine's workers are done, the others' final reports are at most a timeout away:
  // a machine that vanished after the last collective must not leave the coordinator waiting.
  let lateTimer: NodeJS.Timeout | undefined;
  let settled = false;
  const late = Promise.all(slots.map((s) => s.exited)).then(
    () =>
      new Promise<'late'>((resolve) => {
        if (!settled) lateTimer = setTimeout(() => resolve('late'), timeoutMs);
      }),
  );
  const outcome = await Promise.race([all.then(() => 'exited' as const), firstFailure.then(() => 'failed' as const), late]);
  settled = true;
  clearTimeout(lateTimer);
  if (outcome === 'late' && !failure) {
    const silent = byRank.filter((x) => !x.local && x.final === undefined);
    failed(
      new WorkerFailedError(silent[0].rank, silent[0].host, null, null, `sent no final report within ${timeoutMs} ms after this machine's workers completed (ranks without one: ${silent.map((x) => `${x.rank} on ${x.host}`).join(', ')}): its machine, its join process or the network went away`, [], `its log on host ${silent[0].host}`),
    );
  }
  if (outcome !== 'exited' || failure) return failWith(failure!);
  // Workers admitted during an elastic run on other machines: their final reports follow at most a timeout later.
  for (const until = Date.now() + timeoutMs; byRank.some((x) => x.final === undefined) && Date.now() < until && !failure; ) await new Promise((r) => setTimeout(r, 50));
  const missing = byRank.filter((x) => x.final === undefined);
  if (missing.length > 0 && !failure) {
    failed(new WorkerFailedError(missing[0].rank, missing[0].host, null, null, `sent no final report within ${timeoutMs} ms after the others completed`, [], `its log on host ${missing[0].host}`));
  }
  if (failure) return failWith(failure);
  clearTimeout(remoteGrace);
  clearInterval(heartbeatTimer);
  await tellNotAdmitted('the run completed before it was admitted (it came after the last step boundary)');
  await server.close();
  await stopMetrics();

  const finals = byRank.map((x) => x.final!);
  const diverged = replicaDivergence(
    byRank.map((x) => ({ rank: x.rank, host: x.host, stateSha256: String(x.final!.stateSha256), log: x.local ? slots[x.slot].logFile : `its log on host ${x.host}` })),
  );
  if (diverged) throw diverged;
  const summary0 = finals[0]?.summary as { status?: string; stopReason?: string; lastCheckpoint?: string | null; runDir?: string | null } | undefined;
  if (summary0?.status === 'stopped') {
    throw new RunStoppedError(
      `the run stopped: ${summary0.stopReason ?? `fewer than ${minWorkers} workers are left`}. ` +
        `Rank 0 wrote ${summary0.lastCheckpoint ?? 'a checkpoint'}; continue with: pnpm cli launch --resume ${summary0.runDir ?? '<run folder>'} --workers N`,
    );
  }
  return { runId, worldSize, finals, reports, hosts: byRank.map((x) => x.host), wallSec: (performance.now() - t0) / 1000, generations: generation, lost: lostMembers.map((x) => ({ rank: x.rank, host: x.host, reason: x.lost ?? '' })) };

  function joinTimeoutMessage(): string {
    const lines: string[] = [];
    const known = expectedWorld();
    lines.push(
      `only ${members.size} of ${known}${nodes.size < nodesExpected - 1 ? '+' : ''} workers joined the coordinator at ${server.endpoint} within ${joinTimeoutMs} ms` +
        (multi ? ` (${nodesExpected} machines expected)` : ''),
    );
    const refused = server.stats().authRefused;
    if (refused > 0) {
      lines[0] += `; ${refused} connection${refused === 1 ? ' was' : 's were'} refused at the CURVE handshake (a key not in ${o.keys?.dir ?? 'the'}/allowed_keys, or a wrong coordinator key: see the log lines above)`;
    }
    const missingLocal = Array.from({ length: n }, (_, r) => r).filter((r) => ![...members.values()].some((x) => x.local && x.rank === r));
    if (!multi) {
      lines[0] += `; missing ranks ${missingLocal.join(', ')} (their logs: ${missingLocal.map((r) => slots[r].logFile).join(', ')})`;
      return lines[0];
    }
    lines.push(
      `  this machine (host ${localHost}): ${n - missingLocal.length} of ${n} workers` +
        (missingLocal.length ? `; missing ranks ${missingLocal.join(', ')} (logs: ${missingLocal.map((r) => slots[r].logFile).join(', ')})` : ''),
    );
    for (const node of nodes.values()) {
      const have = [...members.values()].filter((x) => !x.local && x.host === node.host).map((x) => x.localRank);
      const missing = Array.from({ length: node.expected }, (_, i) => i).filter((i) => !have.includes(i));
      lines.push(`  host ${node.host}: ${have.length} of ${node.expected} workers${missing.length ? `; missing local ranks ${missing.join(', ')} (see the output of pnpm cli join on ${node.host})` : ''}`);
    }
    const absent = nodesExpected - 1 - nodes.size;
    if (absent > 0) {
      lines.push(
        `  ${absent} machine${absent === 1 ? ' has' : 's have'} not connected: run \`pnpm cli join ${advertise ?? masterAddr}:${server.port} --workers N\` there, ` +
          `and check that TCP port ${server.port} of ${advertise ?? masterAddr} is reachable from it`,
      );
    }
    return lines.join('\n');
  }
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
    const v = (info.versions ?? {}) as Record<string, unknown>;
    metrics.setBuildInfo({ version: str(v.dtrain), tfjs: str(v.tfjs), tensorflow: str(v.tensorflow), node: str(v.node), backend: str(info.backend), worldSize });
    metrics.setRun({ epochs: num(info.epochs), lr: num(info.lr), startEpoch: num(info.startEpoch, 1) });
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
