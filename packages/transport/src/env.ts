// A worker process's environment: the glibc settings every launcher passes, and the variables
// that configure a worker, written by launchers (writeWorkerEnv: launch, join) and read by the
// worker (readWorkerEnv), here side by side so that the two cannot drift apart.
//
// The variables, as torchrun's workers take them (so any launcher can start one):
//   RANK, WORLD_SIZE           this worker's rank and the number of workers; RANK unset: the
//                              coordinator assigns it (`dtrain join`: Hello.requested_rank -1);
//                              WORLD_SIZE unset: learned from the Welcome
//   LOCAL_RANK                 index on this machine (default 0; names the device)
//   LOCAL_WORLD_SIZE           workers on this machine (default 1; a coordinator waiting for
//                              other machines knows a host is complete when that many joined)
//   MASTER_ADDR, MASTER_PORT   the coordinator's control socket (required)
//   DTRAIN_RING_LISTEN         address the ring's data socket binds (default: 127.0.0.1 when
//                              MASTER_ADDR is a loopback address, else 0.0.0.0)
//   DTRAIN_ADVERTISE           address the other workers use to reach this one (default: the
//                              listen address, or the host name for 0.0.0.0)
//   DTRAIN_RING_PORT           TCP port of the ring's data socket (default 0: any free port)
//   DTRAIN_HOST                name of this machine in messages (default os.hostname())
//   DTRAIN_DATA_DIR            data directory of a worker without RANK (on another machine than
//                              the coordinator): data sets the coordinator offers are cached here
//   DTRAIN_RUN_DIR             run folder of a worker without RANK, should it become rank 0 in an
//                              elastic run (default ./runs/joined-<run id>): it never writes to a
//                              path the coordinator names
//   DTRAIN_JOIN_TIMEOUT_MS     how long to wait for the coordinator's Welcome (default 120000)
//   DTRAIN_TIMEOUT_MS          a ring collective fails when a neighbour is silent this long (default 120000)
//   DTRAIN_COORDINATOR_KEY     the coordinator's CURVE public key: when set, the control link and
//                              the ring use CURVE with this machine's keys from DTRAIN_KEYS_DIR
//                              (`pnpm cli keys init`); unset: no encryption, and the ring binds
//                              loopback addresses only
//   DTRAIN_KEYS_DIR            key directory (default ~/.config/dtrain/keys)
//   DTRAIN_INSECURE=1          no encryption chosen explicitly: the ring may bind any address
//   CUDA_VISIBLE_DEVICES       the GPU of a --gpus worker

import { hostname } from 'node:os';
import { isCurveKey } from './security.js';

/**
 * glibc malloc settings for worker processes. zeromq.js hands every large received message to
 * JavaScript as its own buffer, allocated by libzmq and freed when V8 collects it; with glibc's
 * defaults those multi-megabyte blocks are mmap'ed and munmap'ed each time, so every byte received
 * also costs a page fault and zeroing. Keeping them in the heap measured about 25% less CPU and
 * time per all-reduce at 4 ranks (tools/bench/allreduce.ts, rows "default malloc" vs the others).
 * It must be in the environment when the process starts: launchers pass `workerEnv()` to spawn.
 * The cost: up to trim_threshold bytes of freed memory stay mapped in each worker.
 */
export const WORKER_GLIBC_TUNABLES = 'glibc.malloc.mmap_threshold=134217728:glibc.malloc.trim_threshold=536870912';

/** `base` plus WORKER_GLIBC_TUNABLES (kept after any tunables already set, which win). */
export function workerEnv(base: NodeJS.ProcessEnv = process.env): NodeJS.ProcessEnv {
  const existing = base.GLIBC_TUNABLES;
  return { ...base, GLIBC_TUNABLES: existing ? `${WORKER_GLIBC_TUNABLES}:${existing}` : WORKER_GLIBC_TUNABLES };
}

/** What a launcher tells one worker; every field maps to one variable of the list above. */
export interface WorkerEnvSpec {
  masterAddr: string;
  masterPort: number;
  /** Unset: the coordinator assigns it (RANK removed from the inherited environment). */
  rank?: number;
  /** Unset: the Welcome says it (WORLD_SIZE removed). */
  worldSize?: number;
  localRank: number;
  localWorldSize: number;
  host?: string;
  listen?: string;
  advertise?: string;
  ringPort?: number;
  joinTimeoutMs: number;
  timeoutMs: number;
  /** CURVE: this machine's key directory and the coordinator's public key. */
  keys?: { dir: string; coordinatorKey: string };
  /** No encryption chosen explicitly (DTRAIN_INSECURE=1); without it and without keys, neither is set. */
  insecure: boolean;
  dataDir?: string;
  runDir?: string;
  cudaVisibleDevices?: string;
}

/**
 * `base` (the launcher's own environment) with the variables of `spec` set. What the spec leaves
 * unset is left as inherited, except RANK, WORLD_SIZE and the security variables, which a worker
 * must never take from its launcher's environment by accident.
 */
export function writeWorkerEnv(spec: WorkerEnvSpec, base: NodeJS.ProcessEnv = process.env): NodeJS.ProcessEnv {
  const env: NodeJS.ProcessEnv = { ...base };
  for (const k of ['RANK', 'WORLD_SIZE', 'DTRAIN_COORDINATOR_KEY', 'DTRAIN_INSECURE']) delete env[k];
  const set = (k: string, v: string | number | undefined) => {
    if (v !== undefined) env[k] = String(v);
  };
  set('RANK', spec.rank);
  set('WORLD_SIZE', spec.worldSize);
  set('LOCAL_RANK', spec.localRank);
  set('LOCAL_WORLD_SIZE', spec.localWorldSize);
  set('MASTER_ADDR', spec.masterAddr);
  set('MASTER_PORT', spec.masterPort);
  set('DTRAIN_HOST', spec.host);
  set('DTRAIN_RING_LISTEN', spec.listen);
  set('DTRAIN_ADVERTISE', spec.advertise);
  set('DTRAIN_RING_PORT', spec.ringPort);
  set('DTRAIN_JOIN_TIMEOUT_MS', spec.joinTimeoutMs);
  set('DTRAIN_TIMEOUT_MS', spec.timeoutMs);
  set('DTRAIN_DATA_DIR', spec.dataDir);
  set('DTRAIN_RUN_DIR', spec.runDir);
  set('CUDA_VISIBLE_DEVICES', spec.cudaVisibleDevices);
  if (spec.keys) {
    env.DTRAIN_KEYS_DIR = spec.keys.dir;
    env.DTRAIN_COORDINATOR_KEY = spec.keys.coordinatorKey;
  } else if (spec.insecure) env.DTRAIN_INSECURE = '1';
  return env;
}

export class WorkerEnvError extends Error {
  readonly code = 'E_WORKER_ENV' as const;
}

export interface WorkerEnv {
  /** -1: the coordinator assigns it (RANK unset). */
  rank: number;
  /** 0: unknown until the Welcome (RANK unset). */
  worldSize: number;
  localRank: number;
  localWorldSize: number;
  ringPort: number;
  masterAddr: string;
  masterPort: number;
  listen: string;
  advertise: string | undefined;
  host: string;
  joinTimeoutMs: number;
  /** Ring collectives fail when a neighbour is silent this long. */
  timeoutMs: number;
  /** The coordinator's CURVE public key (DTRAIN_COORDINATOR_KEY); undefined: no CURVE. */
  coordinatorKey?: string;
  /** This machine's key directory (DTRAIN_KEYS_DIR; undefined: the default). */
  keysDir?: string;
  /** DTRAIN_INSECURE=1: no CURVE by choice, so the ring may bind beyond loopback. */
  insecure: boolean;
}

function intVar(env: NodeJS.ProcessEnv, name: string, fallback?: number): number {
  const raw = env[name];
  if (raw === undefined || raw === '') {
    if (fallback !== undefined) return fallback;
    throw new WorkerEnvError(`${name} is not set: a dtrain worker needs MASTER_ADDR and MASTER_PORT, and RANK and WORLD_SIZE as for torchrun unless the coordinator assigns them (start it with \`pnpm cli launch\` or \`pnpm cli join\`)`);
  }
  const n = Number(raw);
  if (!Number.isInteger(n) || n < 0) throw new WorkerEnvError(`${name} must be a non-negative integer, got '${raw}'`);
  return n;
}

export function readWorkerEnv(env: NodeJS.ProcessEnv = process.env): WorkerEnv {
  const assigned = env.RANK === undefined || env.RANK === '';
  const rank = assigned ? -1 : intVar(env, 'RANK');
  // WORLD_SIZE unset: learned from the Welcome (a coordinator waiting for other machines does not know it yet).
  const worldSize = intVar(env, 'WORLD_SIZE', 0);
  if (env.WORLD_SIZE && worldSize < 1) throw new WorkerEnvError(`WORLD_SIZE must be at least 1, got ${worldSize}`);
  if (!assigned && worldSize > 0 && rank >= worldSize) throw new WorkerEnvError(`RANK ${rank} is not below WORLD_SIZE ${worldSize}`);
  const ringPort = intVar(env, 'DTRAIN_RING_PORT', 0);
  if (ringPort > 65535) throw new WorkerEnvError(`DTRAIN_RING_PORT must be a TCP port (0-65535), got ${ringPort}`);
  const masterAddr = env.MASTER_ADDR;
  if (!masterAddr) throw new WorkerEnvError('MASTER_ADDR is not set: the address of the coordinator (e.g. 127.0.0.1)');
  const masterPort = intVar(env, 'MASTER_PORT');
  if (masterPort < 1 || masterPort > 65535) throw new WorkerEnvError(`MASTER_PORT must be a TCP port (1-65535), got ${masterPort}`);
  const coordinatorKey = env.DTRAIN_COORDINATOR_KEY || undefined;
  if (coordinatorKey !== undefined && !isCurveKey(coordinatorKey)) {
    throw new WorkerEnvError(`DTRAIN_COORDINATOR_KEY must be a CURVE public key (40 Z85 characters, as pnpm cli keys show prints), got '${coordinatorKey}'`);
  }
  const insecure = env.DTRAIN_INSECURE === '1';
  if (env.DTRAIN_INSECURE !== undefined && env.DTRAIN_INSECURE !== '' && env.DTRAIN_INSECURE !== '0' && !insecure) {
    throw new WorkerEnvError(`DTRAIN_INSECURE must be 1 (no encryption, any address) or unset, got '${env.DTRAIN_INSECURE}'`);
  }
  if (insecure && coordinatorKey !== undefined) throw new WorkerEnvError('DTRAIN_INSECURE=1 and DTRAIN_COORDINATOR_KEY exclude each other: unset one');
  const loopback = masterAddr === 'localhost' || masterAddr.startsWith('127.') || masterAddr === '::1';
  return {
    rank,
    worldSize,
    localRank: intVar(env, 'LOCAL_RANK', 0),
    localWorldSize: Math.max(1, intVar(env, 'LOCAL_WORLD_SIZE', 1)),
    ringPort,
    masterAddr,
    masterPort,
    listen: env.DTRAIN_RING_LISTEN || (loopback ? '127.0.0.1' : '0.0.0.0'),
    advertise: env.DTRAIN_ADVERTISE || undefined,
    host: env.DTRAIN_HOST || hostname(),
    joinTimeoutMs: intVar(env, 'DTRAIN_JOIN_TIMEOUT_MS', 120_000),
    timeoutMs: intVar(env, 'DTRAIN_TIMEOUT_MS', 120_000),
    coordinatorKey,
    keysDir: env.DTRAIN_KEYS_DIR || undefined,
    insecure,
  };
}

