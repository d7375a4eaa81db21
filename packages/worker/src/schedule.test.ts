import { describe, expect, it } from 'vitest';
import { lrAt, peakLr, type LrScheduleSettings } from './schedule.js';

/** The defaults of the schedule fields (constant, as before schedules existed). */
const C = { lrSchedule: 'constant', lrFinal: 0, lrMilestones: [], lrGamma: 0.1, epochs: 10 } as const satisfies Partial<LrScheduleSettings>;

describe('learning-rate schedule (linear scaling with warmup, Goyal et al. 2017)', () => {
  it('is the given lr without scaling, whatever the world size', () => {
    const s = { ...C, lr: 0.01, lrScaling: 'none' as const, warmupEpochs: 0 };
    expect(peakLr(s, 8)).toBe(0.01);
    for (const [e, k] of [[0, 0], [3, 7]]) expect(lrAt(s, 8, e, k, 10)).toBe(0.01);
  });

  it('scales linearly with the world size; world size 1 is the single-worker lr', () => {
    const s = { ...C, lr: 0.1, lrScaling: 'linear' as const, warmupEpochs: 0 };
    expect(peakLr(s, 4)).toBeCloseTo(0.4, 15);
    expect(lrAt(s, 4, 0, 0, 10)).toBeCloseTo(0.4, 15);
    expect(lrAt(s, 1, 0, 0, 10)).toBe(0.1);
  });

  it('warms up per step from lr to lr x worldSize over K epochs, then stays there (hand-computed)', () => {
    // lr 0.1, 4 workers: 0.1 -> 0.4 over 2 epochs of 4 steps, i.e. +0.0375 per step.
    const s = { ...C, lr: 0.1, lrScaling: 'linear' as const, warmupEpochs: 2 };
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

describe('learning-rate schedules (PyTorch shapes; the position in epochs, hand-computed values)', () => {
  const at = (s: LrScheduleSettings, e: number, k: number, steps = 4, w = 1) => lrAt(s, w, e, k, steps);

  it('cosine: from the peak to lrFinal over the run, the middle half-way, after a warmup from 0 without scaling', () => {
    const s = { ...C, lr: 0.1, lrScaling: 'none' as const, warmupEpochs: 0, lrSchedule: 'cosine' as const, lrFinal: 0.001, epochs: 4 };
    expect(at(s, 0, 0)).toBe(0.1);
    expect(at(s, 2, 0)).toBeCloseTo((0.1 + 0.001) / 2, 15);
    // t = 1: 0.001 + 0.099 (1 + cos(pi/4)) / 2
    expect(at(s, 1, 0)).toBeCloseTo(0.001 + (0.099 * (1 + Math.SQRT1_2)) / 2, 15);
    // The last step, t = 3.75: 0.001 + 0.099 (1 + cos(15 pi / 16)) / 2
    expect(at(s, 3, 3)).toBeCloseTo(0.001 + (0.099 * (1 + Math.cos((15 * Math.PI) / 16))) / 2, 15);
    const w = { ...s, warmupEpochs: 1 };
    [0, 0.025, 0.05, 0.075].forEach((v, k) => expect(at(w, 0, k), `warmup step ${k}`).toBeCloseTo(v, 15));
    // Warmup joins the cosine at its peak, which then runs over the 3 epochs left.
    expect(at(w, 1, 0)).toBe(0.1);
    expect(at(w, 2, 2)).toBeCloseTo(0.001 + 0.099 / 2, 15);
  });

  it('step: the peak times gamma for each milestone reached, per epoch; with linear scaling and warmup', () => {
    const s = { ...C, lr: 0.1, lrScaling: 'none' as const, warmupEpochs: 0, lrSchedule: 'step' as const, lrMilestones: [2, 5], lrGamma: 0.5 };
    expect([0, 1, 2, 4, 5, 9].map((e) => at(s, e, 3))).toEqual([0.1, 0.1, 0.05, 0.05, 0.025, 0.025]);
    const g = { ...s, lrScaling: 'linear' as const, warmupEpochs: 1 };
    expect(lrAt(g, 2, 0, 2, 4)).toBeCloseTo(0.15, 15); // warmup 0.1 -> 0.2, half-way
    expect(lrAt(g, 2, 1, 0, 4)).toBeCloseTo(0.2, 15);
    expect(lrAt(g, 2, 2, 0, 4)).toBeCloseTo(0.1, 15);
  });

  it('onecycle: peak/25 at the start, the peak at 30% of the run, peak/250000 at its end (OneCycleLR defaults)', () => {
    const s = { ...C, lr: 0.5, lrScaling: 'none' as const, warmupEpochs: 0, lrSchedule: 'onecycle' as const, epochs: 10 };
    expect(at(s, 0, 0)).toBeCloseTo(0.02, 15);
    expect(at(s, 3, 0)).toBeCloseTo(0.5, 15);
    // Half-way up (t = 1.5): 0.02 + 0.48 / 2; half-way down (t = 6.5): 2e-6 + (0.5 - 2e-6) / 2.
    expect(at(s, 1, 2)).toBeCloseTo(0.26, 15);
    expect(at(s, 6, 2)).toBeCloseTo(2e-6 + (0.5 - 2e-6) / 2, 15);
    expect(at(s, 10, 0)).toBeCloseTo(2e-6, 15);
  });
});
