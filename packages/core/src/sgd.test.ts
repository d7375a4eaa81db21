import { beforeAll, describe, expect, it } from 'vitest';
import * as tf from '@tensorflow/tfjs-core';
import { loadBackend } from '@dtrain/backend';
import { Sgd } from './sgd.js';

beforeAll(async () => {
  await loadBackend('cpu');
});

/** torch.optim.SGD written out on plain arrays: the reference. */
function referenceSgd(p: number[], grads: number[][], lr: number, momentum: number, wd: number): number[] {
  let buf: number[] | undefined;
  for (const g0 of grads) {
    const g = g0.map((g, i) => g + wd * p[i]);
    buf = momentum > 0 ? (buf ? buf.map((b, i) => momentum * b + g[i]) : g) : g;
    p = p.map((x, i) => x - lr * buf![i]);
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
