import { describe, expect, it } from 'vitest';
import { makeSyntheticTestDataset } from './synthetic.js';

describe('makeSyntheticTestDataset (test data, not real)', () => {
  it('is deterministic per seed, balanced, and says it is not real data', () => {
    const a = makeSyntheticTestDataset({ count: 50, height: 6, width: 5, channels: 3, seed: 1 });
    const b = makeSyntheticTestDataset({ count: 50, height: 6, width: 5, channels: 3, seed: 1 });
    const c = makeSyntheticTestDataset({ count: 50, height: 6, width: 5, channels: 3, seed: 2 });
    expect(a.images).toEqual(b.images);
    expect(a.labels).toEqual(b.labels);
    expect(c.images).not.toEqual(a.images);
    expect(a.images.length).toBe(50 * 6 * 5 * 3);
    expect(a.name).toContain('NOT REAL DATA');
    for (let k = 0; k < 10; k++) expect(a.labels.filter((l) => l === k).length).toBe(5);
  });

  it('is learnable: a nearest-class-mean classifier fitted on one seed scores high on another', () => {
    for (const [h, w, ch] of [[8, 8, 3], [12, 10, 1]]) {
      const train = makeSyntheticTestDataset({ count: 400, height: h, width: w, channels: ch, seed: 3 });
      const test = makeSyntheticTestDataset({ count: 200, height: h, width: w, channels: ch, seed: 4 });
      const size = h * w * ch;
      const means = Array.from({ length: 10 }, () => new Float64Array(size));
      const counts = new Array(10).fill(0);
      for (let i = 0; i < train.count; i++) {
        const l = train.labels[i];
        counts[l]++;
        for (let p = 0; p < size; p++) means[l][p] += train.images[i * size + p];
      }
      means.forEach((m, l) => m.forEach((v, p) => (m[p] = v / counts[l])));
      let correct = 0;
      for (let i = 0; i < test.count; i++) {
        let best = -1;
        let bestD = Infinity;
        for (let l = 0; l < 10; l++) {
          let d = 0;
          for (let p = 0; p < size; p++) d += (test.images[i * size + p] - means[l][p]) ** 2;
          if (d < bestD) (bestD = d), (best = l);
        }
        if (best === test.labels[i]) correct++;
      }
      expect(correct / test.count).toBeGreaterThan(0.9);
    }
  });
});
