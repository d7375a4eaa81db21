import { describe, expect, it } from 'vitest';
import { lrAt, peakLr } from './schedule.js';

describe('learning-rate schedule (linear scaling with warmup, Goyal et al. 2017)', () => {
  it('is the given lr without scaling, whatever the world size', () => {
    const s = { lr: 0.01, lrScaling: 'none' as const, warmupEpochs: 0 };
    expect(peakLr(s, 8)).toBe(0.01);
    for (const [e, k] of [[0, 0], [3, 7]]) expect(lrAt(s, 8, e, k, 10)).toBe(0.01);
  });

  it('scales linearly with the world size; world size 1 is the single-worker lr', () => {
    const s = { lr: 0.1, lrScaling: 'linear' as const, warmupEpochs: 0 };
    expect(peakLr(s, 4)).toBeCloseTo(0.4, 15);
    expect(lrAt(s, 4, 0, 0, 10)).toBeCloseTo(0.4, 15);
    expect(lrAt(s, 1, 0, 0, 10)).toBe(0.1);
  });

  it('warms up per step from lr to lr x worldSize over K epochs, then stays there (hand-computed)', () => {
    // lr 0.1, 4 workers: 0.1 -> 0.4 over 2 epochs of 4 steps, i.e. +0.0375 per step.
    const s = { lr: 0.1, lrScaling: 'linear' as const, warmupEpochs: 2 };
    const got = [0, 1].flatMap((e) => [0, 1, 2, 3].map((k) => lrAt(s, 4, e, k, 4)));
    const want = [0.1, 0.1375, 0.175, 0.2125, 0.25, 0.2875, 0.325, 0.3625];
    got.forEach((v, i) => expect(v, `step ${i}`).toBeCloseTo(want[i], 12));
    expect(lrAt(s, 4, 2, 0, 4)).toBeCloseTo(0.4, 15);
    expect(lrAt(s, 4, 7, 3, 4)).toBeCloseTo(0.4, 15);
    // Progress is in epochs: the same point of training with other steps per epoch has the same lr.
    expect(lrAt(s, 4, 1, 2, 8)).toBeCloseTo(lrAt(s, 4, 1, 1, 4), 15);
    // A fractional warmup: 0.5 epochs of 4 steps = 2 steps of ramp.
    const h = { ...s, warmupEpochs: 0.5 };
    [0.1, 0.15, 0.2, 0.2].forEach((v, k) => expect(lrAt(h, 2, 0, k, 4)).toBeCloseTo(v, 15));
  });
});
