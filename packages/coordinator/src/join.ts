// The other side of a multi-machine launch: `join` adds this machine's workers to a run whose
// coordinator (`launch({ nodes, listen })`) waits on another machine. It registers the host with
// the coordinator (Hello with requested rank NODE_AGENT_RANK and the number of workers), starts
// the workers without RANK (the coordinator assigns ranks at the Welcome) and supervises them: a
// worker that fails is reported to the coordinator with its exit code and log tail, and a run the
// coordinator ends stops the workers here. Training options all come from the coordinator.
import { spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { createInterface } from 'node:readline';
import { ControlClient, ControlTimeoutError, countRejected, curveClientSecurity, dtrain, workerEnv, writeWorkerEnv, type KeyMaterial } from '@dtrain/transport';
import { CoordinatorError, NODE_AGENT_RANK } from './coordinator.js';
import { deviceForLocalRank } from './gpus.js';

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
  const joinTimeoutMs = o.joinTimeoutMs ?? 120_000;
  const tailLines = o.tailLines ?? 15;
  const emit = o.onEvent ?? (() => undefined);
  const where = `${o.masterAddr}:${o.masterPort}`;
  fs.mkdirSync(o.logDir, { recursive: true });

  // Register this machine; the answer carries the run id, so later reports are accepted.
  if ((o.keys === undefined) !== (o.coordinatorKey === undefined)) throw new RangeError('join: keys and coordinatorKey go together (CURVE) or are both absent');
  if (o.keys && o.insecure) throw new RangeError('join: keys and insecure exclude each other');
  const security = o.keys && o.coordinatorKey ? curveClientSecurity(o.keys, o.coordinatorKey) : undefined;
  const control = new ControlClient(`tcp://${where}`, { timeoutMs: joinTimeoutMs, who: `dtrain join on host ${o.host}`, security });
  let runId: string;
  let elastic = false;
  const timeoutMs = o.timeoutMs ?? 60_000;
  try {
    await control.send('hello', {
      host: o.host,
      pid: process.pid,
      localRank: 0,
      localWorldSize: n,
      requestedRank: NODE_AGENT_RANK,
      dataEndpoints: [],
      device: o.gpus ? 'cuda' : 'cpu',
      curvePublicKey: o.keys?.publicKey ?? '',
    });
    const reply = await control.receive(`the registration of host ${o.host}`);
    if (reply.kind === 'error') throw new JoinFailedError(`the coordinator at ${where} refused host ${o.host}: ${(reply.body as { message?: string }).message ?? 'no reason given'}`);
    runId = reply.runId;
    // An elastic run: a worker lost here is the coordinator's business, the others go on.
    elastic = reply.kind === 'command' && (reply.body as dtrain.Command.$Properties).elastic === true;
  } catch (e) {
    await control.close().catch(() => undefined);
    throw e;
  }
  control.runId = runId;
  emit({ kind: 'registered', runId });

  const children: ChildProcess[] = [];
  // By local rank, from the coordinator's RankAssignment after each round of Welcomes (-1: none yet).
  const ranks: number[] = new Array<number>(n).fill(-1);
  let worldSize = 0;
  let assignedGeneration = 0;
  const applyAssignment = (a: dtrain.RankAssignment.$Properties) => {
    const generation = a.generation ?? 0;
    const world = a.worldSize ?? 0;
    const got = a.ranks ?? [];
    if (generation < assignedGeneration || got.some((r) => !Number.isInteger(r) || r < -1 || r >= world)) return countRejected('bad rankAssignment');
    assignedGeneration = generation;
    worldSize = world;
    ranks.forEach((_, i) => {
      const rank = got[i] ?? -1;
      if (rank === ranks[i]) return;
      ranks[i] = rank;
      if (rank >= 0) emit({ kind: 'assigned', localRank: i, rank, worldSize, generation });
    });
  };
  type Exit = { i: number; code: number | null; signal: NodeJS.Signals | null; tail: string[]; logFile: string };
  const exits: Promise<Exit>[] = [];
  for (let i = 0; i < n; i++) {
    // No RANK, no WORLD_SIZE: the coordinator assigns the rank, the Welcome says the world size.
    const env = writeWorkerEnv(
      {
        localRank: i,
        localWorldSize: n,
        masterAddr: o.masterAddr,
        masterPort: o.masterPort,
        host: o.host,
        listen: o.advertise,
        advertise: o.advertise,
        joinTimeoutMs,
        timeoutMs,
        dataDir: o.dataDir ? path.resolve(o.dataDir) : undefined,
        runDir: path.resolve(o.runDir ?? path.join(path.dirname(o.logDir), 'run')),
        ringPort: o.ringPortBase !== undefined ? o.ringPortBase + i : undefined,
        cudaVisibleDevices: o.gpus ? deviceForLocalRank(i, n, { ...process.env, ...o.env }) : undefined,
        keys: o.keys && o.coordinatorKey ? { dir: o.keys.dir, coordinatorKey: o.coordinatorKey } : undefined,
        insecure: o.insecure ?? false,
      },
      { ...process.env, ...o.env },
    );
    const child = spawn(process.execPath, ['--import', 'tsx', o.entry], { env: workerEnv(env), stdio: ['ignore', 'pipe', 'pipe'] });
    children.push(child);
    const logFile = path.join(o.logDir, `local-${i}.log`);
    const log = fs.createWriteStream(logFile, { flags: 'a' });
    const tail: string[] = [];
    let open = 2;
    const streamsDone = new Promise<void>((resolve) => {
      for (const stream of [child.stdout!, child.stderr!]) {
        const rl = createInterface({ input: stream });
        rl.on('line', (line) => {
          log.write(`${ranks[i] >= 0 ? `[rank ${ranks[i]}]` : `[local ${i}]`} ${line}\n`);
          tail.push(line);
          if (tail.length > tailLines) tail.shift();
        });
        rl.on('close', () => {
          if (--open === 0) log.end(() => resolve());
        });
      }
    });
    exits.push(new Promise((resolve) => child.on('close', (code, signal) => void streamsDone.then(() => resolve({ i, code, signal, tail, logFile })))));
    emit({ kind: 'spawned', localRank: i, pid: child.pid ?? -1, logFile });
  }
  const stopAll = () => {
    for (const c of children) if (c.exitCode === null && c.signalCode === null) c.kill('SIGTERM');
    const t = setTimeout(() => {
      for (const c of children) if (c.exitCode === null && c.signalCode === null) c.kill('SIGKILL');
    }, 5000);
    t.unref();
  };
  const onSignal = () => stopAll();
  process.on('SIGINT', onSignal);
  process.on('SIGTERM', onSignal);

  // The coordinator ends a failed run with Error{SHUTDOWN}; keep listening while the workers run.
  let ended = false;
  let coordinatorSaid: string | undefined;
  let lastHeard = Date.now();
  const listening = (async () => {
    while (!ended) {
      try {
        const m = await control.receive('the run', 1000);
        lastHeard = Date.now();
        if (m.kind === 'rankAssignment') applyAssignment(m.body as dtrain.RankAssignment.$Properties);
        if (m.kind === 'error') {
          coordinatorSaid = (m.body as { message?: string }).message ?? 'no reason given';
          stopAll();
          return;
        }
      } catch (e) {
        if (!(e instanceof ControlTimeoutError)) return; // the connection is gone: the workers notice on their own
        // The coordinator sends a heartbeat every second or so: silence past the timeout means it is
        // gone. The workers judge the same silence from their own heartbeats and exit saying so;
        // this process waits 2 s more and stops only those that did not (hung ones).
        if (Date.now() - lastHeard > timeoutMs + 2000) {
          coordinatorSaid = `it has been silent for ${((Date.now() - lastHeard) / 1000).toFixed(1)} s (timeout ${timeoutMs / 1000} s): it died or the network is down; its run folder's last checkpoint is intact (--resume)`;
          stopAll();
          return;
        }
      }
    }
  })();

  let firstFailure: Exit | undefined;
  const lostHere: Exit[] = [];
  await Promise.all(
    exits.map((p) =>
      p.then(async (x) => {
        if (x.code === 0 || coordinatorSaid !== undefined) return;
        if (firstFailure && !elastic) return;
        const reason = [...x.tail].reverse().find((l) => l.startsWith('error: '))?.slice('error: '.length);
        const workerExit = { localRank: x.i, exitCode: x.code ?? 0, signal: x.signal ?? '', logFile: x.logFile };
        await control.send('error', { code: dtrain.Error.Code.WORKER_FAILED, message: reason ?? '', rank: -1, host: o.host, logTail: x.tail, workerExit }).catch(() => undefined);
        if (elastic) {
          // The coordinator regroups without it; this machine's other workers train on.
          lostHere.push(x);
          return;
        }
        firstFailure = x;
        stopAll();
      }),
    ),
  );
  ended = true;
  await listening;
  await control.close();
  process.off('SIGINT', onSignal);
  process.off('SIGTERM', onSignal);
  const results = await Promise.all(exits);
  if (coordinatorSaid !== undefined) throw new JoinFailedError(`the coordinator at ${where} ended the run: ${coordinatorSaid}`);
  const f = firstFailure ?? results.find((r) => r.code !== 0 && !lostHere.includes(r));
  if (f || (elastic && lostHere.length === results.length)) {
    const x = f ?? lostHere[0];
    const rank = ranks[x.i] >= 0 ? `rank ${ranks[x.i]} (local worker ${x.i})` : `local worker ${x.i}`;
    throw new JoinFailedError(
      `${rank} on host ${o.host} ${x.signal ? `was killed by ${x.signal}` : `exited with code ${x.code}`}. Last lines of its log (${x.logFile}):\n${x.tail.map((l) => `  ${l}`).join('\n') || '  (empty)'}`,
    );
  }
  return { ranks, worldSize };
}
