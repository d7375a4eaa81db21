import { beforeAll, describe, expect, it } from 'vitest';
import * as tf from '@tensorflow/tfjs-core';
import { loadBackend } from '@dtrain/backend';
import { Sgd } from './sgd.js';

beforeAll(async () => {
  await loadBackend('cpu');
});

/**
 * torch.optim.SGD written out on plain arrays: the reference. `decayed[i]` says whether weight
 * decay applies to entry i (all, unless skipNormBiasDecay leaves out the 1-D tensors).
 */
function referenceSgd(p: number[], grads: number[][], lr: number, momentum: number, wd: number, nesterov = false, decayed = p.map(() => true)): number[] {
  let buf: number[] | undefined;
  for (const g0 of grads) {
    const g = g0.map((g, i) => g + (decayed[i] ? wd * p[i] : 0));
    buf = momentum > 0 ? (buf ? buf.map((b, i) => momentum * b + g[i]) : g) : g;
    const d = nesterov ? g.map((x, i) => x + momentum * buf![i]) : buf;
    p = p.map((x, i) => x - lr * d[i]);
  }
  return p;
}

describe('Sgd', () => {
  for (const [momentum, wd] of [[0, 0], [0.9, 0], [0.9, 5e-4], [0, 1e-2]]) {
    it(`matches torch.optim.SGD (momentum ${momentum}, weight decay ${wd})`, () => {
      const init = [0.5, -1.25, 2, 0.125, -0.75];
      const a = tf.variable(tf.tensor2d(init.slice(0, 4), [2, 2]));
      const b = tf.variable(tf.tensor1d(init.slice(4)));
      const opt = new Sgd([a, b], { lr: 0.1, momentum, weightDecay: wd });
      const grads = [[1, -2, 0.5, 3, -1], [0.25, 0.5, -0.75, 1, 2], [-1, 1, -1, 1, 0.5]];
      for (const g of grads) opt.step(Float32Array.from(g));
      const got = [...a.dataSync(), ...b.dataSync()];
      const want = referenceSgd(init, grads, 0.1, momentum, wd);
      got.forEach((x, i) => expect(x).toBeCloseTo(want[i], 5));
      opt.dispose();
      tf.dispose([a, b]);
    });
  }

  it('Nesterov and the decay of 2-D tensors only, against torch.optim.SGD written out', () => {
    const init = [0.5, -1.25, 2, 0.125, -0.75];
    const a = tf.variable(tf.tensor2d(init.slice(0, 4), [2, 2])); // a weight: decayed
    const b = tf.variable(tf.tensor1d(init.slice(4))); // a bias: not decayed
    const opt = new Sgd([a, b], { lr: 0.1, momentum: 0.9, weightDecay: 0.05, nesterov: true, skipNormBiasDecay: true });
    const grads = [[1, -2, 0.5, 3, -1], [0.25, 0.5, -0.75, 1, 2], [-1, 1, -1, 1, 0.5]];
    for (const g of grads) opt.step(Float32Array.from(g));
    const got = [...a.dataSync(), ...b.dataSync()];
    const want = referenceSgd(init, grads, 0.1, 0.9, 0.05, true, [true, true, true, true, false]);
    got.forEach((x, i) => expect(x).toBeCloseTo(want[i], 5));
    // The reference is not the plain update: both switches change the result.
    expect(want).not.toEqual(referenceSgd(init, grads, 0.1, 0.9, 0.05));
    opt.dispose();
    tf.dispose([a, b]);
  });

  it('Nesterov on one parameter, by hand: two steps', () => {
    // p0 = 1, g = 2 then 1, lr 0.1, momentum 0.5. Step 1: buf = 2, d = 2 + 0.5 x 2 = 3, p = 0.7.
    // Step 2: buf = 0.5 x 2 + 1 = 2, d = 1 + 0.5 x 2 = 2, p = 0.5.
    const p = tf.variable(tf.tensor1d([1]));
    const opt = new Sgd([p], { lr: 0.1, momentum: 0.5, nesterov: true });
    opt.step(Float32Array.from([2]));
    expect(p.dataSync()[0]).toBeCloseTo(0.7, 6);
    opt.step(Float32Array.from([1]));
    expect(p.dataSync()[0]).toBeCloseTo(0.5, 6);
    expect(() => new Sgd([p], { lr: 0.1, nesterov: true })).toThrow(/Nesterov momentum needs a momentum above 0/);
    opt.dispose();
    p.dispose();
  });

  it('saves and restores momentum state so a resumed run continues identically', async () => {
    const mk = () => tf.variable(tf.tensor1d([1, 2, 3]));
    const p1 = mk();
    const o1 = new Sgd([p1], { lr: 0.1, momentum: 0.9 });
    o1.step(Float32Array.from([1, 1, 1]));
    const state = await o1.getState();
    const p2 = tf.variable(p1.clone());
    const o2 = new Sgd([p2], { lr: 0.1, momentum: 0.9 });
    o2.setState(state);
    o1.step(Float32Array.from([0.5, -1, 2]));
    o2.step(Float32Array.from([0.5, -1, 2]));
    expect(Array.from(p2.dataSync())).toEqual(Array.from(p1.dataSync()));
    expect(() => o2.setState({ steps: 1, buffers: new Float32Array(2) })).toThrow(/expected 3 floats/);
    expect(() => new Sgd([p1], { lr: -1 })).toThrow(/lr/);
    [o1, o2].forEach((o) => o.dispose());
    tf.dispose([p1, p2]);
  });
});
