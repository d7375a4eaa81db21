// The contract between the Ring (ring.ts) and its two links, each to one neighbour: PrevLink
// (ring-prev-link.ts), the bound ROUTER (the data socket) on which the previous rank's pieces
// arrive, and NextLink (ring-next-link.ts), the DEALER on which this rank sends to the next rank.
// Each link owns its socket, its side of a shared-memory link (slots and credits, ring-slots.ts),
// its half of the RingHello and RingClose handshakes and the checks on what it reads. A link
// decides nothing about the ring: it reports a failure to its Ring (LinkOwner.fail), which breaks
// the ring once, wakes every wait (Breaker) and tells the next rank.
import type { TransportError } from './errors.js';
import type { RingStats } from './ring.js';

/**
 * How long a closed link waits before it fails the ring, so that the cause of a failure, not its
 * echo, names the lost rank: a closed previous link first reads a queued RingAbort; a closed next
 * link, longer, waits for the previous rank's loss (see the constructors of PrevLink and NextLink).
 */
export const PREV_LOST_GRACE_MS = 100;
export const NEXT_LOST_GRACE_MS = 300;

/** The routing id of `rank`'s DEALER: the previous rank's data socket knows its sender by it. */
export function linkIdentity(ids: LinkIds, rank: number): Buffer {
  return Buffer.from(`dtrain:${ids.runId}:${ids.generation}:${rank}`);
}

/** This rank as its links' messages name it, fixed once the ring is connected; and their timeout. */
export interface LinkIds {
  rank: number;
  worldSize: number;
  host: string;
  generation: number;
  runId: string;
  timeoutMs: number;
}

/** The first failure of a ring, and the waits that it ends at once. */
export class Breaker {
  /** The error that broke the ring, once it did. */
  error: TransportError | undefined;
  private waiters: ((e: TransportError) => void)[] = [];

  /** Records the failure and rejects every wait with it. */
  break(err: TransportError): void {
    this.error = err;
    this.release(() => err);
  }

  /** Rejects every wait with an error of `make` (close: the ring is not broken, only gone). */
  release(make: () => TransportError): void {
    for (const w of this.waiters) w(make());
    this.waiters = [];
  }

  /** Settles as `p` does, or rejects as soon as the ring breaks first. */
  race<T>(p: Promise<T>): Promise<T> {
    return new Promise<T>((resolve, reject) => {
      this.waiters.push(reject);
      const done = () => (this.waiters = this.waiters.filter((w) => w !== reject));
      p.then(
        (v) => (done(), resolve(v)),
        (e: unknown) => (done(), reject(e)),
      );
    });
  }
}

/** What a link needs of its ring: where it counts, reports and schedules. */
export interface LinkOwner {
  /** The ring's counters, added to in place. */
  readonly stats: RingStats;
  readonly breaker: Breaker;
  /** From the start of close(): a neighbour that goes away is then expected, not a failure. */
  readonly closing: boolean;
  /** A failure of the link: the ring breaks (once); with `tellNext`, the next rank gets a RingAbort. */
  fail(err: TransportError, tellNext: boolean): void;
  /** Counts and logs a dropped message (from the previous rank unless `from` says whom). */
  reject(reason: string, from?: string): void;
  /** Runs `fn` after `ms` unless the ring is closing by then (a lost link's grace). */
  afterGrace(ms: number, fn: () => void): void;
}
