// What the model's tests share: a deterministic batch, bitwise comparison, and the float32
// tolerance between two computations of the network that sum in different orders.
import type { Architecture } from '../architecture.js';
import type { Batch } from '../resnet.js';

/** Deterministic pseudo-random batch (not all zeros, not learnable). */
export function randomBatch(n: number, size: number, channels: number, classes: number, seed = 1): Batch {
  let s = seed >>> 0;
  const rand = () => ((s = (s * 1664525 + 1013904223) >>> 0) / 2 ** 32) * 2 - 1;
  const images = new Float32Array(n * size * size * channels).map(rand);
  const labels = Int32Array.from({ length: n }, (_, i) => (i * 7 + seed) % classes);
  return { images, labels, n };
}

/** Index of the first differing element, -1 when bitwise equal (vitest's toEqual is too slow for 11M floats). */
export function firstDifference(a: Float32Array, b: Float32Array): number {
  if (a.length !== b.length) return Math.min(a.length, b.length);
  const ua = new Uint32Array(a.buffer, a.byteOffset, a.length);
  const ub = new Uint32Array(b.buffer, b.byteOffset, b.length);
  for (let i = 0; i < ua.length; i++) if (ua[i] !== ub[i]) return i;
  return -1;
}

/**
 * Relative float32 tolerance between two computations of the network's forward pass that sum
 * in different orders (the fast path's im2col / polyphase / fused kernels vs TensorFlow's own ops;
 * oneDNN's kernels differ per CPU too). A length-K float32 reduction is typically off by
 * sqrt(K) * u relative to its magnitude (u = 2^-24, rounding errors as independent random
 * variables; the worst case K * u is far too loose to test anything). Along the forward path
 * these add to first order: sum over every reduction (each conv: k*k*Cin; each BatchNorm's
 * statistics: batch*H*W; the FC: 512). Each of the two computations contributes that much.
 * The loss, -log softmax at a random initialisation, is of the order of the logits, so the
 * same relative tolerance applies to it. The backward pass runs the chain once more: twice that.
 * For the 32x32 network at batch 4 this is about 8e-5: a wrong op changes the loss by O(1).
 */
export function forwardTolerance(a: Architecture, batch: number): number {
  const u = 2 ** -24;
  const convs = [a.stemConv, ...a.blocks.flatMap((b) => [b.conv1, b.conv2, ...(b.shortcut ? [b.shortcut] : [])])];
  const mapArea = (name: string) => {
    const [h, w] = a.layers.find((l) => l.name === name)!.outputShape;
    return h * w;
  };
  let sumSqrtK = Math.sqrt(512);
  for (const c of convs) sumSqrtK += Math.sqrt(c.kernel * c.kernel * c.inChannels);
  for (const bn of a.batchNorms) sumSqrtK += Math.sqrt(batch * mapArea(bn.name));
  return 2 * sumSqrtK * u;
}
