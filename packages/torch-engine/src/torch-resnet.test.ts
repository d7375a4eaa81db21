// The libtorch engine against the TensorFlow.js reference (tfjs-node, tfjs's own ops and
// gradients) on the same weights and batch, its flat layouts and buckets, its optimiser against a
// naive reference, and its one-line errors. Without a built add-on these cases are skipped,
// except under CI, where .ci/run's install must have built it.
import { beforeAll, describe, expect, it } from 'vitest';
import { loadBackend } from '@dtrain/backend';
import { gradientBuckets, ResNet, type ResNetConfig } from '@dtrain/core';
import { firstDifference, forwardTolerance, labelSmoothingEffect, randomBatch, relativeMaxDiff } from '@dtrain/core/testing';
import { toTensorFlowLayout } from './layout.js';
import { TorchResNet } from './torch-resnet.js';
import { needsEngine } from './testing.js';


beforeAll(async () => {
  await loadBackend('cpu');
}, 120_000);

/**
 * One training step, then a second training pass (running statistics) and an evaluation, on both
 * engines from the same weights; each measure relative and over its bound (core's
 * forwardTolerance: each side's float32 reductions along the network, both counted; gradients
 * twice that). Per tensor: the gradient of every parameter, the running statistics of every
 * BatchNorm (each a function of its layer's forward output), so a failure names the layer.
 */
async function compareWithTfjs(config: ResNetConfig, n: number, channelsLast: boolean) {
  const batch = randomBatch(n, config.imageSize, config.inChannels, config.classes);
  const evalBatch = randomBatch(n, config.imageSize, config.inChannels, config.classes, 9);
  const tfjs = new ResNet(config, { seed: 3, referenceOps: true });
  const torch = new TorchResNet(config, { seed: 5, channelsLast });
  torch.setWeights(await tfjs.getWeights());
  const want = await tfjs.computeGradients(batch);
  const got = await torch.computeGradients(batch);
  const grads = toTensorFlowLayout(torch.arch, got.grads, torch.gradientLayout);
  await tfjs.computeGradients(batch);
  await torch.computeGradients(batch);
  const [wantBn, gotBn] = [await tfjs.getBatchNormStats(), await torch.getBatchNormStats()];
  const [wantEval, gotEval] = [await tfjs.evaluate(evalBatch), await torch.evaluate(evalBatch)];
  const tol = forwardTolerance(tfjs.arch, n);
  const worst = (pairs: Array<[string, Float32Array, Float32Array]>, bound: number) =>
    pairs.map(([name, a, b]) => ({ name, ratio: relativeMaxDiff(a, b) / bound })).reduce((x, y) => (y.ratio > x.ratio ? y : x));
  // The stem conv's bias feeds a training-mode BatchNorm, which removes any per-channel constant:
  // its exact gradient is 0, and both sides hold rounding noise. It is held to the global bound.
  const zeroByConstruction = new Set(tfjs.arch.stemConv.bias ? [`${tfjs.arch.stemConv.name}.bias`] : []);
  const gradWorst = worst(
    tfjs.arch.params.filter((p) => !zeroByConstruction.has(p.name)).map((p) => [p.name, grads.subarray(p.offset, p.offset + p.size), want.grads.subarray(p.offset, p.offset + p.size)]),
    2 * tol,
  );
  let off = 0;
  const bnWorst = worst(
    tfjs.arch.batchNorms.map((bn) => {
      const r: [string, Float32Array, Float32Array] = [bn.name, gotBn.subarray(off, off + 2 * bn.channels), wantBn.subarray(off, off + 2 * bn.channels)];
      off += 2 * bn.channels;
      return r;
    }),
    tol,
  );
  tfjs.dispose();
  torch.dispose();
  return {
    tol,
    loss: Math.abs(got.loss - want.loss) / Math.abs(want.loss) / tol,
    correctEqual: got.correct === want.correct && gotEval.correct === wantEval.correct,
    grads: relativeMaxDiff(grads, want.grads) / (2 * tol),
    gradWorst,
    bnWorst,
    evalLoss: Math.abs(gotEval.loss - wantEval.loss) / Math.abs(wantEval.loss) / tol,
  };
}

describe('the torch engine against the TensorFlow.js reference', () => {
  for (const channelsLast of [false, true]) {
    it(`computes its loss, every parameter's gradient, every BatchNorm's statistics and the evaluation (${channelsLast ? 'channels-last' : 'NCHW'})`, async (ctx) => {
      needsEngine(ctx);
      const r = await compareWithTfjs({ inChannels: 3, classes: 10, imageSize: 32 }, 4, channelsLast);
      expect(r.tol).toBeLessThan(2e-4); // ~8e-5: a wrong op is off by O(1)
      expect(r.correctEqual).toBe(true);
      expect(r.loss, 'loss').toBeLessThanOrEqual(1);
      expect(r.evalLoss, 'evaluation loss').toBeLessThanOrEqual(1);
      expect(r.grads, 'all gradients, relative to the largest').toBeLessThanOrEqual(1);
      // Each tensor relative to its own largest entry: a layer whose gradient is small overall
      // would hide in the line above. Twice the bound: a small tensor's largest entry is itself
      // the sum of fewer, larger terms.
      expect(r.gradWorst.ratio, `gradient of ${r.gradWorst.name}`).toBeLessThanOrEqual(2);
      expect(r.bnWorst.ratio, `running statistics of ${r.bnWorst.name}`).toBeLessThanOrEqual(1);
    }, 300_000);
  }
});

describe('the torch engine', () => {
  const config = { inChannels: 1, classes: 10, imageSize: 16 };

  it('reports every bucket once, from the head back to the stem, with gradients equal to an unbucketed step', async (ctx) => {
    needsEngine(ctx);
    const m = new TorchResNet(config, { seed: 1 });
    const batch = randomBatch(4, 16, 1, 10);
    const plain = await m.computeGradients(batch);
    const buckets = gradientBuckets(m.arch, 64 * 1024);
    const order: number[] = [];
    const out = new Float32Array(m.paramCount).fill(Number.NaN);
    const bucketed = await m.computeGradients(batch, out, {
      buckets,
      onBucketReady: (k) => {
        // When reported, the bucket's floats are final (no NaN left from the fill).
        const b = buckets[k];
        expect(out.subarray(b.from, b.to).some(Number.isNaN), `bucket ${k}`).toBe(false);
        order.push(k);
      },
    });
    expect(buckets.length).toBeGreaterThan(3);
    expect(order).toEqual(buckets.map((_, k) => k));
    expect(firstDifference(bucketed.grads, plain.grads)).toBe(-1);
    m.dispose();
  });

  it('reads and writes weights, momentum and BatchNorm statistics in TensorFlow’s layouts, as the tfjs ResNet', async (ctx) => {
    needsEngine(ctx);
    const tfjs = new ResNet(config, { seed: 2, sgd: { lr: 0.1, momentum: 0.9 } });
    const m = new TorchResNet(config, { seed: 7, sgd: { lr: 0.1, momentum: 0.9 } });
    const weights = await tfjs.getWeights();
    m.setWeights(weights);
    expect(firstDifference(await m.getWeights(), weights)).toBe(-1);
    const bn = Float32Array.from({ length: m.arch.bnStatCount }, (_, i) => i / 7);
    m.setBatchNormStats(bn);
    expect(firstDifference(await m.getBatchNormStats(), bn)).toBe(-1);
    const momentum = Float32Array.from({ length: m.paramCount }, (_, i) => Math.sin(i));
    m.optimizer.setState({ steps: 3, buffers: momentum });
    const state = await m.optimizer.getState();
    expect(state.steps).toBe(3);
    expect(firstDifference(state.buffers, momentum)).toBe(-1);
    // The same weights give the same predictions as the tfjs model (evaluation mode, same statistics).
    tfjs.setBatchNormStats(bn.map((v, i) => (Math.floor(i / 64) % 2 ? 1 + v : v)));
    m.setBatchNormStats(await tfjs.getBatchNormStats());
    const batch = randomBatch(6, 16, 1, 10, 4);
    expect(await m.predict(batch)).toEqual(await tfjs.predict(batch));
    tfjs.dispose();
    m.dispose();
  });

  for (const [nesterov, skipNormBiasDecay] of [[false, false], [true, true]]) {
    it(`updates as torch.optim.SGD (momentum, weight decay${nesterov ? ', Nesterov, no decay of biases and BatchNorm' : ''}), against a naive float64 loop`, async (ctx) => {
      needsEngine(ctx);
      const [lr, mom, wd] = [0.05, 0.9, 5e-4];
      const m = new TorchResNet(config, { seed: 4, sgd: { lr, momentum: mom, weightDecay: wd, nesterov, skipNormBiasDecay } });
      const p0 = await m.getWeights();
      const g = Float32Array.from({ length: m.paramCount }, (_, i) => Math.cos(i) * 0.01);
      // Conv gradients are in the engine's layout; this gradient is the same function of the index
      // in both layouts only if we feed the engine's layout and read TensorFlow's: convert.
      const gTf = toTensorFlowLayout(m.arch, g, m.gradientLayout);
      const decayed = new Uint8Array(m.paramCount);
      for (const p of m.arch.params) decayed.fill(!skipNormBiasDecay || p.shape.length > 1 ? 1 : 0, p.offset, p.offset + p.size);
      if (skipNormBiasDecay) expect(decayed.includes(0) && decayed.includes(1)).toBe(true);
      m.applyGradients(g);
      m.applyGradients(g);
      const got = await m.getWeights();
      let worst = 0;
      for (let i = 0; i < p0.length; i++) {
        let p = p0[i];
        let buf = 0;
        for (let s = 0; s < 2; s++) {
          const d = gTf[i] + (decayed[i] ? wd * p : 0);
          buf = s === 0 ? d : mom * buf + d;
          p -= lr * (nesterov ? d + mom * buf : buf);
        }
        // float32 vs float64: a few roundings of values of |p|'s size.
        worst = Math.max(worst, Math.abs(got[i] - p) / Math.max(Math.abs(p), 1e-3));
      }
      expect(worst).toBeLessThan(8 * 2 ** -24 * 8);
      expect(m.optimizer.steps).toBe(2);
      m.dispose();
    });
  }

  it('label smoothing e moves the output bias gradient by e x (class share - 1/classes), as CrossEntropyLoss(label_smoothing=e)', async (ctx) => {
    needsEngine(ctx);
    const effect = await labelSmoothingEffect((ls) => new TorchResNet(config, { seed: 8, labelSmoothing: ls }), 0.1, randomBatch(8, 16, 1, 10, 3));
    // float32 softmax entries of size ~0.1 on each side: a few units of 2^-24.
    expect(effect.worstBiasShiftError).toBeLessThan(5e-7);
    expect(effect.smoothedLossDiffers).toBe(true);
    expect(effect.evaluationLossEqual).toBe(true);
    expect(() => new TorchResNet(config, { labelSmoothing: 1 })).toThrow(/label smoothing must be in \[0, 1\), got 1/);
    expect(() => new TorchResNet(config, { sgd: { lr: 0.1, nesterov: true } })).toThrow(/Nesterov momentum needs a momentum above 0/);
  });

  it('trainStep (one process alone: the gradient stays in the engine) reaches the same weights as computeGradients + applyGradients, and skips a non-finite step', async (ctx) => {
    needsEngine(ctx);
    // Nesterov, decay skipped for biases and BatchNorm, label smoothing: every branch of both paths.
    const sgd = { lr: 0.05, momentum: 0.9, weightDecay: 5e-4, nesterov: true, skipNormBiasDecay: true };
    const [a, b] = [new TorchResNet(config, { seed: 6, sgd, labelSmoothing: 0.1 }), new TorchResNet(config, { seed: 6, sgd, labelSmoothing: 0.1 })];
    for (let k = 0; k < 3; k++) {
      const batch = randomBatch(4, 16, 1, 10, k + 1);
      const ra = await a.computeGradients(batch);
      a.applyGradients(ra.grads);
      const rb = await b.trainStep(batch);
      expect(rb.loss).toBe(ra.loss);
      expect(rb.correct).toBe(ra.correct);
    }
    expect(b.optimizer.steps).toBe(3);
    // The same elementwise SGD, on the flat buffer or per parameter: the same floats.
    expect(firstDifference(await b.getWeights(), await a.getWeights())).toBe(-1);
    expect(firstDifference((await b.optimizer.getState()).buffers, (await a.optimizer.getState()).buffers)).toBe(-1);
    const before = await b.getWeights();
    const bad = randomBatch(4, 16, 1, 10);
    bad.images[0] = Number.NaN;
    expect((await b.trainStep(bad)).loss).toBeNaN();
    expect(firstDifference(await b.getWeights(), before)).toBe(-1);
    expect(b.optimizer.steps).toBe(3);
    a.dispose();
    b.dispose();
  });

  it('turns a libtorch error into one line naming the layer and the operation', async (ctx) => {
    needsEngine(ctx);
    const m = new TorchResNet(config, { seed: 1 });
    const batch = randomBatch(4, 16, 1, 10);
    batch.labels[2] = 12; // 10 classes
    const err = await m.computeGradients(batch).catch((e: Error) => e);
    expect(String((err as Error).message)).toMatch(/^torch engine, loss: cross_entropy: .*12.*out of bounds/);
    expect(String((err as Error).message)).not.toContain('\n');
    // The engine is usable after the error.
    batch.labels[2] = 1;
    expect(Number.isFinite((await m.computeGradients(batch)).loss)).toBe(true);
    m.dispose();
    expect(() => m.setWeights(new Float32Array(m.paramCount))).toThrow(/disposed/);
  });
});
