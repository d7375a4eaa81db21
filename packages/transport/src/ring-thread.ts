// A Ring that runs in a thread of its own. The ring's JavaScript (receiving, summing, forwarding
// pieces) then goes on while the caller's thread is busy, which is what overlapping the gradient
// all-reduce with the backward pass needs: TensorFlow's backward pass blocks the caller's thread
// (a CPU backend computes in it; a GPU backend's readbacks wait in it), so a ring on that thread
// would only move when the backward pass is over. The thread also keeps the ring's garbage (one
// Buffer per received piece) out of the caller's heap.
//
// Same contract as Ring (ring.ts), call for call. Buffers on a SharedArrayBuffer are reduced in
// place by the thread; any other buffer is copied into a shared staging buffer and back (one copy
// each way: allocate hot buffers with `sharedFloat32Array`).
import { Worker } from 'node:worker_threads';
import { PeerLostError, PeerTimeoutError, ProtocolVersionError, RingAbortedError, RingSetupError, RingUsageError, TransportError } from './errors.js';
import { addTransportCounters, type TransportCounters } from './protocol.js';
import { emptyRingStats, type AllReduceOptions, type PeerInfo, type RingOptions, type RingStats, type StagedAllReduce } from './ring.js';

type ConnectIds = { runId?: string; generation?: number; rank?: number; worldSize?: number };
type Buckets = ReadonlyArray<readonly [number, number]>;

/** @internal Messages to the thread. */
export type ToThread =
  | { t: 'create'; id: number; opts: RingOptions }
  | { t: 'connect'; id: number; peers: PeerInfo[]; ids: ConnectIds }
  | { t: 'allReduce'; id: number; data: Float32Array; opts: AllReduceOptions }
  | { t: 'broadcast'; id: number; data: Float32Array; root: number }
  | { t: 'staged'; id: number; data: Float32Array; buckets: Buckets; opts: AllReduceOptions }
  | { t: 'ready'; id: number; index: number }
  | { t: 'abort'; reason: string }
  | { t: 'close'; id: number };

/** @internal What the parent mirrors of the thread's ring after every call. */
export interface ThreadState {
  rank: number;
  worldSize: number;
  generation: number;
  runId: string;
  stats: RingStats | undefined;
  error: SerializedError | undefined;
  counters: TransportCounters;
}

/** @internal Messages from the thread. */
export type FromThread =
  | { t: 'created'; endpoints: string[]; publicKey: string | undefined; host: string; timeoutMs: number }
  | { t: 'done'; id: number; ok: true; state: ThreadState }
  | { t: 'done'; id: number; ok: false; error: SerializedError; state: ThreadState };

/** @internal */
export interface SerializedError {
  name: string;
  message: string;
  stack?: string;
  props: Record<string, unknown>;
}

const ERROR_CLASSES: Record<string, new (...a: never[]) => TransportError> = {
  PeerLostError, PeerTimeoutError, ProtocolVersionError, RingAbortedError, RingSetupError, RingUsageError,
};

/** @internal An error as data (structured clone drops classes and own fields of errors). */
export function serializeError(e: unknown): SerializedError {
  if (!(e instanceof Error)) return { name: 'Error', message: String(e), props: {} };
  return { name: e.name, message: e.message, stack: e.stack, props: { ...e } };
}

/** @internal The same error on this side: the transport's classes come back as themselves. */
export function deserializeError(s: SerializedError): Error {
  const cls = ERROR_CLASSES[s.name];
  const e: Error = cls === undefined ? new Error(s.message) : Object.assign(Object.create(cls.prototype) as Error, s.props);
  Object.defineProperty(e, 'message', { value: s.message, writable: true, configurable: true, enumerable: false });
  if (s.stack !== undefined) e.stack = s.stack;
  return e;
}

/** A Float32Array on a SharedArrayBuffer: ThreadedRing reduces it in place, without copies. */
export function sharedFloat32Array(length: number): Float32Array {
  return new Float32Array(new SharedArrayBuffer(length * 4));
}

function isShared(a: Float32Array): boolean {
  return a.buffer instanceof SharedArrayBuffer;
}

const ENTRY = new URL('./ring-thread-entry.mjs', import.meta.url);

/** Every ThreadedRing not closed yet, for closeThreadedRings. */
const live = new Set<ThreadedRing>();

/**
 * Closes every ThreadedRing of this process (aborting first: no close handshake), waiting at most
 * `timeoutMs`. Call it before process.exit: a process that exits while a ring's thread still has
 * ZeroMQ sockets open is aborted by zeromq.js 6 (SIGABRT, "terminate called after throwing an
 * instance of 'Napi::Error'"; zeromq.js issue #411), whatever exit code it asked for.
 */
export async function closeThreadedRings(reason: string, timeoutMs = 3000): Promise<void> {
  const rings = [...live];
  for (const r of rings) r.abort(reason);
  let timer: NodeJS.Timeout | undefined;
  await Promise.race([Promise.all(rings.map((r) => r.close())), new Promise((resolve) => (timer = setTimeout(resolve, timeoutMs)))]);
  clearTimeout(timer);
}

export class ThreadedRing {
  private readonly worker: Worker;
  private nextId = 0;
  private readonly pending = new Map<number, { resolve: () => void; reject: (e: Error) => void }>();
  private state: ThreadState;
  /** The thread is gone (closed, or crashed: then `dead` says why). */
  private dead: Error | undefined;
  private closed = false;
  /** Counters already added to this process's transport counters. */
  private counted: TransportCounters | undefined;
  endpoints: string[] = [];
  publicKey: string | undefined;
  host = '';
  timeoutMs = 0;

  private constructor(opts: RingOptions) {
    this.worker = new Worker(ENTRY, { env: process.env });
    this.state = { rank: opts.rank, worldSize: opts.worldSize, generation: opts.generation ?? 0, runId: opts.runId ?? '', stats: undefined, error: undefined, counters: emptyCounters() };
    this.worker.on('message', (m: FromThread) => this.onMessage(m));
    this.worker.on('error', (e) => this.onGone(new RingUsageError(`rank ${this.rank}: the ring's thread failed: ${e.message}`)));
    this.worker.on('exit', (code) => this.onGone(new RingUsageError(`rank ${this.rank}: the ring's thread exited (code ${code})`)));
  }

  /** Starts the thread and binds the ring's data socket there (Ring.create). */
  static async create(opts: RingOptions): Promise<ThreadedRing> {
    const r = new ThreadedRing(opts);
    live.add(r);
    try {
      await r.call({ t: 'create', id: 0, opts });
    } catch (e) {
      await r.close();
      throw e;
    }
    return r;
  }

  get rank(): number {
    return this.state.rank;
  }
  get worldSize(): number {
    return this.state.worldSize;
  }
  get generation(): number {
    return this.state.generation;
  }
  get runId(): string {
    return this.state.runId;
  }
  /** The error that broke the ring, as of the last call that returned. */
  get error(): TransportError | undefined {
    return this.state.error === undefined ? undefined : (deserializeError(this.state.error) as TransportError);
  }

  stats(): RingStats {
    return this.state.stats ?? emptyRingStats();
  }

  connect(peers: PeerInfo[], ids: ConnectIds = {}): Promise<void> {
    return this.call({ t: 'connect', id: 0, peers, ids });
  }

  allReduce(data: Float32Array, opts: AllReduceOptions = {}): Promise<void> {
    return this.inShared(data, (d) => this.call({ t: 'allReduce', id: 0, data: d, opts }));
  }

  broadcast(data: Float32Array, root = 0): Promise<void> {
    return this.inShared(data, (d) => this.call({ t: 'broadcast', id: 0, data: d, root }));
  }

  /**
   * Ring.allReduceStaged, with the ring in its thread: `ready(i)` only posts a message, so it
   * can be called from inside a backward pass that keeps this thread busy. `data` must live on a
   * SharedArrayBuffer (sharedFloat32Array): the thread reads each bucket where the caller wrote it.
   */
  allReduceStaged(data: Float32Array, buckets: Buckets, opts: AllReduceOptions = {}): StagedAllReduce {
    if (!isShared(data)) throw new RingUsageError(`rank ${this.rank}: allReduceStaged needs a buffer on a SharedArrayBuffer (sharedFloat32Array)`);
    const id = ++this.nextId;
    const done = this.call({ t: 'staged', id, data, buckets, opts }, id);
    done.catch(() => undefined);
    return {
      ready: (index: number) => {
        if (!Number.isInteger(index) || index < 0 || index >= buckets.length) {
          throw new RingUsageError(`rank ${this.rank}: ready(${index}): there are ${buckets.length} buckets`);
        }
        if (this.dead === undefined) this.worker.postMessage({ t: 'ready', id, index } satisfies ToThread);
      },
      done,
    };
  }

  /** Ring.abort: a collective in flight rejects with RingAbortedError. */
  abort(reason: string): void {
    if (this.dead === undefined) this.worker.postMessage({ t: 'abort', reason } satisfies ToThread);
  }

  /** Ring.close, then the thread ends. Bounded: a thread that does not answer is terminated. */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    live.delete(this);
    if (this.dead === undefined) {
      let timer: NodeJS.Timeout | undefined;
      const limit = new Promise<void>((resolve) => (timer = setTimeout(resolve, Math.min(this.timeoutMs || 10_000, 10_000) + 5_000)));
      const exited = new Promise<void>((resolve) => this.worker.once('exit', () => resolve()));
      await Promise.race([this.call({ t: 'close', id: 0 }).catch(() => undefined).then(() => exited), limit]);
      clearTimeout(timer);
      if (this.dead !== undefined) return;
    }
    await this.worker.terminate();
  }

  private async inShared(data: Float32Array, run: (d: Float32Array) => Promise<void>): Promise<void> {
    if (isShared(data)) return run(data);
    const staging = sharedFloat32Array(data.length);
    staging.set(data);
    await run(staging);
    data.set(staging);
  }

  private call(m: ToThread, id = ++this.nextId): Promise<void> {
    if (this.dead !== undefined) return Promise.reject(this.dead);
    return new Promise<void>((resolve, reject) => {
      this.pending.set(id, { resolve, reject });
      this.worker.postMessage({ ...m, id } as ToThread);
    });
  }

  private onMessage(m: FromThread): void {
    if (m.t === 'created') {
      this.endpoints = m.endpoints;
      this.publicKey = m.publicKey;
      this.host = m.host;
      this.timeoutMs = m.timeoutMs;
      return;
    }
    this.state = m.state;
    this.countDelta(m.state.counters);
    const p = this.pending.get(m.id);
    if (p === undefined) return;
    this.pending.delete(m.id);
    if (m.ok) p.resolve();
    else p.reject(deserializeError(m.error));
  }

  /** The thread's protocol counters join this process's (what a worker reports and exports). */
  private countDelta(now: TransportCounters): void {
    const before = this.counted ?? emptyCounters();
    addTransportCounters(diffCounters(now, before));
    this.counted = now;
  }

  private onGone(e: Error): void {
    if (this.dead !== undefined) return;
    this.dead = this.closed ? new RingUsageError(`rank ${this.rank}: ring is closed`) : e;
    for (const p of this.pending.values()) p.reject(this.dead);
    this.pending.clear();
  }
}

function emptyCounters(): TransportCounters {
  return { accepted: 0, rejected: 0, byReason: {}, authRefused: 0, authByReason: {} };
}

function diffCounters(a: TransportCounters, b: TransportCounters): TransportCounters {
  const diff = (x: Record<string, number>, y: Record<string, number>) =>
    Object.fromEntries(Object.entries(x).map(([k, v]) => [k, v - (y[k] ?? 0)]).filter(([, v]) => (v as number) > 0));
  return {
    accepted: a.accepted - b.accepted,
    rejected: a.rejected - b.rejected,
    byReason: diff(a.byReason, b.byReason),
    authRefused: a.authRefused - b.authRefused,
    authByReason: diff(a.authByReason, b.authByReason),
  };
}
