// The whole model on WebGPU (the software GPU of `pnpm setup:software-gpu`; .ci/run sets it up)
// against the CPU reference: the same weights and batch, tfjs's JS CPU backend with tfjs's own ops
// and gradients. Without the software GPU these cases are skipped, except under CI.
import { beforeAll, describe, expect, it, type TestContext } from 'vitest';
import * as tf from '@tensorflow/tfjs-core';
import { loadBackend, softwareGpu } from '@dtrain/backend';
import { gradientBuckets, ResNet } from './resnet.js';
import { firstDifference, forwardTolerance, randomBatch } from './testing/model-checks.js';

const sw = softwareGpu();
const needsSoftwareGpu = (ctx: TestContext) => {
  if (sw === null && process.env.CI) throw new Error('CI must set up the software GPU (pnpm setup:software-gpu, run by .ci/run)');
  ctx.skip(sw === null, 'no software GPU here: run pnpm setup:software-gpu');
};

beforeAll(async () => {
  if (sw !== null) await loadBackend('webgpu', { allowSoftwareGpu: true });
}, 120_000);

/** max |a - b| / max |b|. */
function relativeMaxDiff(a: Float32Array, b: Float32Array): number {
  let diff = 0;
  let ref = 0;
  for (let i = 0; i < b.length; i++) {
    diff = Math.max(diff, Math.abs(a[i] - b[i]));
    ref = Math.max(ref, Math.abs(b[i]));
  }
  return diff / ref;
}

describe('the ResNet on WebGPU', () => {
  it('computes the CPU reference’s loss, flat gradients, BatchNorm statistics and evaluation, buckets read off the GPU as they complete', async (ctx) => {
    needsSoftwareGpu(ctx);
    expect(tf.getBackend()).toBe('webgpu');
    const cfg = { inChannels: 3, classes: 10, imageSize: 32 };
    const batch = randomBatch(4, 32, 3, 10);
    const evalBatch = randomBatch(4, 32, 3, 10, 9);
    const gpu = new ResNet(cfg, { seed: 3 });
    const weights = await gpu.getWeights();
    const plain = await gpu.computeGradients(batch);
    // The same step again with buckets: each reported once, its floats final, the stem's last.
    const buckets = gradientBuckets(gpu.arch, 64 * 1024);
    const out = new Float32Array(gpu.paramCount).fill(NaN);
    const order: number[] = [];
    const tapped = await gpu.computeGradients(batch, out, {
      buckets,
      onBucketReady: (k) => {
        expect(out.subarray(buckets[k].from, buckets[k].to).every(Number.isFinite)).toBe(true);
        order.push(k);
      },
    });
    expect([...order].sort((a, b) => a - b)).toEqual(buckets.map((_, k) => k));
    expect(order.at(-1)).toBe(buckets.length - 1);
    expect(firstDifference(tapped.grads, plain.grads)).toBe(-1);
    const gpuBn = await gpu.getBatchNormStats();
    const gpuEval = await gpu.evaluate(evalBatch);
    gpu.dispose();

    await tf.setBackend('cpu');
    try {
      const cpu = new ResNet(cfg, { seed: 99, referenceOps: true });
      cpu.setWeights(weights);
      const want = await cpu.computeGradients(batch);
      await cpu.computeGradients(batch); // the second training-mode pass, as on the GPU
      const cpuBn = await cpu.getBatchNormStats();
      const cpuEval = await cpu.evaluate(evalBatch);
      cpu.dispose();
      // forwardTolerance (testing/model-checks.ts): each side's float32 reductions along the
      // network, both sides counted; the backward pass runs the chain once more (2x).
      const tol = forwardTolerance(gpu.arch, batch.n);
      expect(Math.abs(plain.loss - want.loss)).toBeLessThanOrEqual(tol * Math.abs(want.loss));
      expect(plain.correct).toBe(want.correct);
      expect(relativeMaxDiff(plain.grads, want.grads)).toBeLessThan(2 * tol);
      expect(relativeMaxDiff(gpuBn, cpuBn)).toBeLessThan(tol);
      expect(Math.abs(gpuEval.loss - cpuEval.loss)).toBeLessThanOrEqual(tol * Math.abs(cpuEval.loss));
      expect(gpuEval.correct).toBe(cpuEval.correct);
    } finally {
      await tf.setBackend('webgpu');
    }
  }, 300_000);

  it('keeps the number of live tensors constant over training steps with buckets', async (ctx) => {
    needsSoftwareGpu(ctx);
    const m = new ResNet({ inChannels: 1, classes: 10, imageSize: 16 }, { sgd: { lr: 0.01, momentum: 0.9 } });
    const batch = randomBatch(4, 16, 1, 10);
    const grads = new Float32Array(m.paramCount);
    const buckets = gradientBuckets(m.arch, 16 * 1024);
    const step = async () => {
      await m.computeGradients(batch, grads, { buckets, onBucketReady: () => undefined });
      m.applyGradients(grads);
      await m.evaluate(batch);
    };
    await step();
    const before = tf.memory().numTensors;
    for (let i = 0; i < 3; i++) await step();
    expect(tf.memory().numTensors).toBe(before);
    m.dispose();
  }, 300_000);
});
