// The link from the previous rank: this rank's data socket (a ROUTER), bound before the ring
// knows its peers (ring-link.ts says what a link is).
import { dirname, join } from 'node:path';
import { hostname, tmpdir } from 'node:os';
import { mkdtempSync, rmSync } from 'node:fs';
import type * as zmq from 'zeromq';
import { PeerLostError, PeerTimeoutError, ProtocolVersionError, RingSetupError, TransportError } from './errors.js';
import { countAuthRefused, decodeMessage, dtrain, encodeMessage, logRejection, logTransport, peerLabel, PROTOCOL_VERSION, type Message } from './protocol.js';
import type { PeerInfo, RingOptions } from './ring.js';
import { linkIdentity, PREV_LOST_GRACE_MS, type LinkIds, type LinkOwner } from './ring-link.js';
import { InSlots } from './ring-slots.js';
import { createServerRouter, type ZapRegistration } from './security.js';
import { sharedMemoryUnavailable, ShmSegment } from './shm.js';

/**
 * Inbound limits of the data socket, per connection: a frame larger than this is a protocol
 * violation (libzmq drops the connection), and at most RING_QUEUE_BYTES / maxFrame messages wait
 * unread (then libzmq stops reading that connection, so TCP pushes back on the sender).
 */
export function ringInboundLimits(pieceBytes: number, curve = false): { maxMessageSize: number; receiveHighWaterMark: number } {
  // libzmq checks the limit against the frame on the wire: under CURVE that is the MESSAGE command
  // around the encrypted piece (name, nonce, MAC: 33 bytes), so a full piece needs the margin.
  const maxMessageSize = Math.max(pieceBytes, 64 * 1024) + (curve ? CURVE_FRAME_OVERHEAD : 0);
  return { maxMessageSize, receiveHighWaterMark: Math.min(4096, Math.max(16, Math.floor(RING_QUEUE_BYTES / maxMessageSize))) };
}
/** Room for CURVE's MESSAGE command around a frame (33 bytes in libzmq 4.3; rounded up). */
export const CURVE_FRAME_OVERHEAD = 256;
/** Bytes of messages that may wait unread per inbound connection of a data socket (about). */
export const RING_QUEUE_BYTES = 256 * 1024 * 1024;

/** This rank's data socket, bound: the previous rank (and only it, once connected) sends here. */
export interface DataSocket {
  readonly router: zmq.Router;
  /** Endpoints to advertise to the coordinator (Hello.data_endpoints). */
  readonly endpoints: string[];
  /** The ipc:// socket file, in a directory of its own that close removes. */
  ipcPath: string | undefined;
  readonly zapReg: ZapRegistration | undefined;
  /** Connections refused at the CURVE handshake. */
  readonly auth: { refused: number };
}

/** Binds rank `opts.rank`'s data socket on TCP and, unless turned off, ipc://. */
export async function bindDataSocket(opts: RingOptions, pieceBytes: number, timeoutMs: number): Promise<DataSocket> {
  const { rank } = opts;
  const listen = opts.listen ?? '127.0.0.1';
  const auth = { refused: 0 };
  const { router, zapReg } = await createServerRouter({
    security: opts.security,
    listen,
    what: `rank ${rank}'s data socket`,
    zapName: `rank ${rank}`,
    options: {
      linger: 0,
      // Bounded per connection (see ringInboundLimits); a legitimate previous rank is only slowed
      // by it, never stalled: this rank reads its queue throughout every collective.
      ...ringInboundLimits(pieceBytes, opts.security?.kind === 'curve'),
      sendTimeout: timeoutMs,
      // No ZMTP heartbeats on a socket that accepts strangers' connections: with heartbeats and a
      // bounded receive queue, libzmq 4.3.5 aborts the whole process (`Assertion failed:
      // !_io_error (stream_engine_base.cpp:310)`) when such a connection breaks at the wrong
      // moment (libzmq issues #3937, #4364, #4767). Our fuzz-during-a-run test hit it. The
      // previous rank's DEALER still pings this socket (libzmq answers without the option), so
      // a stopped rank is named by its previous rank at half the timeout, and by this one's
      // receive timeout.
    },
    onRefused: (reason, address) => {
      auth.refused++;
      countAuthRefused(reason);
      logRejection(`address ${address}`, reason, `rank ${rank}'s data socket refused a connection from`);
    },
  });
  const socket: DataSocket = { router, endpoints: [], ipcPath: undefined, zapReg, auth };
  try {
    await router.bind(`tcp://${listen}:${opts.port ?? 0}`);
    const bound = router.lastEndpoint ?? '';
    const port = bound.slice(bound.lastIndexOf(':') + 1);
    const advertise = opts.advertise ?? (listen === '0.0.0.0' || listen === '*' ? hostname() : listen);
    socket.endpoints.push(`tcp://${advertise}:${port}`);
    if (opts.ipc ?? true) {
      // In a directory of its own, mode 0700 (mkdtemp): other local users cannot connect to it,
      // whatever the process's umask made of the socket file.
      socket.ipcPath = join(mkdtempSync(join(tmpdir(), `dtrain-ipc-${process.pid}-`)), `rank-${rank}.sock`);
      await router.bind(`ipc://${socket.ipcPath}`);
      socket.endpoints.push(`ipc://${socket.ipcPath}`);
    }
  } catch (e) {
    closeDataSocket(socket);
    throw new RingSetupError(
      `rank ${rank} could not bind its data socket on ${listen}:${opts.port ?? 0}: ${(e as Error).message}. ` +
        `Choose a free port or another address.`,
    );
  }
  return socket;
}

function closeDataSocket(s: DataSocket): void {
  s.router.close();
  s.zapReg?.release();
  if (s.ipcPath !== undefined) rmSync(dirname(s.ipcPath), { recursive: true, force: true });
}

/** The data of a checked RingChunk: see PrevLink.payloadOf. */
export interface Payload {
  buf: Buffer;
  /** In a shared-memory slot: read-only, given back with PrevLink.releaseSlot(). */
  shared: boolean;
}

/**
 * The link from the previous rank: the data socket. It counts its inbound connections from the
 * start (a ring binds before it knows its peers), reads only the previous rank's routing id once
 * connected, and answers on the same connection (RingHello, RingCredits, the close ack).
 */
export class PrevLink {
  /** Set by attach() (connect): who is at the other end, and who we are. */
  private peer!: PeerInfo;
  private ids!: LinkIds;
  private identity: Buffer = Buffer.alloc(0);
  private liveInbound = 0;
  /** The previous rank's RingHello came: from now on its disconnect is a loss. */
  private seen = false;
  private onGone: (() => void) | undefined;
  /** Sends on the data socket (answers and credits to the previous rank), one at a time. */
  private sendChain: Promise<void> = Promise.resolve();
  private pendingReceive: Promise<Buffer[]> | undefined;
  private readonly receiveSettled = (): void => {
    this.pendingReceive = undefined;
  };
  private recvTimeout = -1;
  /** The previous rank's shared-memory link to us, once accepted. */
  private slots: InSlots | undefined;

  constructor(
    private readonly ring: LinkOwner,
    private readonly socket: DataSocket,
  ) {
    // Count inbound connections from the start, so the count is exact.
    socket.router.events.on('accept', () => {
      this.liveInbound++;
    });
    socket.router.events.on('disconnect', () => {
      this.liveInbound = Math.max(0, this.liveInbound - 1);
      if (this.liveInbound > 0) return;
      // Only the previous rank should be connected here; a stranger who connects and leaves
      // while it is still connected leaves the count >= 1 and changes nothing.
      if (ring.closing) this.onGone?.();
      else if (this.seen) {
        // The previous rank may have closed because it failed: its RingAbort, naming the cause,
        // is then already queued here, and a moment's grace lets the receive read it first.
        ring.afterGrace(PREV_LOST_GRACE_MS, () => {
          ring.fail(new PeerLostError(this.peer.rank, this.peer.host, 'its connection to this rank closed', this.ids.rank), true);
        });
      }
    });
  }

  /** Connections refused at the CURVE handshake. */
  get authRefused(): number {
    return this.socket.auth.refused;
  }

  /** Names the previous rank: only its routing id is read from now on. */
  attach(ids: LinkIds, peer: PeerInfo): void {
    this.ids = ids;
    this.peer = peer;
    this.identity = linkIdentity(ids, peer.rank);
  }

  /**
   * With CURVE the data socket admitted every key of the cluster's allow-list until the peers were
   * known; from here on only the previous rank's (attached), so another allowed key cannot pose as it.
   */
  admitOnlyPrevious(): void {
    const zap = this.socket.zapReg; // there is one exactly when the ring uses CURVE
    if (zap === undefined) return;
    const prev = this.peer;
    if (!prev.publicKey) {
      throw new RingSetupError(`rank ${this.ids.rank}: the peer list gives no CURVE key for rank ${prev.rank} on ${prev.host}; with CURVE every member's key comes in the Welcome`);
    }
    zap.restrict([prev.publicKey]);
  }

  /** A ring of one: nobody has a reason to connect to the data socket. */
  admitNobody(): void {
    this.socket.zapReg?.restrict([]);
  }

  /** Sends on the data socket, one message at a time (zeromq.js allows one pending send). */
  private send(frames: Buffer[]): Promise<void> {
    const sent = this.sendChain.then(() => this.socket.router.send(frames));
    this.sendChain = sent.catch(() => undefined);
    return sent;
  }

  /**
   * Waits for the previous rank's RingHello, maps the shared memory it offers when `sharedMemory`
   * and the offer checks out, and answers on the same connection (saying whether it did).
   */
  async greet(sharedMemory: boolean): Promise<void> {
    const hello = await this.receiveValid('ring setup (waiting for its RingHello)', (m) => this.helloCheck(m));
    this.seen = true;
    const accepted = this.acceptSlots(hello.body as dtrain.RingHello.$Properties, sharedMemory);
    const { rank, worldSize, generation, host, runId } = this.ids;
    await this.send([hello.frames[0], encodeMessage('ringHello', { rank, worldSize, generation, host, shmAccepted: accepted }, runId)]);
  }

  // During setup a RingHello from the previous rank with another protocol version is a refusal
  // with a clear message, not silently dropped garbage.
  private helloCheck(m: Message): string | null {
    if (m.kind !== 'ringHello') return `unexpected ${m.kind} during setup`;
    const b = m.body as dtrain.RingHello.$Properties;
    const prev = this.peer;
    if ((b.rank ?? 0) !== prev.rank) return 'ringHello from wrong rank';
    if (m.protocolVersion !== PROTOCOL_VERSION) {
      const err = new ProtocolVersionError(PROTOCOL_VERSION, m.protocolVersion, `rank ${prev.rank} on host ${prev.host}`);
      this.ring.fail(err, false);
      return 'protocol version';
    }
    if ((b.worldSize ?? 0) !== this.ids.worldSize) return 'ringHello world size mismatch';
    if ((b.generation ?? 0) !== this.ids.generation) return 'ringHello generation mismatch';
    return null;
  }

  /** Maps the previous rank's offered segment if it checks out; says whether it did. */
  private acceptSlots(hello: dtrain.RingHello.$Properties, sharedMemory: boolean): boolean {
    if (!hello.shmPath || !sharedMemory || sharedMemoryUnavailable() !== undefined) return false;
    try {
      this.slots = new InSlots(ShmSegment.open(hello.shmPath, hello.shmToken ?? new Uint8Array(0), hello.shmSlots ?? 0, hello.shmSlotBytes ?? 0));
      this.ring.stats.shm.fromPrev = true;
      return true;
    } catch (e) {
      logTransport(
        `rank ${this.ids.rank}: did not map the shared memory offered by rank ${this.peer.rank} on host ${this.peer.host} (${(e as Error).message}); ` +
          `that link uses a socket`,
      );
      return false;
    }
  }

  /**
   * Receives the next valid message from the previous rank: checks identity, decodes, verifies,
   * applies `check` (null = accept). Invalid messages are counted and skipped; the deadline
   * (timeoutMs after the last valid message) is not extended by them.
   */
  async receiveValid(during: string, check: (m: Message, frames: Buffer[]) => string | null): Promise<Message & { frames: Buffer[] }> {
    const deadline = Date.now() + this.ids.timeoutMs;
    for (;;) {
      this.armReceive(deadline, during);
      let frames: Buffer[];
      try {
        frames = await this.receiveOrFail();
      } catch (e) {
        this.receiveFailed(e, deadline, during);
        continue;
      }
      this.ring.stats.messagesReceived++;
      const m = this.screen(frames);
      if (m === undefined) continue;
      const why = check(m, frames);
      if (why !== null) {
        this.ring.reject(why);
        if (this.ring.breaker.error !== undefined) throw this.ring.breaker.error;
        continue;
      }
      for (let i = 2; i < frames.length; i++) this.ring.stats.bytesReceived += frames[i].byteLength;
      return Object.assign(m, { frames });
    }
  }

  /** Before a receive: throws when the ring broke or the deadline passed, else sets what is left as the socket's timeout. */
  private armReceive(deadline: number, during: string): void {
    if (this.ring.breaker.error !== undefined) throw this.ring.breaker.error;
    const remaining = deadline - Date.now();
    if (remaining <= 0) throw this.timeoutError(during);
    // Setting a socket option is a native call: only when it changes by more than a little.
    if (Math.abs(this.recvTimeout - remaining) > 25) {
      this.recvTimeout = remaining;
      this.socket.router.receiveTimeout = remaining;
    }
  }

  /** After a failed receive: returns when another try is due, else throws the error to report. */
  private receiveFailed(e: unknown, deadline: number, during: string): void {
    if (e instanceof TransportError) throw e;
    if ((e as { code?: string }).code === 'EAGAIN') {
      // libuv starts the socket's timer from its cached loop time, which is stale after a long
      // synchronous stretch (summing, the caller's compute): such early expiries are retried.
      if (Date.now() < deadline) return;
      throw this.timeoutError(during);
    }
    throw this.fatal(new PeerLostError(this.peer.rank, this.peer.host, `receiving failed: ${(e as Error).message}`, this.ids.rank));
  }

  private receiveOrFail(): Promise<Buffer[]> {
    // One receive may be pending per socket: a receive abandoned by a failure is never reissued,
    // because a broken ring is never used again.
    const recv = this.socket.router.receive();
    this.pendingReceive = recv;
    recv.then(this.receiveSettled, this.receiveSettled);
    return this.ring.breaker.race(recv);
  }

  /** The message in `frames` when it is the previous rank's and this run's; undefined when dropped. */
  private screen(frames: Buffer[]): Message | undefined {
    if (!this.isFromPrev(frames)) return undefined;
    const decoded = decodeMessage(frames[1]);
    if (!decoded.ok) {
      this.ring.reject(decoded.reason);
      return undefined;
    }
    const m = decoded.message;
    if (m.runId !== this.ids.runId) {
      this.ring.reject('other run');
      return undefined;
    }
    if (m.kind === 'ringAbort' || (m.kind === 'ringClose' && !this.ring.closing)) {
      this.endWait(m);
      return undefined;
    }
    return m;
  }

  /** Whether `frames` come from the previous rank; anyone else's are counted and dropped. */
  private isFromPrev(frames: Buffer[]): boolean {
    if (frames.length >= 2 && frames[0].equals(this.identity)) return true;
    this.ring.reject('unknown sender', peerLabel(frames[0]));
    return false;
  }

  /**
   * A RingAbort (the ring broke upstream), or a RingClose while this rank still expects data, ends
   * the wait by throwing the failure it reports; a stale one is dropped.
   */
  private endWait(m: Message): void {
    const { rank, generation } = this.ids;
    if (m.kind === 'ringAbort') {
      const a = m.body as dtrain.RingAbort.$Properties;
      if ((a.generation ?? 0) !== generation || m.protocolVersion !== PROTOCOL_VERSION) {
        this.ring.reject('stale ringAbort');
        return;
      }
      const err = new PeerLostError(a.failedRank ?? 0, a.failedHost ?? '?', `${a.reason ?? ''} [reported by rank ${a.reporterRank ?? '?'}]`, rank);
      this.ring.fail(err, true); // passed on naming the same rank and host (Ring.fail reads them off err)
      throw err;
    }
    const c = m.body as dtrain.RingClose.$Properties;
    if (m.protocolVersion !== PROTOCOL_VERSION || (c.generation ?? 0) !== generation || (c.rank ?? 0) !== this.peer.rank || c.ack === true) {
      this.ring.reject('stale ringClose');
      return;
    }
    throw this.fatal(new PeerLostError(this.peer.rank, this.peer.host, 'it closed its ring while this rank still expected data (collectives called differently on different ranks?)', rank));
  }

  private timeoutError(during: string): TransportError {
    return this.fatal(new PeerTimeoutError(this.peer.rank, this.peer.host, this.ids.timeoutMs, during, this.ids.rank));
  }

  /** Reports `err` (the next rank is told) and returns what broke the ring: `err`, or an earlier failure. */
  private fatal(err: TransportError): TransportError {
    this.ring.fail(err, true);
    return this.ring.breaker.error ?? err;
  }

  /** Why the payload of a RingChunk of `bytes` announced in `slot` (0: a frame) is not readable, or null. */
  payloadCheck(slot: number, frames: Buffer[], bytes: number): string | null {
    if (slot !== 0) {
      if (this.slots === undefined) return 'shared-memory piece on a socket link';
      if (frames.length !== 2) return 'bad payload length';
      return this.slots.check(slot, bytes);
    }
    // A truncated or padded payload under a right header is dropped like any other bad message:
    // the genuine piece may still come, and if not the timeout names the previous rank.
    if (frames.length !== 3 || frames[2].byteLength !== bytes) return 'bad payload length';
    return null;
  }

  /**
   * The data of a checked RingChunk: its socket frame (a buffer of our own, free to reuse) or,
   * on a shared-memory link, the slot it names (read-only; give it back with releaseSlot()
   * once used).
   */
  payloadOf(m: Message & { frames: Buffer[] }, bytes: number): Payload {
    const slot = (m.body as dtrain.RingChunk.$Properties).shmSlot ?? 0;
    if (slot === 0) return { buf: m.frames[2], shared: false };
    this.ring.stats.bytesReceived += bytes;
    return { buf: this.slots!.piece(slot, bytes), shared: true };
  }

  /** Tells the previous rank that the slot just read may be written again (RingCredit). */
  releaseSlot(): void {
    const pieces = this.slots!.release();
    const credit = encodeMessage('ringCredit', { generation: this.ids.generation, rank: this.ids.rank, pieces }, this.ids.runId);
    this.send([this.identity, credit]).catch(() => undefined);
  }

  /**
   * Settles when the previous rank's RingClose is read and acknowledged (nothing else is skipped:
   * all collectives are done), or the previous rank is gone, or the receive times out at `deadline`.
   */
  closeReceived(deadline: number): Promise<void> {
    const closed = this.readClose(deadline);
    const gone = new Promise<void>((resolve) => {
      this.onGone = resolve;
      if (this.liveInbound === 0) resolve();
    });
    return Promise.race([closed, gone]);
  }

  private async readClose(deadline: number): Promise<void> {
    if (this.pendingReceive !== undefined) return;
    const router = this.socket.router;
    router.receiveTimeout = Math.max(1, deadline - Date.now());
    for (;;) {
      const frames = await router.receive();
      if (!this.isFromPrev(frames)) continue;
      const d = decodeMessage(frames[1]);
      if (d.ok && d.message.kind === 'ringClose' && !(d.message.body as dtrain.RingClose.$Properties).ack) {
        await this.send([frames[0], encodeMessage('ringClose', { rank: this.ids.rank, generation: this.ids.generation, ack: true }, this.ids.runId)]);
        return;
      }
      this.ring.reject(d.ok ? `unexpected ${d.message.kind} on close` : d.reason);
    }
  }

  /** Closes the data socket (linger 0) and removes its ipc:// directory. */
  close(): void {
    closeDataSocket(this.socket);
    // The shared pages go back when the mapping is collected (a ring object may outlive this).
    this.slots = undefined;
  }
}
