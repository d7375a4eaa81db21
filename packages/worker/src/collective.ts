// The seam between the trainer and the way replicas talk. The trainer only ever calls these
// three operations, in the same order on every rank (the contract of @dtrain/transport's ring),
// so a distributed worker plugs in a ring all-reduce and the trainer does not change.

/**
 * Collective operations over the `worldSize` replicas of a run. Every rank calls the same
 * operations in the same order with buffers of the same length; each operation works in place
 * and the buffer is the caller's again when the promise resolves. Results must be bitwise
 * identical on every rank (replicas stay identical only if they apply identical updates).
 */
export interface Collective {
  readonly rank: number;
  readonly worldSize: number;
  /** Element-wise mean over ranks, in place. */
  allReduceMean(buf: Float32Array): Promise<void>;
  /** Element-wise sum over ranks, in place. */
  allReduceSum(buf: Float32Array): Promise<void>;
  /** Rank `root`'s buffer copied into every rank's buffer. */
  broadcast(buf: Float32Array, root: number): Promise<void>;
  /**
   * allReduceMean in buckets ([from, to) ranges of `buf`) that the caller hands over one by one
   * with `ready(i)` while it still computes the others: the overlap of the gradient all-reduce
   * with the backward pass. Every float of `buf` must be in a bucket; ranks pass the same buckets.
   * Optional: a trainer falls back to allReduceMean after the backward pass.
   */
  allReduceMeanStaged?(buf: Float32Array, buckets: BucketRanges): StagedReduce;
}

/** [from, to) float ranges of one buffer, reduced in this order. */
export type BucketRanges = ReadonlyArray<readonly [number, number]>;

/** An all-reduce in flight whose buckets are declared ready one by one. */
export interface StagedReduce {
  /** Bucket `index` holds this rank's final values. Call it once for every bucket. */
  ready(index: number): void;
  /** Settles when every bucket is reduced. */
  readonly done: Promise<void>;
}

/** One process, world size 1: every collective is the identity. */
export class SingleProcess implements Collective {
  readonly rank = 0;
  readonly worldSize = 1;
  async allReduceMean(_buf: Float32Array): Promise<void> {}
  async allReduceSum(_buf: Float32Array): Promise<void> {}
  async broadcast(_buf: Float32Array, root: number): Promise<void> {
    if (root !== 0) throw new RangeError(`broadcast root ${root} does not exist in a world of size 1`);
  }
}

type Op = 'mean' | 'sum' | 'broadcast';
interface Pending {
  op: Op;
  root: number;
  length: number;
  bufs: (Float32Array | undefined)[];
  arrived: number;
  settle: Array<{ resolve: () => void; reject: (e: Error) => void } | undefined>;
  failed?: Error;
}

/**
 * `worldSize` replicas in one process (for tests, and for simulating a distributed run without
 * sockets): call i of every rank meets call i of the others. Sums run in rank order in float32,
 * then the mean divides once, so every rank gets the same bits, as the ring promises. A rank that
 * calls a different operation or length fails all ranks of that call with a message naming it.
 */
export function createInProcessGroup(worldSize: number): Collective[] {
  if (!Number.isInteger(worldSize) || worldSize < 1) throw new RangeError(`world size must be a positive integer, got ${worldSize}`);
  const pending = new Map<number, Pending>();
  const seq = new Array<number>(worldSize).fill(0);

  const call = (rank: number, op: Op, buf: Float32Array, root: number): Promise<void> =>
    new Promise<void>((resolve, reject) => {
      if (op === 'broadcast' && !(Number.isInteger(root) && root >= 0 && root < worldSize)) {
        reject(new RangeError(`broadcast root ${root} does not exist in a world of size ${worldSize}`));
        return;
      }
      const id = seq[rank]++;
      let p = pending.get(id);
      if (!p) {
        p = { op, root, length: buf.length, bufs: new Array(worldSize), arrived: 0, settle: new Array(worldSize) };
        pending.set(id, p);
      }
      p.bufs[rank] = buf;
      p.settle[rank] = { resolve, reject };
      p.arrived++;
      if (p.op !== op || p.root !== root || p.length !== buf.length) {
        p.bufs.fill(undefined);
        p.failed = new Error(
          `collective #${id}: rank ${rank} called ${op}(${buf.length} floats, root ${root}) but another rank called ${p.op}(${p.length} floats, root ${p.root})`,
        );
      }
      if (p.arrived < worldSize) return;
      pending.delete(id);
      if (p.failed) {
        for (const s of p.settle) s?.reject(p.failed);
        return;
      }
      const bufs = p.bufs as Float32Array[];
      if (op === 'broadcast') {
        for (let r = 0; r < worldSize; r++) if (r !== root) bufs[r].set(bufs[root]);
      } else {
        const acc = Float32Array.from(bufs[0]);
        for (let r = 1; r < worldSize; r++) {
          const b = bufs[r];
          for (let i = 0; i < acc.length; i++) acc[i] += b[i];
        }
        if (op === 'mean' && worldSize > 1) for (let i = 0; i < acc.length; i++) acc[i] /= worldSize;
        for (const b of bufs) b.set(acc);
      }
      for (const s of p.settle) s!.resolve();
    });

  return Array.from({ length: worldSize }, (_, rank) => ({
    rank,
    worldSize,
    allReduceMean: (buf: Float32Array) => call(rank, 'mean', buf, -1),
    allReduceSum: (buf: Float32Array) => call(rank, 'sum', buf, -1),
    broadcast: (buf: Float32Array, root: number) => call(rank, 'broadcast', buf, root),
    // Element-wise sums do not depend on the bucketing here: one mean once every bucket is ready.
    allReduceMeanStaged: (buf: Float32Array, buckets: BucketRanges) => {
      let left = buckets.length;
      const seen = new Uint8Array(buckets.length);
      let allReady!: () => void;
      const done = new Promise<void>((resolve) => (allReady = resolve)).then(() => call(rank, 'mean', buf, -1));
      if (left === 0) allReady();
      return {
        ready: (i: number) => {
          if (!(i >= 0 && i < buckets.length)) throw new RangeError(`ready(${i}): there are ${buckets.length} buckets`);
          if (seen[i]) return;
          seen[i] = 1;
          if (--left === 0) allReady();
        },
        done,
      };
    },
  }));
}

// ---- elastic groups (issue 7) ---------------------------------------------------------------

/** Where a rank stands at a step boundary: what the ranks compare when they regroup. */
export interface Progress {
  /** 0-based epoch in progress (equal to the number of finished epochs). */
  epoch: number;
  /** Positions of epoch `epoch`'s sample order consumed by applied steps (0 at an epoch start). */
  done: number;
  /** Optimiser steps applied, all epochs. */
  step: number;
}

/** What the next group looks like, as the coordinator's Welcome announced it. */
export interface RegroupResult {
  /** The new rank holding the most advanced committed state: every rank adopts it by broadcast. */
  root: number;
  /**
   * Fewer workers than --min-workers are left: adopt the root's state, let rank 0 write a
   * checkpoint of that position, and stop (the run continues later with --resume).
   */
  stop: boolean;
  /** Why the group changed (e.g. "rank 2 on host b was lost: killed by SIGKILL"), for logs. */
  reason: string;
}

/**
 * A collective whose membership can change between steps (`--elastic`). `rank` and `worldSize`
 * are those of the current group and change at every regroup. Its collectives reject with
 * GroupChangedError when a member is lost; the trainer then restores the state it committed at
 * the start of the step (nothing of the failed step was applied) and calls `regroup`.
 */
export interface ElasticCollective extends Collective {
  readonly elastic: true;
  /**
   * The rank whose state the others adopt when training starts: 0 at launch; for a worker that
   * joins a run in progress, the root named by the Welcome that admitted it.
   */
  readonly initialRoot: number;
  /**
   * True once the coordinator asked this group to regroup at the next step boundary (a worker
   * wants to join). The trainer sums it into the step's gradient all-reduce, so every rank learns
   * the same answer after the same step, applies that step, then calls `regroup`.
   */
  readonly regroupRequested: boolean;
  /**
   * Leaves the current group and waits for the next one. `committed` is this rank's position
   * after its last applied step; the coordinator picks the most advanced one as the root.
   */
  regroup(committed: Progress): Promise<RegroupResult>;
}

/**
 * A collective of an elastic group failed because the group changed (a member was lost, or the
 * coordinator aborted the step). Recoverable: roll back to the step's start and `regroup`.
 */
export class GroupChangedError extends Error {
  readonly code = 'E_GROUP_CHANGED' as const;
  override get name(): string {
    return 'GroupChangedError';
  }
}

/**
 * The coordinator answered a regroup with STOP: other ranks already completed the run's last
 * collective and sent their final reports, so the run is complete without this rank (its last
 * collective failed, e.g. a neighbour died in the final evaluation). Not a failure: stop cleanly.
 */
export class RunCompleteError extends Error {
  readonly code = 'E_RUN_COMPLETE' as const;
  override get name(): string {
    return 'RunCompleteError';
  }
}

export function isElastic(c: Collective): c is ElasticCollective {
  return (c as Partial<ElasticCollective>).elastic === true;
}
