// WebGPU on the software GPU (Mesa's lavapipe, `pnpm setup:software-gpu`; .ci/run sets it up).
// Without it these cases are reported as skipped, except under CI, where its absence is a failure.
import fs from 'node:fs';
import { beforeAll, describe, expect, it, type TestContext } from 'vitest';
import type { Tensor, Tensor4D } from '@tensorflow/tfjs-core';
import { BackendError, loadBackend, type LoadedBackend } from './index.js';
import { listWebGpuAdapters, softwareGpu } from './webgpu.js';

const sw = softwareGpu();
const needsSoftwareGpu = (ctx: TestContext) => {
  if (sw === null && process.env.CI) throw new Error('CI must set up the software GPU (pnpm setup:software-gpu, run by .ci/run)');
  ctx.skip(sw === null, 'no software GPU here: run pnpm setup:software-gpu');
};

describe('the software GPU', () => {
  it('gives one WebGPU adapter, marked software, with its limits', async (ctx) => {
    needsSoftwareGpu(ctx);
    const adapters = await listWebGpuAdapters();
    const lvp = adapters.find((a) => /llvmpipe/.test(a.description));
    expect(lvp, JSON.stringify(adapters)).toBeDefined();
    expect(lvp!.software).toBe(true);
    expect(lvp!.maxStorageBufferBindingSize).toBeGreaterThanOrEqual(128 * 2 ** 20);
  }, 60_000);

  it('is refused for training unless allowed, naming the flag', async (ctx) => {
    needsSoftwareGpu(ctx);
    await expect(loadBackend('webgpu')).rejects.toThrow(BackendError);
    await expect(loadBackend('webgpu')).rejects.toThrow(/the only WebGPU adapter is a software one \(llvmpipe.*--workers N.*--allow-software-gpu/);
  }, 60_000);
});

// Each case: a convolution of the network (shape, stride, padding), its output and both gradients
// for an upstream gradient dy, on WebGPU and on tfjs's JS CPU backend, the same inputs.
// Tolerance, derived: a float32 sum of n products, in any order, with or without FMA, is within
// gamma_n = n u / (1 - n u) (u = 2^-24) of the exact sum, relative to the sum of the products'
// magnitudes (Higham, Accuracy and Stability of Numerical Algorithms, 3.1). Each side can be off
// by that much, so |gpu - cpu| <= 2 gamma_n (sum |products|) per element; that sum is the same
// convolution on |x|, |w| and |dy|, computed here. n = kh kw Cin (output), kh kw Cout (input
// gradient, an upper bound), N Hout Wout (weight gradient).
// Every distinct convolution of the network, on the maps it sees at the tutorial's 96x96 (one image).
const CONVS = [
  { name: 'stem 7x7/2, 3->64 (96 -> 45)', x: [1, 96, 96, 3], k: 7, cout: 64, stride: 2, pad: 0 },
  { name: 'stage 1 3x3/1, 64->64 (23)', x: [1, 23, 23, 64], k: 3, cout: 64, stride: 1, pad: 1 },
  { name: 'stage 2 3x3/2, 64->128 (23 -> 12)', x: [1, 23, 23, 64], k: 3, cout: 128, stride: 2, pad: 1 },
  { name: 'stage 2 shortcut 1x1/2, 64->128', x: [1, 23, 23, 64], k: 1, cout: 128, stride: 2, pad: 0 },
  { name: 'stage 2 3x3/1, 128->128 (12)', x: [1, 12, 12, 128], k: 3, cout: 128, stride: 1, pad: 1 },
  { name: 'stage 3 3x3/2, 128->256 (12 -> 6)', x: [1, 12, 12, 128], k: 3, cout: 256, stride: 2, pad: 1 },
  { name: 'stage 3 shortcut 1x1/2, 128->256', x: [1, 12, 12, 128], k: 1, cout: 256, stride: 2, pad: 0 },
  { name: 'stage 3 3x3/1, 256->256 (6)', x: [1, 6, 6, 256], k: 3, cout: 256, stride: 1, pad: 1 },
  { name: 'stage 4 3x3/2, 256->512 (6 -> 3)', x: [1, 6, 6, 256], k: 3, cout: 512, stride: 2, pad: 1 },
  { name: 'stage 4 shortcut 1x1/2, 256->512', x: [1, 6, 6, 256], k: 1, cout: 512, stride: 2, pad: 0 },
  { name: 'stage 4 3x3/1, 512->512 (3)', x: [1, 3, 3, 512], k: 3, cout: 512, stride: 1, pad: 1 },
] as const;

describe('a process on WebGPU', () => {
  it('has neither libtensorflow nor tfjs-node loaded: a WebGPU worker needs neither', async (ctx) => {
    needsSoftwareGpu(ctx);
    const b = await loadBackend('webgpu', { allowSoftwareGpu: true });
    expect(b.versions.tensorflow).toBe('none (WebGPU)');
    const maps = fs.readFileSync('/proc/self/maps', 'utf8');
    expect(maps).toMatch(/dawn\.node/);
    expect(maps).not.toMatch(/libtensorflow|tfjs_binding/);
  }, 120_000);
});

describe('convolutions of the network on WebGPU vs the CPU backend', () => {
  let b: LoadedBackend | undefined;
  beforeAll(async () => {
    if (sw !== null) b = await loadBackend('webgpu', { allowSoftwareGpu: true });
  }, 120_000);

  for (const c of CONVS) {
    it(`${c.name}: output, input and weight gradients within the float32 bound`, async (ctx) => {
      needsSoftwareGpu(ctx);
      const tf = b!.tf;
      expect(tf.getBackend()).toBe('webgpu');
      const [n, h, w, cin] = c.x;
      const ho = Math.floor((h + 2 * c.pad - c.k) / c.stride) + 1;
      const wShape = [c.k, c.k, cin, c.cout] as [number, number, number, number];
      // Inputs on the host, made into tensors on each backend (tfjs moves data between backends
      // with a synchronous read, which WebGPU in Node cannot do).
      const host = await Promise.all([c.x as unknown as number[], wShape, [n, ho, ho, c.cout]].map((shape, i) => tf.randomNormal(shape, 0, i === 1 ? 0.1 : 1, 'float32', i + 1).data()));
      const shapes = [c.x as unknown as number[], wShape, [n, ho, ho, c.cout]];
      const conv = (xx: Tensor, ww: Tensor) => tf.conv2d(tf.pad(xx, [[0, 0], [c.pad, c.pad], [c.pad, c.pad], [0, 0]]) as Tensor4D, ww as Tensor4D, c.stride, 'valid');
      /** Output, input gradient, weight gradient for upstream gradient dy, on the current backend (`abs`: of |x|, |w|, |dy|). */
      const run = async (abs: boolean) => {
        const [x, wt, dy] = host.map((d, i) => (abs ? tf.abs(tf.tensor(d, shapes[i])) : tf.tensor(d, shapes[i])));
        const [gx, gw] = tf.grads((xx: Tensor, ww: Tensor) => tf.sum(tf.mul(conv(xx, ww), dy)))([x, wt]);
        return Promise.all([conv(x, wt).data(), gx.data(), gw.data()]);
      };
      const onGpu = await run(false);
      await tf.setBackend('cpu');
      try {
        const onCpu = await run(false);
        const mags = await run(true); // the sums of magnitudes
        const lengths = [c.k * c.k * cin, c.k * c.k * c.cout, n * ho * ho];
        const u = 2 ** -24;
        for (let t = 0; t < 3; t++) {
          const gamma = (lengths[t] * u) / (1 - lengths[t] * u);
          let worst = 0; // the largest |gpu - cpu| / bound
          for (let i = 0; i < onCpu[t].length; i++) worst = Math.max(worst, Math.abs(onGpu[t][i] - onCpu[t][i]) / (2 * gamma * mags[t][i] + 1e-30));
          expect(worst, `${['output', 'input gradient', 'weight gradient'][t]}: largest difference / bound`).toBeLessThanOrEqual(1);
        }
      } finally {
        await tf.setBackend('webgpu');
      }
    }, 120_000);
  }
});
