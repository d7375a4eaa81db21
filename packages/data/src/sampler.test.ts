import { describe, expect, it } from 'vitest';
import { DatasetArgumentError } from './errors.js';
import { batchesOf, DistributedSampler, evaluationShard, shardFrom } from './sampler.js';

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

describe('shardFrom (re-sharding the rest of an epoch)', () => {
  it('from position 0 equals DistributedSampler.indices() exactly, for every size and world size', () => {
    for (const size of SIZES)
      for (const w of WORLDS)
        for (const shuffle of [true, false]) {
          const order = new DistributedSampler({ size, seed: 9, shuffle }).permutation(2);
          expect(order.length).toBe(size);
          for (let r = 0; r < w; r++) {
            const s = new DistributedSampler({ size, worldSize: w, rank: r, seed: 9, shuffle });
            s.setEpoch(2);
            expect([...shardFrom(order, 0, w, r)]).toEqual([...s.indices()]);
          }
        }
  });

  it('covers positions start.. once each, padded by repeating the start of the rest', () => {
    for (const size of SIZES)
      for (const w of WORLDS)
        for (const start of new Set([0, 1, Math.floor(size / 3), size - 1, size].filter((x) => x >= 0 && x <= size))) {
          const order = new DistributedSampler({ size, seed: 4 }).permutation(1);
          const parts = Array.from({ length: w }, (_, r) => [...shardFrom(order, start, w, r)]);
          const rest = size - start;
          const per = Math.ceil(rest / w);
          for (const p of parts) expect(p.length).toBe(per);
          // Interleaved back in position order: the rest, then its first (per * w - rest) items again.
          const merged: number[] = [];
          for (let k = 0; k < per; k++) for (let r = 0; r < w; r++) merged.push(parts[r][k]);
          const want = [...order.subarray(start)];
          for (let i = 0; merged.length > want.length; i++) want.push(order[start + (i % rest)]);
          expect(merged).toEqual(want);
        }
  });

  it('splits an epoch between two world sizes without dropping or doubling a sample (but padding)', () => {
    // 3 ranks x batch 4 take 2 steps (24 positions), then 2 ranks take the rest of 100.
    const order = new DistributedSampler({ size: 100, seed: 1 }).permutation(0);
    const before = [0, 1, 2].flatMap((r) => [...shardFrom(order, 0, 3, r).subarray(0, 8)]);
    const after = [0, 1].flatMap((r) => [...shardFrom(order, 24, 2, r)]);
    const counts = new Map<number, number>();
    for (const i of [...before, ...after]) counts.set(i, (counts.get(i) ?? 0) + 1);
    expect(counts.size).toBe(100);
    expect([...counts.values()].every((c) => c === 1)).toBe(true); // 76 left divides by 2: no padding
  });

  it('rejects a start outside the order', () => {
    const order = new DistributedSampler({ size: 10 }).permutation(0);
    expect(() => shardFrom(order, 11, 2, 0)).toThrow(/start must be an integer in 0..10/);
    expect(() => shardFrom(order, 0, 2, 2)).toThrow(/rank/);
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
