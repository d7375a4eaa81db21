import { DatasetArgumentError } from './errors.js';
import { Rng } from './rng.js';

export interface DistributedSamplerOptions {
  /** Number of items in the data set. */
  size: number;
  worldSize?: number;
  rank?: number;
  shuffle?: boolean;
  seed?: number;
  /** Drop the tail so the shards are equal without padding (PyTorch's drop_last). Default false. */
  dropLast?: boolean;
}

function checkWorld(worldSize: number, rank: number): void {
  if (!Number.isInteger(worldSize) || worldSize < 1) throw new DatasetArgumentError(`world size must be a positive integer, got ${worldSize}`);
  if (!Number.isInteger(rank) || rank < 0 || rank >= worldSize) {
    throw new DatasetArgumentError(`rank must be an integer in 0..${worldSize - 1}, got ${rank}`);
  }
}

/**
 * PyTorch's DistributedSampler: each epoch, a permutation of 0..size-1 seeded by (seed, epoch) (our
 * own generator, so the order differs from torch's); rank r of w takes positions r, r+w, r+2w, ...
 *
 * Padding (PyTorch's default, dropLast = false): every rank gets ceil(size / w) indices; the
 * permutation is extended by repeating its start until its length is a multiple of w, so up to w-1
 * images are seen twice per epoch. With dropLast = true every rank gets floor(size / w) and the
 * permutation's tail is dropped. For evaluation use `evaluationShard`, which neither pads nor drops.
 */
export class DistributedSampler {
  readonly size: number;
  readonly worldSize: number;
  readonly rank: number;
  readonly shuffle: boolean;
  readonly seed: number;
  readonly dropLast: boolean;
  /** Indices each rank gets per epoch. */
  readonly numSamples: number;
  /** numSamples * worldSize. */
  readonly totalSize: number;
  private epoch = 0;

  constructor(o: DistributedSamplerOptions) {
    this.size = o.size;
    this.worldSize = o.worldSize ?? 1;
    this.rank = o.rank ?? 0;
    this.shuffle = o.shuffle ?? true;
    this.seed = o.seed ?? 0;
    this.dropLast = o.dropLast ?? false;
    if (!Number.isInteger(this.size) || this.size < 0) throw new DatasetArgumentError(`sampler size must be a non-negative integer, got ${this.size}`);
    checkWorld(this.worldSize, this.rank);
    this.numSamples = this.dropLast ? Math.floor(this.size / this.worldSize) : Math.ceil(this.size / this.worldSize);
    this.totalSize = this.numSamples * this.worldSize;
  }

  setEpoch(epoch: number): void {
    if (!Number.isInteger(epoch) || epoch < 0) throw new DatasetArgumentError(`epoch must be a non-negative integer, got ${epoch}`);
    this.epoch = epoch;
  }

  getEpoch(): number {
    return this.epoch;
  }

  /**
   * Epoch `epoch`'s order, unpadded (length `size`): a permutation of 0..size-1 seeded by (seed,
   * epoch), or 0..size-1 without shuffle. The same on every rank and for every world size, so the
   * rest of an epoch can be re-sharded over another world size with `shardFrom`.
   */
  permutation(epoch: number): Int32Array {
    if (!Number.isInteger(epoch) || epoch < 0) throw new DatasetArgumentError(`epoch must be a non-negative integer, got ${epoch}`);
    if (this.shuffle) return new Rng(this.seed, epoch).permutation(this.size);
    return Int32Array.from({ length: this.size }, (_, i) => i);
  }

  /** The current epoch's order before sharding (length totalSize, padded or cut). */
  epochOrder(): Int32Array {
    return this.epochOrderFor(this.epoch);
  }

  /** Epoch `epoch`'s order before sharding; the same on every rank. */
  epochOrderFor(epoch: number): Int32Array {
    const n = this.size;
    const order = this.permutation(epoch);
    if (this.totalSize <= n) return order.subarray(0, this.totalSize);
    const padded = new Int32Array(this.totalSize);
    // n is 0 only when totalSize is 0 too, so the modulo is safe here.
    for (let i = 0; i < this.totalSize; i++) padded[i] = order[i % n];
    return padded;
  }

  /** This rank's indices for the current epoch, length numSamples. */
  indices(): Int32Array {
    const order = this.epochOrder();
    const out = new Int32Array(this.numSamples);
    for (let k = 0, i = this.rank; k < this.numSamples; k++, i += this.worldSize) out[k] = order[i];
    return out;
  }

  [Symbol.iterator](): Iterator<number> {
    return this.indices()[Symbol.iterator]();
  }
}

/**
 * Rank `rank`'s indices for the rest of an epoch: positions `start`.. of the UNPADDED epoch order
 * `order` (`DistributedSampler.permutation`), padded by repeating the start of that rest until its
 * length is a multiple of `worldSize`; rank r takes positions r, r+w, r+2w, ... of the padded rest.
 * Every rank gets ceil((order.length - start) / w) indices. With start 0 this is exactly
 * `DistributedSampler.indices()` (dropLast false); with start > 0 it re-shards what an elastic
 * group had not consumed yet over a new world size (the padding repeats at most w-1 images).
 */
export function shardFrom(order: Int32Array, start: number, worldSize: number, rank: number): Int32Array {
  checkWorld(worldSize, rank);
  if (!Number.isInteger(start) || start < 0 || start > order.length) {
    throw new DatasetArgumentError(`start must be an integer in 0..${order.length}, got ${start}`);
  }
  const rest = order.length - start;
  const per = Math.ceil(rest / worldSize);
  const out = new Int32Array(per);
  // rest is 0 only when per is 0 too, so the modulo is safe here.
  for (let k = 0, i = rank; k < per; k++, i += worldSize) out[k] = order[start + (i % rest)];
  return out;
}

export interface Shard {
  /** First index (inclusive) and end (exclusive) of this rank's contiguous block. */
  start: number;
  end: number;
  count: number;
}

/**
 * Evaluation sharding: contiguous blocks that never pad or drop, so the ranks together see every
 * test image exactly once. The first (size mod w) ranks get one more image than the others.
 */
export function evaluationShard(size: number, worldSize: number, rank: number): Shard {
  if (!Number.isInteger(size) || size < 0) throw new DatasetArgumentError(`size must be a non-negative integer, got ${size}`);
  checkWorld(worldSize, rank);
  const base = Math.floor(size / worldSize);
  const rem = size % worldSize;
  const start = rank * base + Math.min(rank, rem);
  const count = base + (rank < rem ? 1 : 0);
  return { start, end: start + count, count };
}

/** Splits `indices` into consecutive batches (views, no copies); the last may be short unless dropLast. */
export function* batchesOf(indices: Int32Array, batchSize: number, dropLast = false): Generator<Int32Array> {
  if (!Number.isInteger(batchSize) || batchSize < 1) throw new DatasetArgumentError(`batch size must be a positive integer, got ${batchSize}`);
  for (let i = 0; i < indices.length; i += batchSize) {
    const b = indices.subarray(i, Math.min(i + batchSize, indices.length));
    if (dropLast && b.length < batchSize) return;
    yield b;
  }
}
