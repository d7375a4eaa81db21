// The other side of a multi-machine launch: `join` adds this machine's workers to a run whose
// coordinator (`launch({ nodes, listen })`) waits on another machine. It registers the host with
// the coordinator (Hello with requested rank NODE_AGENT_RANK and the number of workers), starts
// the workers without RANK (the coordinator assigns ranks at the Welcome) and supervises them: a
// worker that fails is reported to the coordinator with its exit code and log tail, and a run the
// coordinator ends stops the workers here. Training options all come from the coordinator.
import fs from 'node:fs';
import path from 'node:path';
import { ControlClient, ControlTimeoutError, countRejected, curveClientSecurity, dtrain, workerEnv, writeWorkerEnv, type KeyMaterial } from '@dtrain/transport';
import { CoordinatorError } from './errors.js';
import { NODE_AGENT_RANK } from './membership.js';
import { deviceForLocalRank } from './gpus.js';
import { startWorker, stopWorkers, type WorkerProcess } from './worker-process.js';

/** A worker of this machine failed, the coordinator refused the host, or it ended the run. */
export class JoinFailedError extends CoordinatorError {
  readonly code = 'E_JOIN_FAILED' as const;
}

export interface JoinOptions {
  /** The coordinator's control socket. */
  masterAddr: string;
  masterPort: number;
  /** Worker processes to start here. */
  workers: number;
  /** The worker script (run as `node --import tsx <entry>`), @dtrain/worker's WORKER_ENTRY. */
  entry: string;
  /** Name of this machine in every message; must differ from the other machines'. */
  host: string;
  /** Address of this machine the others reach: the workers bind and advertise their ring sockets on it. */
  advertise: string;
  /** Worker i binds its ring socket on ringPortBase + i (default: any free port). */
  ringPortBase?: number;
  /** Worker logs: <logDir>/local-<i>.log, lines prefixed by the rank once it is assigned. */
  logDir: string;
  /** Data sets the coordinator sends are cached here (DTRAIN_DATA_DIR of the workers). */
  dataDir?: string;
  /**
   * Where a worker of this machine writes the run's files should it become rank 0 of an elastic
   * run (DTRAIN_RUN_DIR; default: `run` next to logDir). Never a path the coordinator names.
   */
  runDir?: string;
  /** Worker i sees only the i-th GPU of the user's CUDA_VISIBLE_DEVICES (unset: GPU i); see gpus.ts. */
  gpus?: boolean;
  /** How long to wait for the coordinator's answer and for the run to start (default 120 s). */
  joinTimeoutMs?: number;
  /** Ring collective timeout of the workers (default 120 s). */
  timeoutMs?: number;
  env?: NodeJS.ProcessEnv;
  /** CURVE: this machine's key pair and allow-list, and the coordinator's public key (both or neither). */
  keys?: KeyMaterial;
  coordinatorKey?: string;
  /** Without keys: no encryption chosen explicitly (`--insecure`), so the workers may bind beyond loopback (DTRAIN_INSECURE=1). */
  insecure?: boolean;
  onEvent?: (e: JoinEvent) => void;
  tailLines?: number;
}

export type JoinEvent =
  | { kind: 'registered'; runId: string }
  | { kind: 'spawned'; localRank: number; pid: number; logFile: string }
  | { kind: 'assigned'; localRank: number; rank: number; worldSize: number; generation: number };

export interface JoinResult {
  /** Rank of each local worker, by local rank. */
  ranks: number[];
  worldSize: number;
}

export async function join(o: JoinOptions): Promise<JoinResult> {
  const n = o.workers;
  if (!Number.isInteger(n) || n < 1) throw new RangeError(`workers must be a positive integer, got ${n}`);
  if (o.gpus) deviceForLocalRank(0, n, { ...process.env, ...o.env }); // too few visible GPUs: refused before anything starts
  if ((o.keys === undefined) !== (o.coordinatorKey === undefined)) throw new RangeError('join: keys and coordinatorKey go together (CURVE) or are both absent');
  if (o.keys && o.insecure) throw new RangeError('join: keys and insecure exclude each other');
  const emit = o.onEvent ?? (() => undefined);
  const where = `${o.masterAddr}:${o.masterPort}`;
  fs.mkdirSync(o.logDir, { recursive: true });

  const { control, elastic } = await register(o, where);
  emit({ kind: 'registered', runId: control.runId });
  const ranks = new RankBook(n, emit);
  const workers = startWorkers(o, ranks);
  const stopAll = () => void stopWorkers(workers.map((w) => w.child)).unref();
  process.on('SIGINT', stopAll);
  process.on('SIGTERM', stopAll);
  const coordinator = listen(control, o.timeoutMs ?? 60_000, ranks, stopAll);
  const exits = workers.map((w, i) => w.exited.then((x) => w.logged.then((): Exit => ({ i, code: x.code, signal: x.signal, tail: w.tail, logFile: w.logFile }))));
  const { firstFailure, lostHere } = await reportFailures(exits, { control, host: o.host, elastic, stopAll, coordinatorSaid: coordinator.said });
  await coordinator.stop();
  await control.close();
  process.off('SIGINT', stopAll);
  process.off('SIGTERM', stopAll);
  const results = await Promise.all(exits);
  const said = coordinator.said();
  if (said !== undefined) throw new JoinFailedError(`the coordinator at ${where} ended the run: ${said}`);
  const f = firstFailure ?? results.find((r) => r.code !== 0 && !lostHere.includes(r));
  if (f || (elastic && lostHere.length === results.length)) {
    const x = f ?? lostHere[0];
    const rank = ranks.of(x.i) >= 0 ? `rank ${ranks.of(x.i)} (local worker ${x.i})` : `local worker ${x.i}`;
    throw new JoinFailedError(
      `${rank} on host ${o.host} ${x.signal ? `was killed by ${x.signal}` : `exited with code ${x.code}`}. Last lines of its log (${x.logFile}):\n${x.tail.map((l) => `  ${l}`).join('\n') || '  (empty)'}`,
    );
  }
  return { ranks: ranks.ranks, worldSize: ranks.worldSize };
}

type Exit = { i: number; code: number | null; signal: NodeJS.Signals | null; tail: string[]; logFile: string };

/** Registers this machine; the answer carries the run id (so later reports are accepted) and whether the run is elastic. */
async function register(o: JoinOptions, where: string): Promise<{ control: ControlClient; elastic: boolean }> {
  const security = o.keys && o.coordinatorKey ? curveClientSecurity(o.keys, o.coordinatorKey) : undefined;
  const control = new ControlClient(`tcp://${where}`, { timeoutMs: o.joinTimeoutMs ?? 120_000, who: `dtrain join on host ${o.host}`, security });
  try {
    await control.send('hello', {
      host: o.host,
      pid: process.pid,
      localRank: 0,
      localWorldSize: o.workers,
      requestedRank: NODE_AGENT_RANK,
      dataEndpoints: [],
      device: o.gpus ? 'cuda' : 'cpu',
      curvePublicKey: o.keys?.publicKey ?? '',
    });
    const reply = await control.receive(`the registration of host ${o.host}`);
    if (reply.kind === 'error') throw new JoinFailedError(`the coordinator at ${where} refused host ${o.host}: ${(reply.body as { message?: string }).message ?? 'no reason given'}`);
    control.runId = reply.runId;
    // An elastic run: a worker lost here is the coordinator's business, the others go on.
    return { control, elastic: reply.kind === 'command' && (reply.body as dtrain.Command.$Properties).elastic === true };
  } catch (e) {
    await control.close().catch(() => undefined);
    throw e;
  }
}

/** The rank of each local worker, from the coordinator's RankAssignment after each round of Welcomes (-1: none yet). */
class RankBook {
  readonly ranks: number[];
  worldSize = 0;
  private generation = 0;

  constructor(n: number, private readonly emit: (e: JoinEvent) => void) {
    this.ranks = new Array<number>(n).fill(-1);
  }

  of(localRank: number): number {
    return this.ranks[localRank];
  }

  apply(a: dtrain.RankAssignment.$Properties): void {
    const generation = a.generation ?? 0;
    const world = a.worldSize ?? 0;
    const got = a.ranks ?? [];
    if (generation < this.generation || got.some((r) => !Number.isInteger(r) || r < -1 || r >= world)) return countRejected('bad rankAssignment');
    this.generation = generation;
    this.worldSize = world;
    this.ranks.forEach((_, i) => {
      const rank = got[i] ?? -1;
      if (rank === this.ranks[i]) return;
      this.ranks[i] = rank;
      if (rank >= 0) this.emit({ kind: 'assigned', localRank: i, rank, worldSize: world, generation });
    });
  }
}

/** This machine's workers, without RANK or WORLD_SIZE: the coordinator assigns the rank, the Welcome says the world size. */
function startWorkers(o: JoinOptions, ranks: RankBook): WorkerProcess[] {
  const n = o.workers;
  const workers: WorkerProcess[] = [];
  for (let i = 0; i < n; i++) {
    const env = writeWorkerEnv(
      {
        localRank: i,
        localWorldSize: n,
        masterAddr: o.masterAddr,
        masterPort: o.masterPort,
        host: o.host,
        listen: o.advertise,
        advertise: o.advertise,
        joinTimeoutMs: o.joinTimeoutMs ?? 120_000,
        timeoutMs: o.timeoutMs ?? 60_000,
        dataDir: o.dataDir ? path.resolve(o.dataDir) : undefined,
        runDir: path.resolve(o.runDir ?? path.join(path.dirname(o.logDir), 'run')),
        ringPort: o.ringPortBase !== undefined ? o.ringPortBase + i : undefined,
        cudaVisibleDevices: o.gpus ? deviceForLocalRank(i, n, { ...process.env, ...o.env }) : undefined,
        keys: o.keys && o.coordinatorKey ? { dir: o.keys.dir, coordinatorKey: o.coordinatorKey } : undefined,
        insecure: o.insecure ?? false,
      },
      { ...process.env, ...o.env },
    );
    const prefix = () => (ranks.of(i) >= 0 ? `[rank ${ranks.of(i)}]` : `[local ${i}]`);
    const w = startWorker({ entry: o.entry, env: workerEnv(env), logFile: path.join(o.logDir, `local-${i}.log`), tailLines: o.tailLines ?? 15, prefix });
    workers.push(w);
    o.onEvent?.({ kind: 'spawned', localRank: i, pid: w.child.pid ?? -1, logFile: w.logFile });
  }
  return workers;
}

/**
 * Listens to the coordinator while the workers run: rank assignments, and the end of a failed run
 * (Error SHUTDOWN), which stops the workers. `said()` is why the coordinator ended the run.
 */
function listen(control: ControlClient, timeoutMs: number, ranks: RankBook, stopAll: () => void): { stop(): Promise<void>; said(): string | undefined } {
  let ended = false;
  let said: string | undefined;
  let lastHeard = Date.now();
  const listening = (async () => {
    while (!ended) {
      try {
        const m = await control.receive('the run', 1000);
        lastHeard = Date.now();
        if (m.kind === 'rankAssignment') ranks.apply(m.body as dtrain.RankAssignment.$Properties);
        if (m.kind === 'error') {
          said = (m.body as { message?: string }).message ?? 'no reason given';
          return stopAll();
        }
      } catch (e) {
        if (!(e instanceof ControlTimeoutError)) return; // the connection is gone: the workers notice on their own
        // The coordinator sends a heartbeat every second or so: silence past the timeout means it is
        // gone. The workers judge the same silence from their own heartbeats and exit saying so;
        // this process waits 2 s more and stops only those that did not (hung ones).
        if (Date.now() - lastHeard > timeoutMs + 2000) {
          said = `it has been silent for ${((Date.now() - lastHeard) / 1000).toFixed(1)} s (timeout ${timeoutMs / 1000} s): it died or the network is down; its run folder's last checkpoint is intact (--resume)`;
          return stopAll();
        }
      }
    }
  })();
  return {
    stop: async () => {
      ended = true;
      await listening;
    },
    said: () => said,
  };
}

/**
 * Reports each worker that exits non-zero to the coordinator (Error WORKER_FAILED with its exit and
 * log tail). Not elastic: the first failure stops the others. Elastic: the others train on.
 */
async function reportFailures(
  exits: Promise<Exit>[],
  r: { control: ControlClient; host: string; elastic: boolean; stopAll: () => void; coordinatorSaid: () => string | undefined },
): Promise<{ firstFailure: Exit | undefined; lostHere: Exit[] }> {
  let firstFailure: Exit | undefined;
  const lostHere: Exit[] = [];
  const report = async (x: Exit) => {
    if (x.code === 0 || r.coordinatorSaid() !== undefined) return;
    if (firstFailure && !r.elastic) return;
    const reason = [...x.tail].reverse().find((l) => l.startsWith('error: '))?.slice('error: '.length);
    const workerExit = { localRank: x.i, exitCode: x.code ?? 0, signal: x.signal ?? '', logFile: x.logFile };
    await r.control.send('error', { code: dtrain.Error.Code.WORKER_FAILED, message: reason ?? '', rank: -1, host: r.host, logTail: x.tail, workerExit }).catch(() => undefined);
    if (r.elastic) {
      // The coordinator regroups without it; this machine's other workers train on.
      lostHere.push(x);
      return;
    }
    firstFailure = x;
    r.stopAll();
  };
  await Promise.all(exits.map((p) => p.then(report)));
  return { firstFailure, lostHere };
}
