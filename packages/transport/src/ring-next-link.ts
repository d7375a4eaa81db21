// The link to the next rank: a DEALER of its own I/O thread (ring-link.ts says what a link is).
import * as zmq from 'zeromq';
import { PeerLostError, RingSetupError, TransportError } from './errors.js';
import { decodeMessage, dtrain, encodeMessage, PROTOCOL_VERSION } from './protocol.js';
import type { PeerInfo } from './ring.js';
import { linkIdentity, NEXT_LOST_GRACE_MS, type LinkIds, type LinkOwner } from './ring-link.js';
import { offerSegment, OutSlots, type SlotOffer } from './ring-slots.js';
import { heartbeats } from './security.js';
import type { ShmSegment } from './shm.js';

/**
 * The ZeroMQ context of every ring's link to its next rank (the DEALER): its own I/O thread, so
 * that sending to the next rank and receiving from the previous one (the data socket, in the
 * default context) run on two threads. Measured (44.8 MB, ipc, 2 cores, with other CPU-bound jobs
 * running): one I/O thread for both directions was the ring's bottleneck (4 ranks: 118-132 vs
 * 207-249 ms at best); on a quiet machine the two are within the noise. The data socket stays in the
 * default context, where this process's ZAP handler (CURVE allow-lists) lives; a CURVE client
 * needs no ZAP handler. One per process, created on first use; linger 0 (blocky false), so it
 * never holds up the process's exit.
 */
let sendContext_: zmq.Context | undefined;
function sendContext(): zmq.Context {
  sendContext_ ??= new zmq.Context({ blocky: false, ioThreads: 1 });
  return sendContext_;
}

function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, Math.max(1, ms)).unref());
}

/** Sizes of the shared memory a NextLink offers (RingOptions.sharedMemory, shmBytes). */
export interface SlotSizes {
  sharedMemory: boolean;
  pieceBytes: number;
  shmBytes: number;
}

/**
 * The link to the next rank: a DEALER that carries everything this rank sends around the ring
 * and, when the next rank accepted this rank's shared memory, the slots the pieces go in. The next
 * rank answers on it only the RingHello, RingCredits and the close ack.
 */
export class NextLink {
  /** Not readonly: the fuzz test puts a proxy in its place that taps what is sent. */
  private dealer: zmq.Dealer;
  /** Sends, in order, one at a time (zeromq.js allows one pending send per socket). */
  private sendChain: Promise<void> = Promise.resolve();
  private slots: OutSlots | undefined;
  /** With slots the next rank's messages are read all the time (credits): see readCredits. */
  private reader: Promise<void> | undefined;
  private closeAcked: (() => void) | undefined;
  private readonly closeAck = new Promise<void>((resolve) => (this.closeAcked = resolve));
  private closed = false;

  /** Connects to `peer` at `endpoint`; `curve`: its CURVE client options (clientSocketOptions). */
  constructor(
    private readonly ring: LinkOwner,
    private readonly ids: LinkIds,
    private readonly peer: PeerInfo,
    private readonly endpoint: string,
    curve: Record<string, unknown>,
  ) {
    const dealer = new zmq.Dealer({
      context: sendContext(),
      linger: 0,
      routingId: linkIdentity(ids, ids.rank).toString(),
      sendHighWaterMark: 0,
      sendTimeout: ids.timeoutMs,
      receiveTimeout: ids.timeoutMs,
      // Only RingHello answers, RingCredits and RingClose acks come back on this link: small.
      maxMessageSize: 64 * 1024,
      receiveHighWaterMark: 64,
      ...heartbeats(ids.timeoutMs),
      ...curve,
    });
    this.dealer = dealer;
    let connected = false;
    dealer.events.on('connect', () => {
      connected = true;
    });
    dealer.events.on('disconnect', () => {
      if (!connected || ring.closing) return;
      // When a rank dies, its next rank fails and closes its ring, so this rank may read that
      // close before the dead rank's own disconnect (two sockets, two event queues, read in any
      // order by a busy process). The longer grace lets the previous rank's loss, the cause, be
      // the error that names the lost rank.
      ring.afterGrace(NEXT_LOST_GRACE_MS, () => {
        ring.fail(new PeerLostError(peer.rank, peer.host, `connection to ${endpoint} closed`, ids.rank), false);
      });
    });
    dealer.connect(endpoint);
  }

  /** Settles when everything queued so far is sent; rejects when a send failed (already reported). */
  get queued(): Promise<void> {
    return this.sendChain;
  }

  /** Queues `frames` behind what is queued; a failure to send is reported, and the next rank told. */
  send(frames: Buffer[]): void {
    const dealer = this.dealer;
    const stats = this.ring.stats;
    stats.messagesSent++;
    for (const f of frames) stats.bytesSent += f.byteLength;
    this.sendChain = this.sendChain.then(
      () => dealer.send(frames),
      () => undefined,
    );
    this.sendChain.catch((e: unknown) => {
      this.ring.fail(new PeerLostError(this.peer.rank, this.peer.host, `sending to it failed: ${(e as Error).message}`, this.ids.rank), true);
    });
  }

  /** Queues a RingAbort; not counted, and not sent when an earlier send failed (the link is gone). */
  sendAbort(abort: Buffer): void {
    const dealer = this.dealer;
    this.sendChain = this.sendChain.then(() => dealer.send(abort)).catch(() => undefined);
  }

  /** A segment to offer the next rank, when it is on this host and this process can make one. */
  offerSlots(sizes: SlotSizes): ShmSegment | undefined {
    if (!sizes.sharedMemory || this.peer.host !== this.ids.host) return undefined;
    const offer: SlotOffer = { rank: this.ids.rank, generation: this.ids.generation, toRank: this.peer.rank, pieceBytes: sizes.pieceBytes, shmBytes: sizes.shmBytes };
    return offerSegment(offer);
  }

  /** Sends this rank's RingHello, offering `offer`'s slots when there is one. */
  hello(offer: ShmSegment | undefined): void {
    const { rank, worldSize, generation, host, runId } = this.ids;
    this.send([
      encodeMessage('ringHello', {
        rank, worldSize, generation, host,
        ...(offer === undefined ? {} : { shmPath: offer.path, shmToken: offer.token, shmSlots: offer.slots, shmSlotBytes: offer.slotBytes }),
      }, runId),
    ]);
  }

  /** The next rank's answer to our RingHello, within the timeout; a failure breaks the ring. */
  async helloAnswer(): Promise<dtrain.RingHello.$Properties> {
    const { rank, host, timeoutMs } = this.ids;
    const next = this.peer;
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      let frames: Buffer[];
      try {
        // What is left of the deadline: a retried wait must not start a whole new timeout, or an
        // unreachable next rank is named a full timeout after its neighbours gave up.
        this.dealer.receiveTimeout = Math.max(1, deadline - Date.now());
        frames = await this.receiveUnlessBroken();
      } catch (e) {
        if (e instanceof TransportError) throw e; // abort() or another failure of this ring
        if ((e as { code?: string }).code === 'EAGAIN' && Date.now() < deadline) continue; // stale loop time
        const err = new RingSetupError(
          `rank ${rank} on host ${host} could not reach rank ${next.rank} on host ${next.host} at ${this.endpoint} ` +
            `within ${timeoutMs} ms: check that this port is open between the two machines, that the address ` +
            `is right, and that rank ${next.rank} is running.`,
        );
        this.ring.fail(err, false);
        throw err;
      }
      const d = decodeMessage(frames[0]);
      if (d.ok && d.message.kind === 'ringHello' && d.message.protocolVersion === PROTOCOL_VERSION &&
          ((d.message.body as dtrain.RingHello.$Properties).rank ?? 0) === next.rank) return d.message.body as dtrain.RingHello.$Properties;
      this.ring.reject(d.ok ? `unexpected ${d.message.kind} from next rank` : d.reason, `rank ${next.rank} on host ${next.host}`);
    }
  }

  /**
   * A receive that a failure of the ring (abort() included) ends at once: during setup an
   * unreachable next rank would otherwise hold this rank for the whole timeout after the
   * coordinator rolled the generation back.
   */
  private receiveUnlessBroken(): Promise<Buffer[]> {
    const breaker = this.ring.breaker;
    if (breaker.error !== undefined) return Promise.reject(breaker.error);
    return breaker.race(this.dealer.receive());
  }

  /** The next rank mapped `offer`: pieces go in its slots from now on, and its credits are read. */
  useSlots(offer: ShmSegment): void {
    this.slots = new OutSlots(offer);
    this.ring.stats.shm.toNext = true;
    this.reader = this.readCredits(this.slots);
  }

  /**
   * Reads what the next rank sends back on a shared-memory link, for the life of the ring:
   * RingCredits (it has read our slots up to a count) and the close handshake's ack.
   */
  private async readCredits(slots: OutSlots): Promise<void> {
    const dealer = this.dealer;
    const next = this.peer;
    dealer.receiveTimeout = -1; // a dead next rank is noticed by the ZMTP heartbeats (disconnect)
    for (;;) {
      let frames: Buffer[];
      try {
        frames = await dealer.receive();
      } catch (e) {
        if (this.closed || this.ring.breaker.error !== undefined) return;
        if ((e as { code?: string }).code === 'EAGAIN') continue; // idle between collectives
        this.ring.fail(new PeerLostError(next.rank, next.host, `receiving from it failed: ${(e as Error).message}`, this.ids.rank), true);
        return;
      }
      const why = this.takeAnswer(frames, slots);
      if (why !== null) this.ring.reject(why, `rank ${next.rank} on host ${next.host}`);
    }
  }

  /** Takes a RingCredit or the close ack from the next rank; else says why the message is dropped. */
  private takeAnswer(frames: Buffer[], slots: OutSlots): string | null {
    const d = decodeMessage(frames[0]);
    if (!d.ok) return d.reason;
    const m = d.message;
    if (m.runId !== this.ids.runId || m.protocolVersion !== PROTOCOL_VERSION) return 'other run or version';
    if (m.kind === 'ringCredit') {
      const c = m.body as dtrain.RingCredit.$Properties;
      const pieces = (c.pieces ?? 0) as number;
      const ok = (c.generation ?? 0) === this.ids.generation && (c.rank ?? 0) === this.peer.rank && slots.credit(pieces);
      return ok ? null : 'bad ringCredit';
    }
    if (m.kind === 'ringClose' && (m.body as dtrain.RingClose.$Properties).ack === true) {
      this.closeAcked?.();
      return null;
    }
    return `unexpected ${m.kind} from next rank`;
  }

  /**
   * The next free slot of the shared-memory link, or -1 (no such link, or all its slots still
   * unread: the piece then goes in a socket frame).
   */
  freeSlot(): number {
    return this.slots === undefined ? -1 : this.slots.free();
  }

  /** Slot `slot`'s memory (from freeSlot()), for a piece of `bytes`. */
  slotBuffer(slot: number, bytes: number): Buffer {
    return this.slots!.buffer(slot, bytes);
  }

  /** Sends a piece whose data is in `data`: slot `slot` of the shared link (>= 0) or a frame. */
  sendPiece(h: dtrain.RingChunk.$Properties, data: Buffer, slot: number): void {
    const stats = this.ring.stats;
    if (slot >= 0) {
      this.slots!.filled();
      stats.piecesViaShm++;
      stats.bytesSent += data.byteLength;
      this.send([encodeMessage('ringChunk', { ...h, shmSlot: slot + 1 }, this.ids.runId)]);
    } else {
      stats.piecesViaSocket++;
      this.send([encodeMessage('ringChunk', h, this.ids.runId), data]);
    }
  }

  /**
   * Sends `bytes` unchanged: copied into the next free slot of the shared link, else in a frame:
   * `bytes` itself when it is `ours` (a received frame, never written again: no copy), else a
   * copy (a shared slot, or the caller's buffer, which may change once the call returns).
   */
  sendCopyOf(h: dtrain.RingChunk.$Properties, bytes: Buffer, ours: boolean): void {
    const slot = this.freeSlot();
    if (slot >= 0) {
      const out = this.slotBuffer(slot, bytes.byteLength);
      bytes.copy(out);
      this.sendPiece(h, out, slot);
    } else {
      this.sendPiece(h, ours ? bytes : Buffer.from(bytes), -1);
    }
  }

  /** Queues this rank's RingClose: await `queued`, then closeAcknowledged(). */
  sayClose(): void {
    this.send([encodeMessage('ringClose', { rank: this.ids.rank, generation: this.ids.generation, ack: false }, this.ids.runId)]);
  }

  /**
   * Settles when the next rank has acknowledged our RingClose (so it has read all we sent), or is
   * gone, or `deadline` passed.
   */
  closeAcknowledged(deadline: number): Promise<void> {
    const dealer = this.dealer;
    // With a shared-memory link the next rank's messages are already being read (readCredits).
    const acked = this.reader !== undefined ? Promise.race([this.closeAck, sleep(deadline - Date.now())]) : this.readCloseAck(dealer, deadline);
    const gone = new Promise<void>((resolve) => {
      dealer.events.on('disconnect', () => resolve());
    });
    return Promise.race([acked, gone]);
  }

  private async readCloseAck(dealer: zmq.Dealer, deadline: number): Promise<void> {
    dealer.receiveTimeout = Math.max(1, deadline - Date.now());
    for (;;) {
      const frames = await dealer.receive();
      const d = decodeMessage(frames[0]);
      if (d.ok && d.message.kind === 'ringClose' && (d.message.body as dtrain.RingClose.$Properties).ack === true) return;
      this.ring.reject(d.ok ? `unexpected ${d.message.kind} on close` : d.reason);
    }
  }

  /** Closes the socket (linger 0). */
  close(): void {
    this.closed = true;
    this.dealer.close();
    // The shared pages go back when the mapping is collected (a ring object may outlive this).
    this.slots = undefined;
  }
}
