import { describe, expect, it } from 'vitest';
import { DatasetArgumentError } from './errors.js';
import { batchesOf, DistributedSampler, evaluationShard } from './sampler.js';

const WORLDS = [1, 2, 3, 4, 7, 8];
const SIZES = [0, 1, 5, 64, 100, 1001];

function shards(size: number, worldSize: number, epoch: number, o: { seed?: number; dropLast?: boolean; shuffle?: boolean } = {}) {
  return Array.from({ length: worldSize }, (_, rank) => {
    const s = new DistributedSampler({ size, worldSize, rank, ...o });
    s.setEpoch(epoch);
    return [...s.indices()];
  });
}

describe('DistributedSampler', () => {
  it('gives equal shards that cover the epoch, padding by repeating the start of the permutation', () => {
    for (const size of SIZES)
      for (const w of WORLDS) {
        const parts = shards(size, w, 3, { seed: 11 });
        const numSamples = Math.ceil(size / w);
        for (const p of parts) expect(p.length).toBe(numSamples);
        const all = parts.flat();
        // Complete: every index appears.
        expect(new Set(all).size).toBe(size);
        // Disjoint up to padding: exactly totalSize - size repeats, and they are the order's first items.
        const order = [...new DistributedSampler({ size, worldSize: w, seed: 11 }).epochOrderFor(3)];
        expect(order.length).toBe(numSamples * w);
        for (let i = size; i < order.length; i++) expect(order[i]).toBe(order[i % size]);
        // Rank r holds positions r, r + w, ...
        parts.forEach((p, r) => p.forEach((v, k) => expect(v).toBe(order[r + k * w])));
      }
  });

  it('is disjoint with no repeats when the size divides evenly, or with dropLast', () => {
    for (const w of WORLDS) {
      const even = shards(w * 13, w, 0).flat();
      expect(new Set(even).size).toBe(even.length);
      const dropped = shards(1001, w, 2, { dropLast: true });
      for (const p of dropped) expect(p.length).toBe(Math.floor(1001 / w));
      const flat = dropped.flat();
      expect(new Set(flat).size).toBe(flat.length);
      expect(flat.every((i) => i >= 0 && i < 1001)).toBe(true);
    }
  });

  it('reshuffles every epoch, deterministically from (seed, epoch)', () => {
    for (const w of [1, 3, 4]) {
      const e0 = shards(500, w, 0, { seed: 5 });
      const e0again = shards(500, w, 0, { seed: 5 });
      const e1 = shards(500, w, 1, { seed: 5 });
      const otherSeed = shards(500, w, 0, { seed: 6 });
      expect(e0again).toEqual(e0);
      expect(e1).not.toEqual(e0);
      expect(otherSeed).not.toEqual(e0);
      // With several ranks, a rank's shard changes contents, not just order, between epochs.
      if (w > 1) expect([...e1[0]].sort((a, b) => a - b)).not.toEqual([...e0[0]].sort((a, b) => a - b));
    }
  });

  it('keeps order 0..n-1 when shuffle is off, like PyTorch', () => {
    expect(shards(10, 3, 4, { shuffle: false })).toEqual([
      [0, 3, 6, 9],
      [1, 4, 7, 0],
      [2, 5, 8, 1],
    ]);
  });

  it('rejects bad world sizes, ranks and epochs', () => {
    expect(() => new DistributedSampler({ size: 10, worldSize: 0 })).toThrow(DatasetArgumentError);
    expect(() => new DistributedSampler({ size: 10, worldSize: 2, rank: 2 })).toThrow(/rank must be an integer in 0..1, got 2/);
    expect(() => new DistributedSampler({ size: 10 }).setEpoch(-1)).toThrow(/epoch/);
  });
});

describe('evaluationShard', () => {
  it('counts every index exactly once for any world size, without padding', () => {
    for (const size of [...SIZES, 10_000])
      for (const w of [...WORLDS, 3, 16]) {
        const seen = new Array(size).fill(0);
        let prevEnd = 0;
        for (let r = 0; r < w; r++) {
          const s = evaluationShard(size, w, r);
          expect(s.start).toBe(prevEnd);
          expect(s.count).toBe(s.end - s.start);
          expect(s.count === Math.floor(size / w) || s.count === Math.ceil(size / w)).toBe(true);
          for (let i = s.start; i < s.end; i++) seen[i]++;
          prevEnd = s.end;
        }
        expect(prevEnd).toBe(size);
        expect(seen.every((c) => c === 1)).toBe(true);
      }
  });
});

describe('batchesOf', () => {
  it('splits into consecutive batches, keeping or dropping the short last one', () => {
    const idx = Int32Array.from({ length: 10 }, (_, i) => i);
    expect([...batchesOf(idx, 4)].map((b) => [...b])).toEqual([[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]);
    expect([...batchesOf(idx, 4, true)].map((b) => b.length)).toEqual([4, 4]);
    expect(() => [...batchesOf(idx, 0)]).toThrow(/batch size/);
  });
});
