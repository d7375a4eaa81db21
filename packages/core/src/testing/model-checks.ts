// What the model's tests (and tools/gpu-check on a real GPU) share: a deterministic batch, bitwise
// comparison, the float32 tolerance between two computations of the network that sum in different
// orders, and the comparison of a GPU's training step with the CPU reference.
import * as tf from '@tensorflow/tfjs-core';
import type { Architecture, ResNetConfig } from '../architecture.js';
import { gradientBuckets, ResNet, type Batch } from '../resnet.js';
import type { TrainableModel } from '../model.js';

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

/** max |a - b| / max |b|. */
export function relativeMaxDiff(a: Float32Array, b: Float32Array): number {
  let diff = 0;
  let ref = 0;
  for (let i = 0; i < b.length; i++) {
    diff = Math.max(diff, Math.abs(a[i] - b[i]));
    ref = Math.max(ref, Math.abs(b[i]));
  }
  return diff / ref;
}

/** One training step of the model on the current backend vs the CPU reference: each measure over its bound. */
export interface ReferenceComparison {
  config: ResNetConfig;
  batch: number;
  /** forwardTolerance(arch, batch): the loss's and the BN statistics' bound; gradients get twice it. */
  tolerance: number;
  /** Each: |ours - reference| relative, divided by its bound; at most 1 passes. */
  loss: number;
  grads: number;
  bnStats: number;
  evalLoss: number;
  /** Correct counts equal, training and evaluation. */
  correctEqual: boolean;
  /** The bucketed step (gradients read off per bucket as they complete) equals the plain one bitwise, each bucket reported once. */
  bucketsExact: boolean;
  /**
   * How far the reference's own gradients move (over the same bound) when every input value moves
   * by one float32 rounding, the largest of `perturbations` tries (0: not measured). Where a ReLU
   * input or a max-pool tie sits within rounding of its kink, the gradient jumps (BatchNorms of few
   * values per channel spread the jump over the channel): no float32 implementation can then be held
   * to the first-order bound, only to this envelope (measured: up to 52x the bound at 96x96 batch 2
   * on the CPU, 0.03-0.05x at 32x32 batch 8 and 64x64 batch 2).
   */
  referenceSensitivity: number;
}

/** The batch with every image value moved by about one float32 rounding (relative 2^-24), as another summation order would. */
export function perturbedByRounding(b: Batch, seed: number): Batch {
  let s = seed >>> 0;
  const images = b.images.map((v) => v * (1 + ((((s = (s * 1664525 + 1013904223) >>> 0) / 2 ** 32) * 2 - 1) * 2 ** -24)));
  return { ...b, images };
}

/**
 * Trains one step on the current backend (a GPU), then the same weights and batch on tfjs's JS CPU
 * backend with tfjs's own ops and gradients, and compares: loss, flat gradients, the BatchNorm
 * running statistics after two training passes, and an evaluation. Leaves the current backend
 * selected again at the end.
 */
export async function compareWithCpuReference(config: ResNetConfig, n: number, perturbations = 0): Promise<ReferenceComparison> {
  const gpuBackend = tf.getBackend();
  const batch = randomBatch(n, config.imageSize, config.inChannels, config.classes);
  const evalBatch = randomBatch(n, config.imageSize, config.inChannels, config.classes, 9);
  const gpu = new ResNet(config, { seed: 3 });
  const weights = await gpu.getWeights();
  const plain = await gpu.computeGradients(batch);
  const buckets = gradientBuckets(gpu.arch, 64 * 1024);
  const order: number[] = [];
  const tapped = await gpu.computeGradients(batch, new Float32Array(gpu.paramCount), { buckets, onBucketReady: (k) => order.push(k) });
  const bucketsExact = firstDifference(tapped.grads, plain.grads) === -1 && [...order].sort((a, b) => a - b).every((k, i) => k === i) && order.length === buckets.length;
  const gpuBn = await gpu.getBatchNormStats();
  const gpuEval = await gpu.evaluate(evalBatch);
  const tolerance = forwardTolerance(gpu.arch, n);
  gpu.dispose();
  await tf.setBackend('cpu');
  try {
    const cpu = new ResNet(config, { seed: 99, referenceOps: true });
    cpu.setWeights(weights);
    const want = await cpu.computeGradients(batch);
    await cpu.computeGradients(batch); // the second training-mode pass, as on the GPU
    const cpuBn = await cpu.getBatchNormStats();
    const cpuEval = await cpu.evaluate(evalBatch);
    let referenceSensitivity = 0;
    for (let k = 0; k < perturbations; k++) {
      const moved = await cpu.computeGradients(perturbedByRounding(batch, 12345 + k));
      referenceSensitivity = Math.max(referenceSensitivity, relativeMaxDiff(moved.grads, want.grads) / (2 * tolerance));
    }
    cpu.dispose();
    return {
      config,
      batch: n,
      tolerance,
      loss: Math.abs(plain.loss - want.loss) / Math.abs(want.loss) / tolerance,
      grads: relativeMaxDiff(plain.grads, want.grads) / (2 * tolerance),
      bnStats: relativeMaxDiff(gpuBn, cpuBn) / tolerance,
      evalLoss: Math.abs(gpuEval.loss - cpuEval.loss) / Math.abs(cpuEval.loss) / tolerance,
      correctEqual: plain.correct === want.correct && gpuEval.correct === cpuEval.correct,
      bucketsExact,
      referenceSensitivity,
    };
  } finally {
    await tf.setBackend(gpuBackend);
  }
}

/** What label smoothing did to a model's gradient and losses (see labelSmoothingEffect). */
export interface LabelSmoothingEffect {
  /** Largest |measured - expected| shift of an fc bias gradient entry. */
  worstBiasShiftError: number;
  smoothedLossDiffers: boolean;
  /** Evaluation reports the plain cross-entropy whatever the smoothing. */
  evaluationLossEqual: boolean;
}

/**
 * Label smoothing e, as CrossEntropyLoss(label_smoothing=e): d loss / d logit = softmax - target
 * with target = (1 - e) one-hot + e / K. With the same weights and batch only the target differs,
 * so the fc bias gradient (the batch mean of d loss / d logit) moves by e x (class share - 1/K),
 * whatever the network computes. `make(ls)` builds the model (same seed) with smoothing ls.
 */
export async function labelSmoothingEffect(make: (labelSmoothing: number) => TrainableModel, e: number, batch: Batch): Promise<LabelSmoothingEffect> {
  const [plain, smooth] = [make(0), make(e)];
  try {
    const [a, b] = [await plain.computeGradients(batch), await smooth.computeGradients(batch)];
    const bias = plain.arch.params.find((p) => p.name === 'head.fc.bias')!;
    const classes = plain.config.classes;
    let worstBiasShiftError = 0;
    for (let k = 0; k < classes; k++) {
      const share = Array.from(batch.labels).filter((y) => y === k).length / batch.n;
      const shift = b.grads[bias.offset + k] - a.grads[bias.offset + k];
      worstBiasShiftError = Math.max(worstBiasShiftError, Math.abs(shift - e * (share - 1 / classes)));
    }
    return {
      worstBiasShiftError,
      smoothedLossDiffers: b.loss !== a.loss,
      evaluationLossEqual: (await smooth.evaluate(batch)).loss === (await plain.evaluate(batch)).loss,
    };
  } finally {
    plain.dispose();
    smooth.dispose();
  }
}
