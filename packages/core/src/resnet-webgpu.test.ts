// The whole model on WebGPU (the software GPU of `pnpm setup:software-gpu`; .ci/run sets it up)
// against the CPU reference: the same weights and batch, tfjs's JS CPU backend with tfjs's own ops
// and gradients. Without the software GPU these cases are skipped, except under CI.
import { beforeAll, describe, expect, it, type TestContext } from 'vitest';
import * as tf from '@tensorflow/tfjs-core';
import { loadBackend, softwareGpu } from '@dtrain/backend';
import { gradientBuckets, ResNet } from './resnet.js';
import { compareWithCpuReference, randomBatch } from './testing/model-checks.js';

const sw = softwareGpu();
const needsSoftwareGpu = (ctx: TestContext) => {
  if (sw === null && process.env.CI) throw new Error('CI must set up the software GPU (pnpm setup:software-gpu, run by .ci/run)');
  ctx.skip(sw === null, 'no software GPU here: run pnpm setup:software-gpu');
};

beforeAll(async () => {
  if (sw !== null) await loadBackend('webgpu', { allowSoftwareGpu: true });
}, 120_000);

describe('the ResNet on WebGPU', () => {
  it('computes the CPU reference’s loss, flat gradients, BatchNorm statistics and evaluation, buckets read off the GPU as they complete', async (ctx) => {
    needsSoftwareGpu(ctx);
    expect(tf.getBackend()).toBe('webgpu');
    // Each measure divided by its bound (forwardTolerance, testing/model-checks.ts: each side's
    // float32 reductions along the network, both sides counted; the backward pass twice that).
    const r = await compareWithCpuReference({ inChannels: 3, classes: 10, imageSize: 32 }, 4);
    expect(r.tolerance).toBeLessThan(2e-4); // ~8e-5: a wrong op is off by O(1)
    expect(r.bucketsExact).toBe(true);
    expect(r.correctEqual).toBe(true);
    for (const k of ['loss', 'grads', 'bnStats', 'evalLoss'] as const) expect(r[k], k).toBeLessThanOrEqual(1);
    expect(tf.getBackend()).toBe('webgpu');
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
