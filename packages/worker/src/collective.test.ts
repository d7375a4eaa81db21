import { describe, expect, it } from 'vitest';
import { SingleProcess, createInProcessGroup } from './collective.js';

describe('SingleProcess', () => {
  it('is the identity for every collective, and has only root 0', async () => {
    const c = new SingleProcess();
    const a = Float32Array.from([1.5, -2, 3]);
    await c.allReduceMean(a);
    await c.allReduceSum(a);
    await c.broadcast(a, 0);
    expect(Array.from(a)).toEqual([1.5, -2, 3]);
    await expect(c.broadcast(a, 1)).rejects.toThrow(/root 1/);
  });
});

describe('createInProcessGroup', () => {
  it('sums in rank order, averages, broadcasts, and gives every rank the same bits', async () => {
    const [r0, r1, r2] = createInProcessGroup(3);
    const bufs = [Float32Array.from([1, 0.1, 1e8]), Float32Array.from([2, 0.2, 1]), Float32Array.from([3, 0.3, -1e8])];
    await Promise.all([r0.allReduceSum(bufs[0]), r1.allReduceSum(bufs[1]), r2.allReduceSum(bufs[2])]);
    const expected = Float32Array.from([6, Math.fround(Math.fround(Math.fround(0.1) + Math.fround(0.2)) + Math.fround(0.3)), 0]);
    for (const b of bufs) expect(Array.from(b)).toEqual(Array.from(expected));

    const m = [Float32Array.from([3, 6]), Float32Array.from([6, 0]), Float32Array.from([0, 3])];
    await Promise.all([r0.allReduceMean(m[0]), r1.allReduceMean(m[1]), r2.allReduceMean(m[2])]);
    for (const b of m) expect(Array.from(b)).toEqual([3, 3]);

    const w = [new Float32Array(2), Float32Array.from([7, 8]), new Float32Array(2)];
    await Promise.all([r0.broadcast(w[0], 1), r1.broadcast(w[1], 1), r2.broadcast(w[2], 1)]);
    for (const b of w) expect(Array.from(b)).toEqual([7, 8]);
  });

  it('fails every rank with a message when the ranks call different collectives', async () => {
    const [r0, r1] = createInProcessGroup(2);
    const results = await Promise.allSettled([r0.allReduceSum(new Float32Array(3)), r1.allReduceSum(new Float32Array(4))]);
    for (const r of results) {
      expect(r.status).toBe('rejected');
      expect(String((r as PromiseRejectedResult).reason)).toMatch(/rank 1 called sum\(4 floats/);
    }
  });
});
