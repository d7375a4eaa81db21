import { describe, expect, it } from 'vitest';
import { maxStepImages, stepBounds, stepsOfShare } from './steps.js';

/** Every step's size, from the two functions together. */
function sizes(share: number, b: number, min: number): number[] {
  const n = stepsOfShare(share, b, min);
  return Array.from({ length: n }, (_, j) => {
    const [from, to] = stepBounds(j, n, share, b);
    return to - from;
  });
}

describe('steps of a share', () => {
  it('cuts full batches and keeps a last batch that is big enough', () => {
    expect(sizes(16, 4, 3)).toEqual([4, 4, 4, 4]);
    expect(sizes(11, 4, 3)).toEqual([4, 4, 3]);
    expect(sizes(10, 4, 1)).toEqual([4, 4, 2]);
  });

  it('folds a last batch below the minimum into the step before it, keeping every image', () => {
    expect(sizes(10, 4, 3)).toEqual([4, 6]);
    expect(sizes(9, 4, 3)).toEqual([4, 5]);
    expect(sizes(65, 64, 3)).toEqual([65]);
  });

  it('never makes a step larger than maxStepImages, nor one below the minimum', () => {
    for (const b of [1, 2, 3, 4, 7, 64]) {
      for (const min of [1, 2, 3].filter((m) => m <= b)) {
        for (let share = min; share < 200; share++) {
          const s = sizes(share, b, min);
          expect(s.reduce((x, y) => x + y, 0)).toBe(share);
          for (const n of s) {
            expect(n).toBeLessThanOrEqual(maxStepImages(b, min));
            expect(n).toBeGreaterThanOrEqual(Math.min(min, share));
          }
        }
      }
    }
  });

  it('has no step for a share too small for one healthy batch', () => {
    expect(stepsOfShare(2, 4, 3)).toBe(0);
    expect(stepsOfShare(0, 4, 3)).toBe(0);
    expect(stepsOfShare(1, 4, 1)).toBe(1);
  });

  it('refuses a batch size below the minimum (the trainer checks it first, with a user-facing message)', () => {
    expect(() => stepsOfShare(10, 2, 3)).toThrow(/batch size 2 is below the minimum 3/);
  });
});
