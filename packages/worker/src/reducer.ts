// The gradient reducer (PyTorch DDP's Reducer): the buffer a step's gradient is computed into and
// all-reduced in place, its layout (the step's sums in front of the gradient), the buckets that
// start their all-reduce during the backward pass, and the reduction itself.
import { gradientBuckets, type Architecture, type GradientBucket, type GradientReadiness } from '@dtrain/core';
import type { Collective } from './collective.js';

/** Floats in front of the gradient: loss x images, correct, images, regroup flag. */
const STEP_SUMS = 4;

/** What a step adds up over the ranks besides its gradient. */
export interface StepSums {
  /** Loss x images of the step. */
  lossSum: number;
  correct: number;
  images: number;
  /** This rank asks the group to regroup after the step (an elastic join waits). */
  regroup: boolean;
}

/** One step's all-reduce, begun before the backward pass. */
export interface PendingReduce {
  /** For computeGradients: hands each bucket over as its gradients are final; undefined without buckets. */
  readiness?: GradientReadiness;
  /** Writes this rank's sums in front and completes the all-reduce of the whole buffer. */
  finish(sums: StepSums): Promise<void>;
}

export class GradientReducer {
  /**
   * STEP_SUMS floats, then the gradient, on a SharedArrayBuffer: a ring in its own thread reduces
   * it where it lies. The sums come first so that they ride in the bucket the backward pass
   * completes last (the stem's), after they are known.
   */
  readonly buffer: Float32Array;
  /** The gradient part of `buffer`: what the model writes and the optimiser reads. */
  readonly gradient: Float32Array;
  /** Buckets of the model's gradient and the same as ranges of `buffer`; empty: no overlap. */
  private readonly buckets: GradientBucket[];
  private readonly ranges: [number, number][];

  /**
   * `bucketBytes` > 0 overlaps the all-reduce with the backward pass, where the collective can
   * (more than one rank, a staged all-reduce).
   */
  constructor(
    arch: Architecture,
    private readonly collective: Collective,
    bucketBytes = 0,
  ) {
    this.buffer = new Float32Array(new SharedArrayBuffer((arch.paramCount + STEP_SUMS) * 4));
    this.gradient = this.buffer.subarray(STEP_SUMS);
    const overlap = bucketBytes > 0 && collective.worldSize > 1 && collective.allReduceMeanStaged !== undefined;
    this.buckets = overlap ? gradientBuckets(arch, bucketBytes) : [];
    // The last bucket (the stem's) also carries the sums in front.
    this.ranges = this.buckets.map((b, k) => [k === this.buckets.length - 1 ? 0 : STEP_SUMS + b.from, STEP_SUMS + b.to]);
  }

  /** Starts a step's all-reduce: call before computing the gradient into `gradient`. */
  begin(): PendingReduce {
    if (this.ranges.length === 0) return { finish: (sums) => this.reduce(sums) };
    const staged = this.collective.allReduceMeanStaged!(this.buffer, this.ranges);
    staged.done.catch(() => undefined);
    const last = this.ranges.length - 1;
    return {
      readiness: { buckets: this.buckets, onBucketReady: (k: number) => k !== last && staged.ready(k) },
      finish: async (sums) => {
        this.writeSums(sums);
        staged.ready(last);
        await staged.done;
      },
    };
  }

  /** Writes the sums and all-reduces the whole buffer at once (a gradient already complete). */
  async reduce(sums: StepSums): Promise<void> {
    this.writeSums(sums);
    await this.collective.allReduceMean(this.buffer);
  }

  /** Writes the sums without reducing (one process alone: they are already the group's). */
  writeSums(s: StepSums): void {
    [this.buffer[0], this.buffer[1], this.buffer[2], this.buffer[3]] = [s.lossSum, s.correct, s.images, s.regroup ? 1 : 0];
  }

  /** The sums over every rank after the reduction (which averaged them: times the world size). */
  groupSums(): StepSums {
    const w = this.collective.worldSize;
    const b = this.buffer;
    return { lossSum: b[0] * w, correct: Math.round(b[1] * w), images: Math.round(b[2] * w), regroup: Math.round(b[3] * w) > 0 };
  }
}
