import { beforeAll, describe, expect, it } from 'vitest';
import * as tf from '@tensorflow/tfjs-core';
import { loadBackend } from '@dtrain/backend';
import { conv2dReference, makeConv2d, type ConvSpec } from './conv.js';

beforeAll(async () => {
  await loadBackend('cpu');
});

/** Max |a-b| relative to max |b|: one number that fails on any wrong element. */
function relErr(a: tf.Tensor, b: tf.Tensor): number {
  return tf.tidy(() => tf.max(tf.abs(tf.sub(a, b))).dataSync()[0] / Math.max(1e-12, tf.max(tf.abs(b)).dataSync()[0]));
}

// Every conv shape of the network (channels as in the network, small maps and batch), with
// even and odd input sizes for the stride-2 layers, where PyTorch and 'same' padding differ.
const cases: Array<[string, number, number, number, ConvSpec]> = [
  ['stem 7x7/2 rgb', 21, 3, 64, { kernel: 7, stride: 2, padding: 0, inputGrad: false }],
  ['stem 7x7/2 gray', 20, 1, 64, { kernel: 7, stride: 2, padding: 0, inputGrad: true }],
  ['3x3/1 64', 7, 64, 64, { kernel: 3, stride: 1, padding: 1, inputGrad: true }],
  ['3x3/2 64->128 even', 8, 64, 128, { kernel: 3, stride: 2, padding: 1, inputGrad: true }],
  ['3x3/2 64->128 odd', 7, 64, 128, { kernel: 3, stride: 2, padding: 1, inputGrad: true }],
  ['1x1/2 64->128 even', 8, 64, 128, { kernel: 1, stride: 2, padding: 0, inputGrad: true }],
  ['1x1/2 64->128 odd', 7, 64, 128, { kernel: 1, stride: 2, padding: 0, inputGrad: true }],
  ['1x1/1 64->128 (not in the network; the 1x1 path supports it)', 5, 64, 128, { kernel: 1, stride: 1, padding: 0, inputGrad: true }],
  ['3x3/1 128', 4, 128, 128, { kernel: 3, stride: 1, padding: 1, inputGrad: true }],
  ['3x3/2 128->256', 4, 128, 256, { kernel: 3, stride: 2, padding: 1, inputGrad: true }],
  ['1x1/2 128->256', 3, 128, 256, { kernel: 1, stride: 2, padding: 0, inputGrad: true }],
  ['3x3/1 256', 2, 256, 256, { kernel: 3, stride: 1, padding: 1, inputGrad: true }],
  ['3x3/2 256->512 (2x2 map)', 2, 256, 512, { kernel: 3, stride: 2, padding: 1, inputGrad: true }],
  ['3x3/2 256->512 (3x3 map)', 3, 256, 512, { kernel: 3, stride: 2, padding: 1, inputGrad: true }],
  ['1x1/2 256->512', 2, 256, 512, { kernel: 1, stride: 2, padding: 0, inputGrad: true }],
  ['3x3/1 512 (1x1 map)', 1, 512, 512, { kernel: 3, stride: 1, padding: 1, inputGrad: true }],
  ['3x3/1 512 (3x3 map)', 3, 512, 512, { kernel: 3, stride: 1, padding: 1, inputGrad: true }],
];

describe('makeConv2d matches TensorFlow’s own gradients', () => {
  for (const [name, size, cin, cout, spec] of cases) {
    it(name, () => {
      const n = 2;
      const x = tf.randomNormal([n, size, size, cin], 0, 1, 'float32', 1) as tf.Tensor4D;
      const w = tf.randomNormal([spec.kernel, spec.kernel, cin, cout], 0, 0.1, 'float32', 2) as tf.Tensor4D;
      const fast = makeConv2d(spec);
      const yRef = conv2dReference(x, w, spec);
      const dy = tf.randomNormal(yRef.shape, 0, 1, 'float32', 3);
      const y = fast(x, w);
      expect(y.shape).toEqual(yRef.shape);
      expect(relErr(y, yRef)).toBeLessThan(1e-5);

      const loss = (f: (a: tf.Tensor4D, b: tf.Tensor4D) => tf.Tensor4D) => (a: tf.Tensor, b: tf.Tensor) =>
        tf.sum(tf.mul(f(a as tf.Tensor4D, b as tf.Tensor4D), dy));
      const [dxRef, dwRef] = tf.grads(loss((a, b) => conv2dReference(a, b, spec)))([x, w]);
      const [dx, dw] = tf.grads(loss(fast))([x, w]);
      expect(relErr(dw, dwRef)).toBeLessThan(1e-4);
      if (spec.inputGrad) {
        expect(dx.shape).toEqual(x.shape);
        expect(relErr(dx, dxRef)).toBeLessThan(1e-4);
      } else {
        expect(tf.max(tf.abs(dx)).dataSync()[0]).toBe(0);
      }
      tf.dispose([x, w, yRef, dy, y, dxRef, dwRef, dx, dw]);
    });
  }

  it('rejects padding that PyTorch semantics cannot be matched with', () => {
    expect(() => makeConv2d({ kernel: 3, stride: 1, padding: 0, inputGrad: true })).toThrow(/padding/);
    expect(() => makeConv2d({ kernel: 2, stride: 2, padding: 0, inputGrad: true })).toThrow(/odd/);
  });
});
