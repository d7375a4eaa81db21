import { describe, expect, it } from 'vitest';
import { Rng } from './rng.js';

describe('Rng (xoshiro128**)', () => {
  it('matches the reference outputs for state [1, 2, 3, 4]', () => {
    const r = Rng.fromState([1, 2, 3, 4]);
    expect([r.nextUint32(), r.nextUint32(), r.nextUint32()]).toEqual([11520, 0, 5927040]);
  });

  it('is deterministic per seed tuple and differs across seeds', () => {
    const a = Array.from({ length: 5 }, ((r) => () => r.nextUint32())(new Rng(42, 3)));
    const b = Array.from({ length: 5 }, ((r) => () => r.nextUint32())(new Rng(42, 3)));
    const c = Array.from({ length: 5 }, ((r) => () => r.nextUint32())(new Rng(42, 4)));
    const d = Array.from({ length: 5 }, ((r) => () => r.nextUint32())(new Rng(43, 3)));
    expect(a).toEqual(b);
    expect(a).not.toEqual(c);
    expect(a).not.toEqual(d);
    expect(new Rng(2 ** 40).nextUint32()).not.toBe(new Rng(0).nextUint32());
  });

  it('saves and restores its state exactly', () => {
    const r = new Rng(7);
    for (let i = 0; i < 100; i++) r.next();
    const saved = r.state();
    const expected = Array.from({ length: 10 }, () => r.nextUint32());
    const restored = Rng.fromState(JSON.parse(JSON.stringify(saved)));
    expect(Array.from({ length: 10 }, () => restored.nextUint32())).toEqual(expected);
    expect(() => Rng.fromState([0, 0, 0, 0])).toThrow(/all zero/);
    expect(() => Rng.fromState([1, 2, 3] as never)).toThrow(/four uint32/);
  });

  it('int(n) stays in range and is roughly uniform; next() is in [0, 1)', () => {
    const r = new Rng(1);
    const counts = new Array(7).fill(0);
    for (let i = 0; i < 70_000; i++) counts[r.int(7)]++;
    for (const c of counts) expect(Math.abs(c - 10_000)).toBeLessThan(500);
    for (let i = 0; i < 10_000; i++) {
      const x = r.next();
      expect(x >= 0 && x < 1).toBe(true);
    }
    expect(() => r.int(0)).toThrow(RangeError);
  });

  it('permutation() is a permutation', () => {
    const p = new Rng(5).permutation(1000);
    expect([...p].sort((a, b) => a - b)).toEqual(Array.from({ length: 1000 }, (_, i) => i));
    expect([...p]).not.toEqual(Array.from({ length: 1000 }, (_, i) => i));
  });
});
