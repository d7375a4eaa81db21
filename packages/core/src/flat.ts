// Tensors <-> one flat Float32Array, in a fixed order.

import * as tf from '@tensorflow/tfjs-core';

/**
 * Whether the current backend can read a tensor synchronously. WebGPU in Node cannot: tfjs's
 * synchronous WebGPU read goes through an OffscreenCanvas, which Node lacks; every read there is
 * `await t.data()`, which also lets the GPU run ahead of the host.
 */
export function readsSync(): boolean {
  return tf.getBackend() !== 'webgpu';
}

/**
 * Copies tensors, in order, into one flat vector. On the CPU, per-tensor dataSync + set (tf.concat
 * of many 1-D tensors measured 500x slower on tfjs-node: 15 s vs 29 ms for 7.5M floats); on WebGPU,
 * every read is started at once and copied as it lands.
 */
export async function copyOut(tensors: tf.Tensor[], out: Float32Array): Promise<Float32Array> {
  const total = tensors.reduce((a, t) => a + t.size, 0);
  if (total !== out.length) throw new RangeError(`flat vector has ${out.length} floats, the tensors ${total}`);
  let offset = 0;
  if (readsSync()) {
    for (const t of tensors) {
      out.set(t.dataSync() as Float32Array, offset);
      offset += t.size;
    }
    return out;
  }
  const parts = await Promise.all(tensors.map((t) => t.data() as Promise<Float32Array>));
  for (const p of parts) {
    out.set(p, offset);
    offset += p.length;
  }
  return out;
}

/** The first value of a scalar tensor. */
export async function readScalar(t: tf.Tensor): Promise<number> {
  return readsSync() ? t.dataSync()[0] : (await t.data())[0];
}

export function readFlat(vars: tf.Variable[]): Promise<Float32Array> {
  return copyOut(vars, new Float32Array(vars.reduce((a, v) => a + v.size, 0)));
}

export function writeFlat(vars: tf.Variable[], flat: Float32Array, what: string): void {
  const total = vars.reduce((a, v) => a + v.size, 0);
  if (flat.length !== total) throw new RangeError(`${what}: expected ${total} floats, got ${flat.length}`);
  tf.tidy(() => {
    const parts = tf.split(tf.tensor1d(flat), vars.map((v) => v.size));
    vars.forEach((v, i) => v.assign(tf.reshape(parts[i], v.shape)));
  });
}
