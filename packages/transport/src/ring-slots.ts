// The slots of a shared-memory link (README "Same-host links"; the segment itself is shm.ts).
//
// The writer (the previous rank) computes a piece straight into the next free slot and sends
// only its header, naming the slot; the reader (the next rank) reads the slot in place and gives
// it back with a RingCredit counting the pieces it has read. Slots are used in a fixed round, so
// a count says which slots are free again. When every slot is unread the writer sends the piece
// in a socket frame instead: a sender never waits for slots, so the ring cannot deadlock on them.
import { logTransport } from './protocol.js';
import { SHM_MAX_SLOTS, ShmSegment, sharedMemoryUnavailable } from './shm.js';

/** Logged once per process: why links are sockets although peers share the host. */
let shmUnavailableLogged = false;

/** The writing side: which slot is free, as the reader's credits say. */
export class OutSlots {
  /** Pieces written to the slots, and pieces the reader has read back (its last RingCredit). */
  private written = 0;
  private freed = 0;

  constructor(private readonly segment: ShmSegment) {}

  /** The next free slot, or -1 when all are still unread. */
  free(): number {
    return this.written - this.freed < this.segment.slots ? this.written % this.segment.slots : -1;
  }

  /** Slot `slot`'s memory, for a piece of `bytes`. */
  buffer(slot: number, bytes: number): Buffer {
    return this.segment.slot(slot, bytes);
  }

  /** A piece went into the slot free() named. */
  filled(): void {
    this.written++;
  }

  /** Takes a RingCredit's count; false (and nothing changes) when the reader cannot have sent it. */
  credit(pieces: number): boolean {
    if (pieces < this.freed || pieces > this.written) return false;
    this.freed = pieces;
    return true;
  }
}

/** The reading side: which slot the next piece must name, and the count its credit gives back. */
export class InSlots {
  /** Pieces read from the slots so far. */
  private read = 0;

  constructor(private readonly segment: ShmSegment) {}

  /** Why a piece of `bytes` announced in `slot` (1-based, as on the wire) cannot be read, or null. */
  check(slot: number, bytes: number): string | null {
    if (slot !== (this.read % this.segment.slots) + 1) return 'unexpected shared-memory slot';
    if (bytes > this.segment.slotBytes) return 'piece larger than a shared-memory slot';
    return null;
  }

  /** The piece in `slot` (1-based), read-only and in place: give it back with release(). */
  piece(slot: number, bytes: number): Buffer {
    return this.segment.slot(slot - 1, bytes);
  }

  /** The slot just read may be written again: the count of pieces read, for the RingCredit. */
  release(): number {
    return ++this.read;
  }
}

/** Who offers a segment, and how large it should be. */
export interface SlotOffer {
  rank: number;
  generation: number;
  toRank: number;
  pieceBytes: number;
  shmBytes: number;
}

/** A new segment to offer the next rank, or undefined when this process cannot make one. */
export function offerSegment(o: SlotOffer): ShmSegment | undefined {
  const why = sharedMemoryUnavailable();
  if (why !== undefined) {
    if (!shmUnavailableLogged && process.env.DTRAIN_SHM !== '0') {
      shmUnavailableLogged = true;
      logTransport(`rank ${o.rank}: links between processes on this host use sockets, not shared memory: ${why}`);
    }
    return undefined;
  }
  const wanted = Math.min(SHM_MAX_SLOTS, Math.max(1, Math.floor(o.shmBytes / o.pieceBytes)));
  const container = '(in a container: docker run --shm-size=1g)';
  // A full directory (a container's 64 MiB /dev/shm) gets a smaller segment, down to 2 slots:
  // fewer slots only make more pieces go in socket frames.
  for (let slots = wanted; ; slots = Math.max(2, Math.floor(slots / 2))) {
    try {
      const seg = ShmSegment.create(slots, o.pieceBytes, `${o.rank}g${o.generation}`);
      if (slots < wanted) {
        logTransport(
          `rank ${o.rank}: the shared-memory directory had room for ${slots} of ${wanted} slots of its link to rank ${o.toRank} ` +
            `(${ShmSegment.bytes(slots, o.pieceBytes)} of ${ShmSegment.bytes(wanted, o.pieceBytes)} bytes); pieces that find no free slot go through the socket. Give it more room ${container}.`,
        );
      }
      return seg;
    } catch (e) {
      if ((e as { code?: string }).code === 'ENOSPC' && slots > 2) continue;
      logTransport(
        `rank ${o.rank}: no shared memory for its link to rank ${o.toRank} (${(e as Error).message}); that link uses a socket. ` +
          `${ShmSegment.bytes(wanted, o.pieceBytes)} bytes are wanted per link in the shared-memory directory ${container}.`,
      );
      return undefined;
    }
  }
}
