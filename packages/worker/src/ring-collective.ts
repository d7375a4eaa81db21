// The trainer's Collective over @dtrain/transport's ring all-reduce: what makes a Trainer
// distributed. Bitwise identical results on every rank come from the ring's contract (each
// element summed once, by one rank, in a fixed order, then copied around).
import { createHash } from 'node:crypto';
import type { Ring } from '@dtrain/transport';
import type { BucketRanges, Collective, StagedReduce } from './collective.js';

/** What RingCollective needs of a ring: a Ring, or a ThreadedRing (the same ring in its own thread). */
export type RingLike = Pick<Ring, 'rank' | 'worldSize' | 'allReduce' | 'broadcast' | 'allReduceStaged'>;

export type CollectiveOp = 'mean' | 'sum' | 'broadcast';

export interface RingCollectiveOptions {
  /** Called when a collective starts (e.g. to report the activity). */
  beforeOp?: (op: CollectiveOp, buf: Float32Array) => void;
  /** Called after every collective with its result (e.g. to hash it); must not keep `buf`. */
  afterOp?: (op: CollectiveOp, buf: Float32Array, seconds: number) => void;
}

/** Seconds and calls spent in collectives since the collective was made (or `resetStats`). */
export interface CollectiveStats {
  calls: number;
  seconds: number;
  floats: number;
}

/**
 * `Collective` over a connected `Ring`. allReduceMean divides once, on the rank that finishes each
 * chunk, so the mean is as identical across ranks as the sum. Broadcast uses the ring's own
 * pipelined broadcast (a plain copy: exact). Never fp16 here: the trainer also sums counts and
 * BatchNorm statistics through these calls, which binary16 would round.
 */
export class RingCollective implements Collective {
  readonly rank: number;
  readonly worldSize: number;
  private stats_: CollectiveStats = { calls: 0, seconds: 0, floats: 0 };

  constructor(
    readonly ring: RingLike,
    private readonly opts: RingCollectiveOptions = {},
  ) {
    this.rank = ring.rank;
    this.worldSize = ring.worldSize;
  }

  allReduceMean(buf: Float32Array): Promise<void> {
    return this.timed('mean', buf, () => this.ring.allReduce(buf, { average: true }));
  }

  allReduceSum(buf: Float32Array): Promise<void> {
    return this.timed('sum', buf, () => this.ring.allReduce(buf));
  }

  broadcast(buf: Float32Array, root: number): Promise<void> {
    return this.timed('broadcast', buf, () => this.ring.broadcast(buf, root));
  }

  /**
   * The gradient all-reduce overlapping the backward pass: `beforeOp` runs when the first bucket
   * is handed over, `afterOp` when the last is reduced (the seconds in between are partly hidden
   * behind the backward pass).
   */
  allReduceMeanStaged(buf: Float32Array, buckets: BucketRanges): StagedReduce {
    const staged = this.ring.allReduceStaged(buf, buckets, { average: true });
    let t0: number | undefined;
    return {
      ready: (i: number) => {
        if (t0 === undefined) {
          this.opts.beforeOp?.('mean', buf);
          t0 = performance.now();
        }
        staged.ready(i);
      },
      done: staged.done.then(() => this.record('mean', buf, t0 ?? performance.now())),
    };
  }

  stats(): CollectiveStats {
    return { ...this.stats_ };
  }

  resetStats(): void {
    this.stats_ = { calls: 0, seconds: 0, floats: 0 };
  }

  private async timed(op: CollectiveOp, buf: Float32Array, f: () => Promise<void>): Promise<void> {
    this.opts.beforeOp?.(op, buf);
    const t0 = performance.now();
    await f();
    this.record(op, buf, t0);
  }

  private record(op: CollectiveOp, buf: Float32Array, t0: number): void {
    const seconds = (performance.now() - t0) / 1000;
    this.stats_.calls++;
    this.stats_.seconds += seconds;
    this.stats_.floats += buf.length;
    this.opts.afterOp?.(op, buf, seconds);
  }
}

/** sha256 (hex) of the bytes of float32 buffers, in order: replicas that match bit for bit match here. */
export function hashFloats(...bufs: Float32Array[]): string {
  const h = createHash('sha256');
  for (const b of bufs) h.update(new Uint8Array(b.buffer, b.byteOffset, b.byteLength));
  return h.digest('hex');
}
