import { describe, expect, it } from 'vitest';
import { describeResNet, gradientBuckets } from '@dtrain/core';
import { createInProcessGroup, type BucketRanges, type Collective } from './collective.js';
import { GradientReducer } from './reducer.js';

const arch = describeResNet({ inChannels: 1, classes: 10, imageSize: 16 });

describe('GradientReducer', () => {
  it('all-reduces the sums in front of the gradient: the mean of every float, the sums times the world size', async () => {
    const group = createInProcessGroup(2);
    const reducers = group.map((c) => new GradientReducer(arch, c));
    expect(reducers[0].buffer.length).toBe(arch.paramCount + 4);
    expect(reducers[0].gradient.length).toBe(arch.paramCount);
    await Promise.all(
      reducers.map((r, rank) => {
        const pending = r.begin();
        expect(pending.readiness).toBeUndefined();
        r.gradient.fill(rank + 1);
        return pending.finish({ lossSum: 10 * (rank + 1), correct: 3 + rank, images: 8, regroup: rank === 1 });
      }),
    );
    for (const r of reducers) {
      expect(r.groupSums()).toEqual({ lossSum: 30, correct: 7, images: 16, regroup: true });
      expect(r.gradient[0]).toBe(1.5);
      expect(r.gradient[arch.paramCount - 1]).toBe(1.5);
    }
  });

  it('with buckets: the backward pass hands over all but the stem\'s, which finish() hands over with the sums', async () => {
    const handed: number[] = [];
    let ranges: BucketRanges = [];
    let sumsWhenLastReady: number[] = [];
    let buffer!: Float32Array;
    // Two ranks as the trainer sees them; the staged all-reduce records what it is handed.
    const collective: Collective = {
      ...createInProcessGroup(1)[0],
      worldSize: 2,
      allReduceMeanStaged: (buf, b) => {
        [buffer, ranges] = [buf, b];
        return {
          ready: (i) => {
            handed.push(i);
            if (i === b.length - 1) sumsWhenLastReady = Array.from(buf.subarray(0, 4));
          },
          done: Promise.resolve(),
        };
      },
    };
    const bytes = 1 << 20;
    const reducer = new GradientReducer(arch, collective, bytes);
    const buckets = gradientBuckets(arch, bytes);
    const pending = reducer.begin();
    expect(buffer).toBe(reducer.buffer);
    // Ranges of the buffer: each model bucket shifted past the sums; the last one also holds the sums.
    expect(ranges).toEqual(buckets.map((b, k) => [k === buckets.length - 1 ? 0 : 4 + b.from, 4 + b.to]));
    expect(pending.readiness!.buckets).toEqual(buckets);
    for (let k = 0; k < buckets.length; k++) pending.readiness!.onBucketReady(k);
    expect(handed).toEqual(buckets.slice(0, -1).map((_, k) => k));
    await pending.finish({ lossSum: 5, correct: 2, images: 4, regroup: false });
    expect(handed.at(-1)).toBe(buckets.length - 1);
    expect(sumsWhenLastReady).toEqual([5, 2, 4, 0]);
  });

  it('one rank, or a collective without a staged all-reduce: no buckets', () => {
    expect(new GradientReducer(arch, createInProcessGroup(1)[0], 1 << 20).begin().readiness).toBeUndefined();
    const { allReduceMeanStaged: _, ...plain } = createInProcessGroup(2)[0];
    expect(new GradientReducer(arch, plain, 1 << 20).begin().readiness).toBeUndefined();
  });
});
