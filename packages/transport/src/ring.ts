import { hostname } from 'node:os';
import { PeerLostError, PeerTimeoutError, RingAbortedError, RingSetupError, RingUsageError, TransportError } from './errors.js';
import { accumulateHalf, encodeHalf, finishHalf, HALF_TO_FLOAT } from './fp16.js';
import { dtrain, dtypeSize, encodeMessage, countRejected, logRejection, PROTOCOL_VERSION, type Message } from './protocol.js';
import { Breaker, type LinkIds, type LinkOwner } from './ring-link.js';
import { NextLink, type SlotSizes } from './ring-next-link.js';
import { bindDataSocket, PrevLink, type DataSocket } from './ring-prev-link.js';
import { clientSocketOptions, type Security } from './security.js';
import { addInto, divideInto } from './sum.js';

export { CURVE_FRAME_OVERHEAD, RING_QUEUE_BYTES, ringInboundLimits } from './ring-prev-link.js';

const Phase = dtrain.RingChunk.Phase;
const DType = dtrain.RingChunk.DType;

/** A member of the ring as the coordinator announces it (Welcome.peers). */
export interface PeerInfo {
  rank: number;
  host: string;
  /** Where its data socket listens: `tcp://addr:port` and optionally `ipc://path`. */
  endpoints: string[];
  /** Its CURVE public key (Z85; Welcome.peers[].curve_public_key) when the ring uses CURVE. */
  publicKey?: string;
}

export interface RingOptions {
  rank: number;
  worldSize: number;
  /** Name of this machine in errors and for choosing ipc:// (default: os.hostname()). */
  host?: string;
  /** Ring generation (Welcome.generation): chunks of another generation are dropped. */
  generation?: number;
  /** Run id (Envelope.run_id): messages of another run are dropped. */
  runId?: string;
  /** Address to bind the TCP data socket on (default 127.0.0.1; 0.0.0.0 for all interfaces). */
  listen?: string;
  /** TCP port (default 0: any free port). */
  port?: number;
  /** Address peers use to reach this one (default: `listen`, or the host name for 0.0.0.0). */
  advertise?: string;
  /** Also listen on an ipc:// socket for peers on the same host (default true). */
  ipc?: boolean;
  /** Use a same-host peer's ipc:// endpoint instead of TCP (default: IPC_IS_FASTER). */
  preferIpc?: boolean;
  /** A collective fails when its previous rank sends nothing for this long (default 30 s). */
  timeoutMs?: number;
  /** Pipelining granularity: bytes per message on the wire (default 4 MiB). */
  pieceBytes?: number;
  /**
   * Make a link to a next rank on the same host a shared-memory one (default true; README
   * "Same-host links"). Also off where the process cannot (`DTRAIN_SHM=0`, no native module, no
   * /dev/shm), and per link where the peer cannot map the file (another machine, full tmpfs).
   */
  sharedMemory?: boolean;
  /** Size of a shared-memory link's slots, in bytes (default 64 MiB: 16 pieces of 4 MiB). */
  shmBytes?: number;
  /**
   * CURVE (encrypted; only allow-listed client keys may connect to the data socket, and the link
   * to the next rank checks that rank's public key) or none. Absent means none, and a warning is
   * logged when the socket listens on a non-loopback address.
   */
  security?: Security;
}

export interface AllReduceOptions {
  /** Divide the sum by the world size (once, by the rank that finishes each chunk). */
  average?: boolean;
  /** Send binary16 on the wire (half the bytes); sums are accumulated in float32. */
  fp16?: boolean;
}

/** An all-reduce whose buckets are handed over one by one (Ring.allReduceStaged). */
export interface StagedAllReduce {
  /** Bucket `index` holds this rank's final values: it may be reduced now. */
  ready(index: number): void;
  /** Settles when every bucket is reduced, or rejects like allReduce. */
  readonly done: Promise<void>;
}

export interface RingStats {
  ops: number;
  bytesSent: number;
  bytesReceived: number;
  messagesSent: number;
  messagesReceived: number;
  /** Messages dropped by this ring (bad, stale, foreign), by reason. */
  rejected: Record<string, number>;
  /** Connections to the data socket refused at the CURVE handshake. */
  authRefused: number;
  /** Which of this rank's two links are shared-memory ones. */
  shm: { toNext: boolean; fromPrev: boolean };
  /** Pieces sent through shared-memory slots, and pieces sent in a socket frame instead. */
  piecesViaShm: number;
  piecesViaSocket: number;
}

/** The counters of a ring that has done nothing yet. */
export function emptyRingStats(): RingStats {
  return {
    ops: 0, bytesSent: 0, bytesReceived: 0, messagesSent: 0, messagesReceived: 0, rejected: {}, authRefused: 0,
    shm: { toNext: false, fromPrev: false }, piecesViaShm: 0, piecesViaSocket: 0,
  };
}

/**
 * Whether ipc:// beats loopback TCP between processes on one host, as measured by
 * tools/bench/allreduce.ts on our machines (see README).
 */
export const IPC_IS_FASTER = true;

const DEFAULT_TIMEOUT_MS = 30_000;
const DEFAULT_PIECE_BYTES = 4 << 20;
/** Per shared-memory link. Measured (README "Same-host links"): with 16 slots of 4 MiB, a
 * 44.8 MB all-reduce between 2 or 4 ranks never has to spill a piece to the socket. */
const DEFAULT_SHM_BYTES = 64 << 20;

function mod(a: number, n: number): number {
  return ((a % n) + n) % n;
}

/** Elements of chunk c when `len` elements are split into n chunks as evenly as possible. */
function chunkBounds(len: number, n: number, c: number): [start: number, count: number] {
  const base = Math.floor(len / n);
  const extra = len % n;
  const start = c * base + Math.min(c, extra);
  return [start, base + (c < extra ? 1 : 0)];
}

function asF32(buf: Buffer): Float32Array {
  if (buf.byteOffset % 4 !== 0) buf = Buffer.from(buf); // Buffer.from copies into aligned memory
  return new Float32Array(buf.buffer, buf.byteOffset, buf.byteLength / 4);
}

function asU16(buf: Buffer): Uint16Array {
  if (buf.byteOffset % 2 !== 0) buf = Buffer.from(buf);
  return new Uint16Array(buf.buffer, buf.byteOffset, buf.byteLength / 2);
}

function bytesOf(a: ArrayBufferView): Buffer {
  return Buffer.from(a.buffer, a.byteOffset, a.byteLength);
}

interface Expected {
  phase: dtrain.RingChunk.Phase;
  step: number;
  chunk: number;
  piece: number;
  offset: number;
  count: number;
}

/** One all-reduce, as its pieces need it (made once per call of runOp). */
interface ReduceOp {
  readonly id: number;
  readonly data: Float32Array;
  readonly rank: number;
  readonly generation: number;
  readonly fp16: boolean;
  /** The world size when averaging, else 1. */
  readonly divisor: number;
  readonly dtype: dtrain.RingChunk.DType;
  /** Bytes per element on the wire. */
  readonly esize: number;
  readonly pieceElems: number;
}

/** The header of a piece of `op` this rank sends. */
function chunkHeader(op: ReduceOp, phase: dtrain.RingChunk.Phase, step: number, chunk: number, piece: number, offset: number, count: number): dtrain.RingChunk.$Properties {
  return { generation: op.generation, opId: op.id, rank: op.rank, phase, step, chunk, piece, offset, count, dtype: op.dtype };
}

/**
 * One rank's end of a ring of workers: a link from the previous rank (a ROUTER socket bound at
 * creation, ring-prev-link.ts), a link to the next rank (a DEALER connected by `connect`,
 * ring-next-link.ts) and the collectives over them. Create with `Ring.create`, advertise
 * `endpoints`, then `connect` with the full peer list. Collectives must be called in the same order with the same sizes and options on
 * every rank.
 */
export class Ring {
  private rank_: number;
  private worldSize_: number;
  /** This ring's rank; a ring bound before its rank was known takes it from connect(). */
  get rank(): number {
    return this.rank_;
  }
  get worldSize(): number {
    return this.worldSize_;
  }
  readonly host: string;
  /** Set at creation, or by `connect` (a worker advertises its endpoints before it learns them). */
  private generation_: number;
  private runId_: string;
  get generation(): number {
    return this.generation_;
  }
  get runId(): string {
    return this.runId_;
  }
  readonly timeoutMs: number;
  readonly pieceBytes: number;
  /** Endpoints to advertise to the coordinator (Hello.data_endpoints). */
  readonly endpoints: string[];

  private readonly preferIpc: boolean;
  private peers: PeerInfo[] = [];
  private connected = false;
  private closing = false;
  private closed = false;
  private readonly breaker = new Breaker();
  private opId = 0;
  /** Pending lost-link grace timers (ring-link.ts); close() clears them. */
  private readonly graceTimers = new Set<NodeJS.Timeout>();
  private readonly stats_: RingStats = emptyRingStats();
  private readonly slotSizes: SlotSizes;
  private readonly security: Security | undefined;
  /** The data socket, from the start; the link to the next rank once connect() made it. */
  private readonly fromPrev: PrevLink;
  private toNext: NextLink | undefined;
  private readonly owner: LinkOwner = this.linkOwner();

  private constructor(opts: RingOptions, socket: DataSocket) {
    this.rank_ = opts.rank;
    this.worldSize_ = opts.worldSize;
    this.host = opts.host ?? hostname();
    this.generation_ = opts.generation ?? 0;
    this.runId_ = opts.runId ?? '';
    this.timeoutMs = opts.timeoutMs ?? DEFAULT_TIMEOUT_MS;
    this.pieceBytes = opts.pieceBytes ?? DEFAULT_PIECE_BYTES;
    this.preferIpc = opts.preferIpc ?? IPC_IS_FASTER;
    this.slotSizes = { sharedMemory: opts.sharedMemory ?? true, pieceBytes: this.pieceBytes, shmBytes: opts.shmBytes ?? DEFAULT_SHM_BYTES };
    this.endpoints = socket.endpoints;
    this.security = opts.security;
    this.fromPrev = new PrevLink(this.owner, socket);
  }

  /** What the links see of this ring: its counters and failure, and where they report. */
  private linkOwner(): LinkOwner {
    const ring = this;
    return {
      stats: this.stats_,
      breaker: this.breaker,
      get closing() {
        return ring.closing;
      },
      fail: (err, tellNext) => this.fail(err, tellNext),
      reject: (reason, from) => this.reject(reason, from),
      afterGrace: (ms, fn) => this.afterGrace(ms, fn),
    };
  }

  /** Binds this rank's data socket. */
  static async create(opts: RingOptions): Promise<Ring> {
    const { rank, worldSize } = opts;
    if (!Number.isInteger(worldSize) || worldSize < 1) {
      throw new RingUsageError(`world size must be an integer >= 1, got ${worldSize}`);
    }
    if (!Number.isInteger(rank) || rank < 0 || rank >= worldSize) {
      throw new RingUsageError(`rank must be an integer in 0..${worldSize - 1}, got ${rank}`);
    }
    const timeoutMs = opts.timeoutMs ?? DEFAULT_TIMEOUT_MS;
    if (!(timeoutMs > 0)) throw new RingUsageError(`timeoutMs must be > 0, got ${timeoutMs}`);
    const pieceBytes = opts.pieceBytes ?? DEFAULT_PIECE_BYTES;
    if (!(pieceBytes >= 64 && pieceBytes % 4 === 0)) {
      throw new RingUsageError(`pieceBytes must be a multiple of 4 and >= 64, got ${pieceBytes}`);
    }
    if (opts.shmBytes !== undefined && !(Number.isInteger(opts.shmBytes) && opts.shmBytes >= pieceBytes)) {
      throw new RingUsageError(`shmBytes must be an integer >= pieceBytes (${pieceBytes}), got ${opts.shmBytes}`);
    }
    return new Ring(opts, await bindDataSocket(opts, pieceBytes, timeoutMs));
  }

  /** This rank's CURVE public key (for Hello.curve_public_key), or undefined without CURVE. */
  get publicKey(): string | undefined {
    return this.security?.kind === 'curve' ? this.security.publicKey : undefined;
  }

  private get prev(): PeerInfo {
    return this.peers[mod(this.rank - 1, this.worldSize)];
  }

  private get next(): PeerInfo {
    return this.peers[mod(this.rank + 1, this.worldSize)];
  }

  /**
   * Connects to the next rank and waits for the previous rank's RingHello. `peers` is the
   * coordinator's list: exactly worldSize entries, ranks 0..worldSize-1 in order.
   */
  async connect(peers: PeerInfo[], ids: { runId?: string; generation?: number; rank?: number; worldSize?: number } = {}): Promise<void> {
    if (this.connected || this.closed) throw new RingUsageError(`rank ${this.rank}: connect() called twice or after close()`);
    this.adopt(ids);
    const n = this.worldSize;
    if (peers.length !== n || peers.some((p, i) => p.rank !== i)) {
      throw new RingSetupError(
        `rank ${this.rank}: peer list must have ${n} entries with ranks 0..${n - 1} in order, got ranks [${peers.map((p) => p.rank).join(',')}]`,
      );
    }
    this.peers = peers.map((p) => ({ rank: p.rank, host: p.host, endpoints: [...p.endpoints], publicKey: p.publicKey }));
    this.connected = true;
    if (n === 1) {
      this.fromPrev.admitNobody();
      return;
    }
    const linkIds: LinkIds = { rank: this.rank, worldSize: n, host: this.host, generation: this.generation, runId: this.runId, timeoutMs: this.timeoutMs };
    this.fromPrev.attach(linkIds, this.prev);

    const next = this.next;
    const endpoint = this.pickEndpoint(next);
    if (endpoint === undefined) {
      // Recorded as the ring's failure, so a collective called on it anyway rejects with this error.
      const err = new RingSetupError(`rank ${this.rank}: rank ${next.rank} on ${next.host} advertised no usable endpoint (${next.endpoints.join(', ') || 'none'})`);
      this.fail(err, false);
      throw err;
    }
    let curve: Record<string, unknown>;
    try {
      // Each link's own key, from the Welcome: never another's (the coordinator's) in its place.
      curve = clientSocketOptions(this.security, next.publicKey || undefined, `rank ${this.rank}'s link to rank ${next.rank} on ${next.host}`);
      this.fromPrev.admitOnlyPrevious();
    } catch (e) {
      this.fail(e as TransportError, false);
      throw e;
    }
    this.toNext = new NextLink(this.owner, linkIds, next, endpoint, curve);
    await this.greet(this.toNext);
    await this.flushSends();
  }

  /** Takes the rank, world size, run and generation of the Welcome that carries the peer list. */
  private adopt(ids: { runId?: string; generation?: number; rank?: number; worldSize?: number }): void {
    // A worker that joined without a rank (`dtrain join`) learns it from the Welcome.
    if (ids.worldSize !== undefined || ids.rank !== undefined) {
      const n = ids.worldSize ?? this.worldSize_;
      const r = ids.rank ?? this.rank_;
      if (!Number.isInteger(n) || n < 1 || !Number.isInteger(r) || r < 0 || r >= n) throw new RingUsageError(`rank must be an integer in 0..${n - 1}, got ${r}`);
      this.rank_ = r;
      this.worldSize_ = n;
    }
    if (ids.runId !== undefined) this.runId_ = ids.runId;
    if (ids.generation !== undefined) this.generation_ = ids.generation;
  }

  /**
   * The RingHello exchange: both links must work. The previous rank's RingHello arrives on our
   * data socket (we answer it on the same connection), and the next rank answers ours on `next`;
   * a shared-memory offer rides on the hellos.
   */
  private async greet(next: NextLink): Promise<void> {
    const offer = next.offerSlots(this.slotSizes);
    try {
      next.hello(offer);
      const nextAnswered = next.helloAnswer();
      nextAnswered.catch(() => undefined);
      await this.fromPrev.greet(this.slotSizes.sharedMemory);
      const answer = await nextAnswered;
      if (offer !== undefined && answer.shmAccepted === true) next.useSlots(offer);
    } finally {
      // Mapped by the next rank before it answered, or never to be: the file is not needed.
      offer?.unlink();
    }
  }

  private pickEndpoint(peer: PeerInfo): string | undefined {
    const ipc = peer.endpoints.find((e) => e.startsWith('ipc://'));
    if (ipc !== undefined && this.preferIpc && peer.host === this.host) return ipc;
    return peer.endpoints.find((e) => e.startsWith('tcp://')) ?? ipc;
  }

  private reject(reason: string, from?: string): void {
    countRejected(reason);
    const key = reason in this.stats_.rejected || Object.keys(this.stats_.rejected).length < 64 ? reason : 'other';
    this.stats_.rejected[key] = (this.stats_.rejected[key] ?? 0) + 1;
    logRejection(from ?? this.prevName(), reason, `rank ${this.rank} rejected a message from`);
  }

  private prevName(): string {
    return this.peers.length === 0 ? 'its previous rank' : `rank ${this.prev.rank} on host ${this.prev.host}`;
  }

  /** Marks the ring broken, wakes any waiting collective and tells the next rank (once). */
  private fail(err: TransportError, tellNext: boolean): void {
    if (this.breaker.error !== undefined || this.closed) return;
    this.breaker.break(err);
    if (!tellNext || this.toNext === undefined) return;
    // A lost or silent rank is named as the failed one; any other failure is this rank's own.
    const named = err instanceof PeerLostError || err instanceof PeerTimeoutError;
    const failedRank = named ? err.rank : this.rank;
    if (failedRank === this.next.rank) return; // it knows, or is gone
    this.toNext.sendAbort(encodeMessage('ringAbort', {
      generation: this.generation,
      opId: this.opId,
      failedRank,
      failedHost: named ? err.host : this.host,
      reason: err.message,
      reporterRank: this.rank,
    }, this.runId));
  }

  private async flushSends(): Promise<void> {
    try {
      await this.toNext!.queued;
    } catch {
      // reported through fail()
    }
    if (this.breaker.error !== undefined) throw this.breaker.error;
  }

  private checkUsable(): void {
    if (this.closed || this.closing) throw new RingUsageError(`rank ${this.rank}: ring is closed`);
    if (!this.connected) throw new RingUsageError(`rank ${this.rank}: call connect() before collectives`);
    if (this.breaker.error !== undefined) throw this.breaker.error;
  }

  /**
   * Sums `data` element-wise across all ranks, in place: afterwards every rank holds the same
   * bits. On failure the call rejects (PeerLostError / PeerTimeoutError naming the rank and
   * host), the contents of `data` are unspecified and the ring cannot be used again.
   */
  async allReduce(data: Float32Array, opts: AllReduceOptions = {}): Promise<void> {
    this.checkUsable();
    return this.runOp(data, opts);
  }

  /**
   * All-reduces `data` bucket by bucket while its owner is still filling it: the overlap of the
   * gradient all-reduce with the backward pass (PyTorch DDP's buckets). `buckets` are [from, to)
   * float ranges of `data`, reduced in index order, each as soon as `ready(i)` has been called for
   * it and the previous bucket is done; floats outside every bucket are left alone. Every rank
   * must pass the same buckets and call `ready` for every bucket (in any order); until `done`
   * settles the caller may only write to buckets not yet declared ready.
   */
  allReduceStaged(data: Float32Array, buckets: ReadonlyArray<readonly [number, number]>, opts: AllReduceOptions = {}): StagedAllReduce {
    const gates = buckets.map(() => {
      let open!: () => void;
      const opened = new Promise<void>((resolve) => (open = resolve));
      return { opened, open, isOpen: false };
    });
    const ready = (i: number): void => {
      const g = gates[i];
      if (g === undefined) throw new RingUsageError(`rank ${this.rank}: ready(${i}): there are ${buckets.length} buckets`);
      g.isOpen = true;
      g.open();
    };
    const run = async (): Promise<void> => {
      this.checkUsable();
      for (const [from, to] of buckets) {
        if (!(Number.isInteger(from) && Number.isInteger(to) && from >= 0 && from <= to && to <= data.length)) {
          throw new RingUsageError(`rank ${this.rank}: bucket [${from}, ${to}) is not a range of the ${data.length}-float buffer`);
        }
      }
      for (let i = 0; i < buckets.length; i++) {
        if (!gates[i].isOpen) await this.untilOpenOrBroken(gates[i].opened);
        await this.runOp(data.subarray(buckets[i][0], buckets[i][1]), opts);
      }
    };
    const done = run();
    done.catch(() => undefined);
    return { ready, done };
  }

  /** Waits for `gate`, or rejects as soon as the ring breaks (abort, lost peer) meanwhile. */
  private untilOpenOrBroken(gate: Promise<void>): Promise<void> {
    if (this.breaker.error !== undefined) return Promise.reject(this.breaker.error);
    return this.breaker.race(gate);
  }

  /** Copies rank `root`'s `data` to every rank (same length everywhere), pipelined around the ring. */
  async broadcast(data: Float32Array, root = 0): Promise<void> {
    this.checkUsable();
    const n = this.worldSize;
    if (!Number.isInteger(root) || root < 0 || root >= n) throw new RingUsageError(`broadcast root must be in 0..${n - 1}, got ${root}`);
    const opId = ++this.opId;
    this.stats_.ops++;
    if (n === 1 || data.length === 0) return;
    const prev = this.fromPrev;
    const next = this.toNext!;
    const pieceElems = this.pieceBytes / 4;
    const pieces = Math.ceil(data.length / pieceElems);
    const header = (p: number) => ({
      generation: this.generation, opId, rank: this.rank, phase: Phase.BROADCAST, step: 0, chunk: 0, piece: p,
      offset: p * pieceElems, count: Math.min(pieceElems, data.length - p * pieceElems), dtype: DType.F32,
    });
    if (this.rank === root) {
      // Copied: the caller may change `data` as soon as this returns, before the bytes are sent.
      for (let p = 0; p < pieces; p++) {
        const h = header(p);
        next.sendCopyOf(h, bytesOf(data.subarray(h.offset, h.offset + h.count)), false);
      }
    } else {
      const forward = this.next.rank !== root;
      for (let p = 0; p < pieces; p++) {
        const h = header(p);
        const exp: Expected = { phase: Phase.BROADCAST, step: 0, chunk: 0, piece: p, offset: h.offset, count: h.count };
        const m = await prev.receiveValid(`broadcast op ${opId}`, (msg, fr) => this.chunkCheck(msg, fr, opId, exp, DType.F32));
        const input = prev.payloadOf(m, h.count * 4);
        data.set(asF32(input.buf), h.offset);
        if (forward) next.sendCopyOf(h, input.buf, !input.shared);
        if (input.shared) prev.releaseSlot();
      }
    }
    await this.flushSends();
  }

  private chunkCheck(m: Message, frames: Buffer[], opId: number, exp: Expected, dtype: dtrain.RingChunk.DType): string | null {
    if (m.protocolVersion !== PROTOCOL_VERSION) return 'protocol version';
    if (m.kind !== 'ringChunk') return `unexpected ${m.kind}`;
    const c = m.body as dtrain.RingChunk.$Properties;
    if ((c.generation ?? 0) !== this.generation) return 'stale generation';
    const op = (c.opId ?? 0) as number;
    if (op < opId) return 'stale op';
    if (op !== opId) return 'wrong op';
    if ((c.rank ?? 0) !== this.prev.rank) return 'wrong sender rank';
    if (
      (c.phase ?? 0) !== exp.phase || (c.step ?? 0) !== exp.step || (c.chunk ?? 0) !== exp.chunk ||
      (c.piece ?? 0) !== exp.piece || (c.offset ?? 0) !== exp.offset || (c.count ?? 0) !== exp.count
    ) return 'unexpected chunk header';
    if ((c.dtype ?? 0) !== dtype) return 'wrong dtype';
    return this.fromPrev.payloadCheck(c.shmSlot ?? 0, frames, exp.count * dtypeSize(dtype));
  }

  // One all-reduce: reduce-scatter then all-gather, each chunk cut into pieces that flow through
  // the ring independently, so that sending, receiving and summing overlap. Each piece's result
  // is computed where it is sent from: a free slot of the shared-memory link to the next rank,
  // else the received frame itself (ours), else a new buffer.
  private async runOp(data: Float32Array, opts: AllReduceOptions): Promise<void> {
    const opId = ++this.opId;
    this.stats_.ops++;
    const n = this.worldSize;
    const len = data.length;
    if (n === 1 || len === 0) return;
    const r = this.rank;
    const fp16 = opts.fp16 === true;
    const esize = fp16 ? 2 : 4;
    const op: ReduceOp = {
      id: opId, data, rank: r, generation: this.generation, fp16, divisor: opts.average === true ? n : 1,
      dtype: fp16 ? DType.F16 : DType.F32, esize, pieceElems: Math.max(1, Math.floor(this.pieceBytes / esize)),
    };
    const prev = this.fromPrev;
    this.sendOwnChunk(op);

    const during = (phase: string, s: number) => `all-reduce op ${opId} (${phase} step ${s} of ${n - 1})`;
    for (let s = 0; s < n - 1; s++) {
      const c = mod(r - 1 - s, n);
      const [start, count] = chunkBounds(len, n, c);
      for (let p = 0, np = Math.ceil(count / op.pieceElems); p < np; p++) {
        const off = start + p * op.pieceElems;
        const exp: Expected = { phase: Phase.REDUCE_SCATTER, step: s, chunk: c, piece: p, offset: off, count: Math.min(op.pieceElems, start + count - off) };
        const m = await prev.receiveValid(during('reduce-scatter', s), (msg, fr) => this.chunkCheck(msg, fr, opId, exp, op.dtype));
        this.reducePiece(op, m, exp, s === n - 2);
      }
    }

    for (let s = 0; s < n - 1; s++) {
      const c = mod(r - s, n);
      const [start, count] = chunkBounds(len, n, c);
      for (let p = 0, np = Math.ceil(count / op.pieceElems); p < np; p++) {
        const off = start + p * op.pieceElems;
        const exp: Expected = { phase: Phase.ALL_GATHER, step: s, chunk: c, piece: p, offset: off, count: Math.min(op.pieceElems, start + count - off) };
        const m = await prev.receiveValid(during('all-gather', s), (msg, fr) => this.chunkCheck(msg, fr, opId, exp, op.dtype));
        this.gatherPiece(op, m, exp, s < n - 2);
      }
    }
    await this.flushSends();
  }

  /**
   * Reduce-scatter step 0: this rank's own chunk. Over a socket straight from `data` (zero-copy).
   * Safe: this region is next written by the all-gather, after the chunk has gone around the ring
   * through the next rank, which therefore has already read these bytes.
   */
  private sendOwnChunk(op: ReduceOp): void {
    const next = this.toNext!;
    const { data, fp16, esize, pieceElems } = op;
    const [start, count] = chunkBounds(data.length, this.worldSize, op.rank);
    for (let p = 0, np = Math.ceil(count / pieceElems); p < np; p++) {
      const off = start + p * pieceElems;
      const cnt = Math.min(pieceElems, start + count - off);
      const local = data.subarray(off, off + cnt);
      const h = chunkHeader(op, Phase.REDUCE_SCATTER, 0, op.rank, p, off, cnt);
      const slot = next.freeSlot();
      if (slot >= 0) {
        const out = next.slotBuffer(slot, cnt * esize);
        if (fp16) encodeHalf(asU16(out), local);
        else asF32(out).set(local);
        next.sendPiece(h, out, slot);
      } else if (fp16) {
        const half = new Uint16Array(cnt);
        encodeHalf(half, local);
        next.sendPiece(h, bytesOf(half), -1);
      } else {
        next.sendPiece(h, bytesOf(local), -1);
      }
    }
  }

  /**
   * A received reduce-scatter piece: the partial sum from the previous ranks + ours (ring order),
   * sent on. The owner of the chunk (`last` step) keeps the result in `data` too.
   */
  private reducePiece(op: ReduceOp, m: Message & { frames: Buffer[] }, exp: Expected, last: boolean): void {
    const prev = this.fromPrev;
    const next = this.toNext!;
    const { offset: off, count: cnt } = exp;
    const bytes = cnt * op.esize;
    const input = prev.payloadOf(m, bytes);
    const local = op.data.subarray(off, off + cnt);
    const slot = next.freeSlot();
    let out: Buffer;
    if (!op.fp16) {
      const acc = asF32(input.buf); // a copy only if a frame arrived unaligned
      const o = slot >= 0 ? asF32(next.slotBuffer(slot, bytes)) : input.shared ? new Float32Array(cnt) : acc;
      if (!last) addInto(o, acc, local);
      else finishPiece(o, acc, local, op.divisor);
      out = bytesOf(o);
    } else {
      const received = asU16(input.buf);
      const acc = slot >= 0 ? asU16(next.slotBuffer(slot, bytes)) : input.shared ? new Uint16Array(cnt) : received;
      if (acc !== received) acc.set(received);
      // The owner keeps exactly what the others will decode, so every rank has the same bits.
      if (!last) accumulateHalf(acc, local);
      else finishHalf(acc, local, op.divisor);
      out = bytesOf(acc);
    }
    if (input.shared) prev.releaseSlot();
    next.sendPiece(chunkHeader(op, last ? Phase.ALL_GATHER : Phase.REDUCE_SCATTER, last ? 0 : exp.step + 1, exp.chunk, exp.piece, off, cnt), out, slot);
  }

  /** A received all-gather piece: the final values, kept in `data` and, unless last, sent on. */
  private gatherPiece(op: ReduceOp, m: Message & { frames: Buffer[] }, exp: Expected, forward: boolean): void {
    const prev = this.fromPrev;
    const { offset: off, count: cnt } = exp;
    const input = prev.payloadOf(m, cnt * op.esize);
    const local = op.data.subarray(off, off + cnt);
    if (!op.fp16) local.set(asF32(input.buf));
    else {
      const h = asU16(input.buf);
      const t = HALF_TO_FLOAT;
      for (let i = 0; i < cnt; i++) local[i] = t[h[i]];
    }
    if (forward) this.toNext!.sendCopyOf(chunkHeader(op, Phase.ALL_GATHER, exp.step + 1, exp.chunk, exp.piece, off, cnt), input.buf, !input.shared);
    if (input.shared) prev.releaseSlot();
  }

  /** Counters of this ring (messages, bytes, rejections by reason). */
  stats(): RingStats {
    return { ...this.stats_, rejected: { ...this.stats_.rejected }, authRefused: this.fromPrev.authRefused };
  }

  /**
   * Breaks the ring on purpose: a collective in flight (and every later one) rejects with a
   * RingAbortedError carrying `reason`; nothing is sent to the neighbours (they are told by the
   * coordinator, or notice the closed links). Used by elastic training to stop waiting for a peer
   * the coordinator declared lost. close() still has to be called.
   */
  abort(reason: string): void {
    this.fail(new RingAbortedError(`rank ${this.rank}: ${reason}`), false);
  }

  /** The error that broke this ring, if any. */
  get error(): TransportError | undefined {
    return this.breaker.error;
  }

  /**
   * Closes the ring. When healthy, first a RingClose handshake (bounded by the timeout) makes
   * sure the next rank has read everything this rank sent; then both sockets close with linger 0.
   */
  async close(): Promise<void> {
    if (this.closed) return;
    const graceful = this.connected && this.worldSize > 1 && this.breaker.error === undefined && !this.closing;
    this.closing = true;
    if (graceful && this.toNext !== undefined) {
      try {
        await this.closeHandshake(this.toNext);
      } catch {
        // Best effort: a peer that is gone cannot be waited for.
      }
    }
    this.closed = true;
    for (const t of this.graceTimers) clearTimeout(t);
    this.graceTimers.clear();
    this.breaker.release(() => new RingUsageError(`rank ${this.rank}: ring closed`));
    this.toNext?.close();
    this.fromPrev.close();
  }

  /** Runs `fn` after `ms` unless the ring is closing by then; close() cancels it. */
  private afterGrace(ms: number, fn: () => void): void {
    const timer = setTimeout(() => {
      this.graceTimers.delete(timer);
      if (!this.closing) fn();
    }, ms);
    this.graceTimers.add(timer);
  }

  /**
   * Our RingClose goes after all our data; the next rank acknowledges it once read (or is gone),
   * while we read and acknowledge the previous rank's: each side then knows nothing is in flight.
   */
  private async closeHandshake(next: NextLink): Promise<void> {
    const deadline = Date.now() + Math.min(this.timeoutMs, 10_000);
    next.sayClose();
    await next.queued;
    await Promise.allSettled([next.closeAcknowledged(deadline), this.fromPrev.closeReceived(deadline)]);
  }
}

/** Floats per block of the owner's sum-and-copy: 128 KiB, so the copy reads what the sum just
 * wrote from L2 (measured 10% faster than the sum of the whole piece followed by the copy). */
const OWNER_BLOCK = 32 * 1024;

/**
 * The owner of a chunk finishes a piece: out = acc + local (ring order), divided by `divisor`
 * unless it is 1, and the result kept in `local` too. `out` may be `acc` (in place). The sum then a
 * copy measured faster than one loop that writes both buffers (V8 compiles two stores per element
 * poorly).
 */
function finishPiece(out: Float32Array, acc: Float32Array, local: Float32Array, divisor: number): void {
  const n = acc.length;
  for (let o = 0; o < n; o += OWNER_BLOCK) {
    const e = Math.min(n, o + OWNER_BLOCK);
    const ob = out.subarray(o, e);
    const l = local.subarray(o, e);
    addInto(ob, out === acc ? ob : acc.subarray(o, e), l); // same object: the in-place kernel
    if (divisor !== 1) divideInto(ob, ob, divisor);
    l.set(ob);
  }
}
