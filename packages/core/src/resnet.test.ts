import { beforeAll, describe, expect, it } from 'vitest';
import * as tf from '@tensorflow/tfjs-core';
import { loadBackend } from '@dtrain/backend';
import { describeResNet, minTrainingBatch } from './architecture.js';
import { gradientBuckets, ResNet, type Batch } from './resnet.js';
import { TUTORIAL_CONFIG } from './architecture.js';
import { firstDifference, forwardTolerance, labelSmoothingEffect, randomBatch } from './testing/model-checks.js';

beforeAll(async () => {
  await loadBackend('cpu');
});

describe('architecture', () => {
  it('counts the trainable parameters PyTorch counts for the tutorial network', async () => {
    // Written out as PyTorch's numel() sums them: conv weights + biases, BN weight + bias, Linear.
    const conv = (cin: number, cout: number, k: number, bias: boolean) => cin * cout * k * k + (bias ? cout : 0);
    const bn = (c: number) => 2 * c;
    const block = (cin: number, cout: number, sc: boolean) =>
      conv(cin, cout, 3, false) + bn(cout) + conv(cout, cout, 3, false) + bn(cout) + (sc ? conv(cin, cout, 1, true) : 0);
    const expected = (cin: number) =>
      conv(cin, 64, 7, true) + bn(64) +
      block(64, 64, false) * 2 +
      block(64, 128, true) + block(128, 128, false) +
      block(128, 256, true) + block(256, 256, false) +
      block(256, 512, true) + block(512, 512, false) +
      512 * 10 + 10;
    expect(describeResNet({ inChannels: 3, classes: 10, imageSize: 96 }).paramCount).toBe(expected(3));
    expect(expected(3)).toBe(11_180_810);
    expect(describeResNet({ inChannels: 1, classes: 10, imageSize: 28 }).paramCount).toBe(expected(1));
    // BN running statistics: mean and variance for each of the 17 BatchNorms.
    expect(describeResNet({ inChannels: 3, classes: 10, imageSize: 96 }).bnStatCount).toBe(2 * (64 + 4 * 64 + 4 * 128 + 4 * 256 + 4 * 512));
  });

  it('has the tutorial’s output shapes at 96x96 (final map 3x3)', async () => {
    const a = describeResNet({ inChannels: 3, classes: 10, imageSize: 96 });
    const shape = (name: string) => a.layers.find((l) => l.name === name)!.outputShape;
    expect(shape('stem.conv')).toEqual([45, 45, 64]);
    expect(shape('stem.pool')).toEqual([23, 23, 64]);
    expect(shape('stage2.block1.conv1')).toEqual([12, 12, 128]);
    expect(shape('stage3.block1.conv1')).toEqual([6, 6, 256]);
    expect(shape('stage4.block2.conv2')).toEqual([3, 3, 512]);
    expect(shape('head.fc')).toEqual([10]);
    // Offsets tile the flat vector exactly.
    let off = 0;
    for (const p of a.params) {
      expect(p.offset).toBe(off);
      off += p.size;
    }
    expect(off).toBe(a.paramCount);
  });

  it('names the smallest per-rank batch whose BatchNorms see 3 values per channel: 3 where the last maps are 1x1, 1 at 96x96 (3x3)', async () => {
    expect(minTrainingBatch(describeResNet({ inChannels: 3, classes: 10, imageSize: 96 }))).toBe(1);
    expect(minTrainingBatch(describeResNet({ inChannels: 3, classes: 10, imageSize: 32 }))).toBe(3);
    expect(minTrainingBatch(describeResNet({ inChannels: 1, classes: 10, imageSize: 28 }))).toBe(3);
    expect(minTrainingBatch(describeResNet({ inChannels: 1, classes: 10, imageSize: 8 }))).toBe(3);
    // 40x40: stem 17, pool 9, stages 9 / 5 / 3 / 2: the last maps are 2x2, so 1 image gives 4 values.
    expect(minTrainingBatch(describeResNet({ inChannels: 3, classes: 10, imageSize: 40 }))).toBe(1);
  });

  it('rejects impossible configurations with a clear message', async () => {
    expect(() => describeResNet({ inChannels: 3, classes: 10, imageSize: 5 })).toThrow(/imageSize/);
    expect(() => describeResNet({ inChannels: 0, classes: 10, imageSize: 32 })).toThrow(/inChannels/);
  });
});

describe('ResNet', () => {
  it('initialises like the tutorial: Xavier-uniform weights, zero biases, BN gamma 1 / beta 0, seeded', async () => {
    const m = new ResNet({ inChannels: 3, classes: 10, imageSize: 32 }, { seed: 7 });
    const w = await m.getWeights();
    for (const p of m.arch.params) {
      const v = w.subarray(p.offset, p.offset + p.size);
      if (p.init === 'zeros') expect(v.every((x) => x === 0)).toBe(true);
      if (p.init === 'ones') expect(v.every((x) => x === 1)).toBe(true);
      if (p.init === 'xavier-uniform') {
        const limit = Math.sqrt(6 / (p.fanIn! + p.fanOut!));
        let max = 0;
        for (const x of v) max = Math.max(max, Math.abs(x));
        expect(max).toBeLessThanOrEqual(limit);
        expect(max).toBeGreaterThan(0.9 * limit); // really spread over the range
      }
    }
    const again = new ResNet({ inChannels: 3, classes: 10, imageSize: 32 }, { seed: 7 });
    expect(firstDifference(await again.getWeights(), w)).toBe(-1);
    const other = new ResNet({ inChannels: 3, classes: 10, imageSize: 32 }, { seed: 8 });
    expect(firstDifference(await other.getWeights(), w)).not.toBe(-1);
    [m, again, other].forEach((x) => x.dispose());
  });

  it('computes the same flat gradients as TensorFlow.js’s own ops and built-in gradients', async () => {
    const cfg = { inChannels: 3, classes: 10, imageSize: 32 };
    const fast = new ResNet(cfg, { seed: 3 });
    const ref = new ResNet(cfg, { seed: 3, referenceOps: true });
    const batch = randomBatch(4, 32, 3, 10);
    const a = await fast.computeGradients(batch);
    const b = await ref.computeGradients(batch);
    const tol = forwardTolerance(fast.arch, batch.n);
    expect(tol).toBeGreaterThan(1e-5); // the derivation, sanity-checked: ~8e-5 here
    expect(tol).toBeLessThan(2e-4);
    expect(Math.abs(a.loss - b.loss)).toBeLessThanOrEqual(tol * Math.abs(b.loss));
    let maxDiff = 0;
    let maxRef = 0;
    for (let i = 0; i < a.grads.length; i++) {
      maxDiff = Math.max(maxDiff, Math.abs(a.grads[i] - b.grads[i]));
      maxRef = Math.max(maxRef, Math.abs(b.grads[i]));
    }
    expect(maxRef).toBeGreaterThan(0);
    expect(maxDiff / maxRef).toBeLessThan(2 * tol);
    fast.dispose();
    ref.dispose();
  });

  it('keeps the number of live tensors constant over 20 training steps', async () => {
    const m = new ResNet({ inChannels: 1, classes: 10, imageSize: 16 }, { sgd: { lr: 0.01, momentum: 0.9, weightDecay: 5e-4 } });
    const batch = randomBatch(4, 16, 1, 10);
    const grads = new Float32Array(m.paramCount);
    await m.computeGradients(batch, grads);
    m.applyGradients(grads);
    await m.evaluate(batch);
    const before = tf.memory().numTensors;
    for (let i = 0; i < 20; i++) {
      await m.computeGradients(batch, grads);
      m.applyGradients(grads);
      await m.evaluate(batch);
      await m.getWeights();
      await m.getBatchNormStats();
    }
    expect(tf.memory().numTensors).toBe(before);
    m.dispose();
  });

  it('learns: the loss on a fixed batch falls when trained on it', async () => {
    const m = new ResNet({ inChannels: 1, classes: 4, imageSize: 16 }, { seed: 1, sgd: { lr: 0.05 } });
    const batch = randomBatch(16, 16, 1, 4, 5);
    const first = (await m.computeGradients(batch)).loss;
    let last = first;
    for (let i = 0; i < 15; i++) {
      const r = await m.computeGradients(batch);
      m.applyGradients(r.grads);
      last = r.loss;
    }
    expect(last).toBeLessThan(first * 0.5);
    m.dispose();
  });

  it('label smoothing e moves the output bias gradient by e x (class share - 1/classes), as CrossEntropyLoss(label_smoothing=e)', async () => {
    const config = { inChannels: 1, classes: 10, imageSize: 16 };
    const effect = await labelSmoothingEffect((ls) => new ResNet(config, { seed: 8, labelSmoothing: ls }), 0.1, randomBatch(8, 16, 1, 10, 3));
    // float32 softmax entries of size ~0.1 on each side: a few units of 2^-24.
    expect(effect.worstBiasShiftError).toBeLessThan(5e-7);
    expect(effect.smoothedLossDiffers).toBe(true);
    expect(effect.evaluationLossEqual).toBe(true);
    expect(() => new ResNet(config, { labelSmoothing: -0.1 })).toThrow(/label smoothing must be in \[0, 1\), got -0.1/);
  });

  it('updates BatchNorm running statistics as PyTorch does (momentum 0.1, unbiased variance)', async () => {
    const m = new ResNet({ inChannels: 1, classes: 10, imageSize: 16 });
    const batch = randomBatch(4, 16, 1, 10);
    const before = await m.getBatchNormStats();
    await m.computeGradients(batch);
    const after = await m.getBatchNormStats();
    // Stem conv output with zero bias: compute its per-channel batch mean/variance directly.
    const stemWeight = (await m.getWeights()).subarray(0, 7 * 7 * 64);
    const stats = tf.tidy(() => {
      const x = tf.tensor4d(batch.images, [4, 16, 16, 1]);
      const w = tf.tensor(stemWeight, [7, 7, 1, 64]) as tf.Tensor4D;
      const y = tf.conv2d(x, w, 2, 'valid');
      const { mean, variance } = tf.moments(y, [0, 1, 2]);
      const n = y.size / 64;
      return { mean: mean.dataSync(), variance: Float32Array.from(variance.dataSync(), (v) => (v * n) / (n - 1)) };
    });
    for (let c = 0; c < 64; c += 9) {
      expect(after[c]).toBeCloseTo(0.9 * before[c] + 0.1 * stats.mean[c], 5);
      expect(after[64 + c]).toBeCloseTo(0.9 * before[64 + c] + 0.1 * stats.variance[c], 4);
    }
    m.dispose();
  });

  it('round-trips weights and BN statistics as flat vectors, and checks their length', async () => {
    const a = new ResNet({ inChannels: 1, classes: 10, imageSize: 16 }, { seed: 1 });
    const b = new ResNet({ inChannels: 1, classes: 10, imageSize: 16 }, { seed: 2 });
    await a.computeGradients(randomBatch(4, 16, 1, 10));
    b.setWeights(await a.getWeights());
    b.setBatchNormStats(await a.getBatchNormStats());
    expect(firstDifference(await b.getWeights(), await a.getWeights())).toBe(-1);
    const batch = randomBatch(4, 16, 1, 10, 9);
    expect(await b.evaluate(batch)).toEqual(await a.evaluate(batch));
    expect(() => b.setWeights(new Float32Array(3))).toThrow(/expected \d+ floats/);
    await expect(a.computeGradients({ ...batch, n: 5 })).rejects.toThrow(/expected 5 images/);
    a.dispose();
    b.dispose();
  });
});

describe('gradient buckets (the all-reduce overlapping the backward pass)', () => {
  it('cover every parameter once, whole tensors, from the head back to the stem', async () => {
    const arch = describeResNet(TUTORIAL_CONFIG);
    const mib = 1 << 20;
    for (const bytes of [4, mib, 8 * mib, 25 * mib, 1 << 30]) {
      const buckets = gradientBuckets(arch, bytes);
      expect(buckets[0].endParam).toBe(arch.params.length);
      expect(buckets.at(-1)!.firstParam).toBe(0);
      expect(buckets.at(-1)!.from).toBe(0);
      expect(buckets[0].to).toBe(arch.paramCount);
      for (let k = 1; k < buckets.length; k++) {
        expect(buckets[k].endParam).toBe(buckets[k - 1].firstParam);
        expect(buckets[k].to).toBe(buckets[k - 1].from);
      }
      // At least the limit (all but the stem's bucket), and no tensor more than needed to reach it.
      for (const b of buckets.slice(0, -1)) {
        expect((b.to - b.from) * 4).toBeGreaterThanOrEqual(bytes);
        expect((b.to - arch.params[b.firstParam].size - b.from) * 4).toBeLessThan(bytes);
      }
    }
    expect(gradientBuckets(arch, 4)).toHaveLength(arch.params.length);
    expect(gradientBuckets(arch, 1 << 30)).toHaveLength(1);
    expect(() => gradientBuckets(arch, 0)).toThrow(/at least 4 bytes/);
  });

  it('are reported during the backward pass, each once, with gradients bitwise equal to the plain path', async () => {
    const cfg = { inChannels: 3, classes: 10, imageSize: 32 };
    const plain = new ResNet(cfg, { seed: 4 });
    const tapped = new ResNet(cfg, { seed: 4 });
    const batch = randomBatch(4, 32, 3, 10, 5);
    const want = await plain.computeGradients(batch);
    const buckets = gradientBuckets(tapped.arch, 64 * 1024);
    expect(buckets.length).toBeGreaterThan(3);
    const out = new Float32Array(tapped.paramCount).fill(NaN);
    const order: number[] = [];
    const stemStillEmpty: boolean[] = [];
    const stem = buckets.at(-1)!;
    const got = await tapped.computeGradients(batch, out, {
      buckets,
      onBucketReady: (k) => {
        const b = buckets[k];
        expect(out.subarray(b.from, b.to).every(Number.isFinite)).toBe(true);
        order.push(k);
        // The stem's gradient comes last in the backward pass: still unwritten for every other bucket.
        if (k !== buckets.length - 1) stemStillEmpty.push(Number.isNaN(out[stem.from]));
      },
    });
    expect([...order].sort((a, b) => a - b)).toEqual(buckets.map((_, k) => k));
    expect(order[0]).toBe(0);
    expect(stemStillEmpty.every(Boolean)).toBe(true);
    expect(firstDifference(got.grads, want.grads)).toBe(-1);
    expect(got.loss).toBe(want.loss);
    expect(got.correct).toBe(want.correct);
    // No tensor leaks from the taps, and the next plain step is unaffected.
    const before = tf.memory().numTensors;
    await tapped.computeGradients(batch, out, { buckets, onBucketReady: () => undefined });
    await tapped.computeGradients(batch, out);
    expect(tf.memory().numTensors).toBe(before);
    plain.dispose();
    tapped.dispose();
  });
});

