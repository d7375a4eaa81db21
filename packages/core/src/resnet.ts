// The tutorial's ResNet in TensorFlow.js, and the seam that data-parallel training uses:
//   computeGradients(batch) -> loss, correct count, and ONE flat Float32Array of gradients
//   applyGradients(flat)    -> the optimiser step with (averaged) gradients
// Flat vectors follow Architecture.params order (definition order: stem, blocks, head; within
// a conv, weight then bias; within a BN, gamma then beta), TensorFlow layouts (conv weights
// [kh, kw, in, out], dense [in, out]). Every replica must use the same order: it is the
// contract of the all-reduce, like DDP's "parameters in the same order on every rank".

import * as tf from '@tensorflow/tfjs-core';
import { describeResNet, type Architecture, type BatchNormSpec, type ConvLayerSpec, type ResNetConfig } from './architecture.js';
import { makeConv2d } from './conv.js';
import { makeRelu, makeTrainingBatchNorm, referenceTrainingBatchNorm, type TrainingBatchNorm } from './native.js';
import { copyOut, readFlat, writeFlat } from './flat.js';
import { Sgd, type SgdOptions } from './sgd.js';

/** PyTorch's BatchNorm momentum: running = (1 - m) * running + m * batch statistic. */
export const BN_MOMENTUM = 0.1;

export interface Batch {
  /** Images, channels last: [n, imageSize, imageSize, inChannels], already normalised. */
  images: Float32Array;
  labels: Int32Array | Uint8Array;
  n: number;
}

export interface StepResult {
  /** Mean cross-entropy over the batch. */
  loss: number;
  /** Number of correctly classified images in the batch. */
  correct: number;
}

export interface ResNetOptions {
  /** Seed of the initial weights; same seed, same weights. */
  seed?: number;
  sgd?: SgdOptions;
  /**
   * Plain TensorFlow.js ops and their built-in gradients everywhere (convolutions, ReLU,
   * BatchNorm): the reference the fast path is tested against; much slower.
   */
  referenceOps?: boolean;
}

let instanceCounter = 0;

type ConvFn = (x: tf.Tensor4D, w: tf.Tensor4D) => tf.Tensor4D;

export class ResNet {
  readonly arch: Architecture;
  readonly config: ResNetConfig;
  readonly optimizer: Sgd;
  private readonly vars: tf.Variable[];
  private readonly byName = new Map<string, tf.Variable>();
  private readonly runningMean = new Map<string, tf.Variable>();
  private readonly runningVar = new Map<string, tf.Variable>();
  private readonly convs = new Map<string, ConvFn>();
  private readonly relu: (x: tf.Tensor4D) => tf.Tensor4D;
  private readonly trainingBn = new Map<string, TrainingBatchNorm>();

  constructor(config: ResNetConfig, options: ResNetOptions = {}) {
    this.arch = describeResNet(config);
    this.config = config;
    // tfjs variable names are process-global: each instance gets its own prefix.
    const prefix = `resnet${instanceCounter++}`;
    const seed = options.seed ?? 0;
    this.vars = this.arch.params.map((p, i) => {
      const init = tf.tidy(() => {
        if (p.init === 'zeros') return tf.zeros(p.shape);
        if (p.init === 'ones') return tf.ones(p.shape);
        const limit = Math.sqrt(6 / (p.fanIn! + p.fanOut!));
        return tf.randomUniform(p.shape, -limit, limit, 'float32', seed * 1000 + i);
      });
      const v = tf.variable(init, true, `${prefix}/${p.name}`);
      init.dispose();
      this.byName.set(p.name, v);
      return v;
    });
    for (const bn of this.arch.batchNorms) {
      this.runningMean.set(bn.name, tf.variable(tf.zeros([bn.channels]), false, `${prefix}/${bn.name}.running_mean`));
      this.runningVar.set(bn.name, tf.variable(tf.ones([bn.channels]), false, `${prefix}/${bn.name}.running_var`));
    }
    const convSpecs = [this.arch.stemConv, ...this.arch.blocks.flatMap((b) => [b.conv1, b.conv2, ...(b.shortcut ? [b.shortcut] : [])])];
    for (const c of convSpecs) {
      const spec = { kernel: c.kernel, stride: c.stride, padding: c.padding, inputGrad: c !== this.arch.stemConv };
      this.convs.set(
        c.name,
        options.referenceOps
          ? (x, w) => {
              const xp = c.padding > 0 ? tf.pad(x, [[0, 0], [c.padding, c.padding], [c.padding, c.padding], [0, 0]]) : x;
              return tf.conv2d(xp, w, c.stride, 'valid');
            }
          : makeConv2d(spec),
      );
    }
    this.relu = options.referenceOps ? (x) => tf.relu(x) : makeRelu();
    for (const bn of this.arch.batchNorms) {
      this.trainingBn.set(bn.name, options.referenceOps ? referenceTrainingBatchNorm(bn.eps) : makeTrainingBatchNorm(bn.eps));
    }
    this.optimizer = new Sgd(this.vars, options.sgd ?? { lr: 0.01 });
  }

  get paramCount(): number {
    return this.arch.paramCount;
  }

  // ---- forward ---------------------------------------------------------------------------

  private conv(spec: ConvLayerSpec, x: tf.Tensor4D): tf.Tensor4D {
    const y = this.convs.get(spec.name)!(x, this.byName.get(`${spec.name}.weight`)! as tf.Tensor4D);
    return spec.bias ? tf.add(y, this.byName.get(`${spec.name}.bias`)!) : y;
  }

  private batchNorm(spec: BatchNormSpec, x: tf.Tensor4D, training: boolean): tf.Tensor4D {
    const gamma = this.byName.get(`${spec.name}.gamma`)! as tf.Tensor1D;
    const beta = this.byName.get(`${spec.name}.beta`)! as tf.Tensor1D;
    const rm = this.runningMean.get(spec.name)!;
    const rv = this.runningVar.get(spec.name)!;
    if (!training) return tf.batchNorm(x, rm as tf.Tensor1D, rv as tf.Tensor1D, beta, gamma, spec.eps);
    const { y, stats } = this.trainingBn.get(spec.name)!(x, gamma, beta);
    // Running statistics as PyTorch keeps them (the variance is the unbiased estimate). These ops
    // sit on the gradient tape but lead to no loss, so no gradient flows through them.
    tf.tidy(() => {
      rm.assign(tf.add(tf.mul(rm, 1 - BN_MOMENTUM), tf.mul(stats.mean, BN_MOMENTUM)));
      rv.assign(tf.add(tf.mul(rv, 1 - BN_MOMENTUM), tf.mul(stats.unbiasedVariance, BN_MOMENTUM)));
    });
    tf.dispose([stats.mean, stats.unbiasedVariance]);
    return y;
  }

  /** Logits [n, classes]. In training mode BatchNorm uses batch statistics and updates its running ones. */
  forward(images: tf.Tensor4D, training: boolean): tf.Tensor2D {
    const a = this.arch;
    const relu = this.relu;
    let x = relu(this.batchNorm(a.stemBn, this.conv(a.stemConv, images), training));
    // MaxPool(3, 2, padding 1): after ReLU every value is >= 0, so zero padding is the same as
    // PyTorch's -inf padding, and explicit padding keeps PyTorch's alignment on even sizes.
    x = tf.maxPool(tf.pad(x, [[0, 0], [1, 1], [1, 1], [0, 0]]), 3, 2, 'valid') as tf.Tensor4D;
    for (const b of a.blocks) {
      let y = relu(this.batchNorm(b.bn1, this.conv(b.conv1, x), training));
      y = relu(this.batchNorm(b.bn2, this.conv(b.conv2, y), training));
      const shortcut = b.shortcut ? this.conv(b.shortcut, x) : x;
      x = relu(tf.add(y, shortcut) as tf.Tensor4D);
    }
    const pooled = tf.mean(x, [1, 2]) as tf.Tensor2D;
    return tf.add(tf.matMul(pooled, this.byName.get('head.fc.weight')! as tf.Tensor2D), this.byName.get('head.fc.bias')!);
  }

  private inputs(batch: Batch): { x: tf.Tensor4D; y: tf.Tensor1D } {
    const s = this.config.imageSize;
    const expected = batch.n * s * s * this.config.inChannels;
    if (batch.images.length !== expected || batch.labels.length !== batch.n) {
      throw new RangeError(
        `batch: expected ${batch.n} images of ${s}x${s}x${this.config.inChannels} (${expected} floats) and ${batch.n} labels, ` +
          `got ${batch.images.length} floats and ${batch.labels.length} labels`,
      );
    }
    const labels = batch.labels instanceof Int32Array ? batch.labels : Int32Array.from(batch.labels);
    return { x: tf.tensor4d(batch.images, [batch.n, s, s, this.config.inChannels]), y: tf.tensor1d(labels, 'int32') };
  }

  private lossAndCorrect(logits: tf.Tensor2D, y: tf.Tensor1D): { loss: tf.Scalar; correct: tf.Scalar } {
    const loss = tf.losses.softmaxCrossEntropy(tf.oneHot(y, this.config.classes), logits) as tf.Scalar;
    const correct = tf.sum(tf.cast(tf.equal(tf.argMax(logits, 1), y), 'int32')) as tf.Scalar;
    return { loss, correct };
  }

  // ---- the data-parallel seam ------------------------------------------------------------

  /**
   * Forward and backward on one batch (BatchNorm in training mode). Writes the gradients of
   * the mean loss into `out` (allocated when omitted) in Architecture.params order.
   */
  computeGradients(batch: Batch, out?: Float32Array): StepResult & { grads: Float32Array } {
    const grads = out ?? new Float32Array(this.arch.paramCount);
    if (grads.length !== this.arch.paramCount) throw new RangeError(`gradient buffer has ${grads.length} floats, the model ${this.arch.paramCount}`);
    let correct = 0;
    const loss = tf.tidy(() => {
      const { x, y } = this.inputs(batch);
      let correctT: tf.Scalar | undefined;
      const { value, grads: g } = tf.variableGrads(() => {
        const r = this.lossAndCorrect(this.forward(x, true), y);
        correctT = tf.keep(r.correct);
        return r.loss;
      }, this.vars);
      correct = correctT!.dataSync()[0];
      correctT!.dispose();
      copyOut(this.vars.map((v) => g[v.name]), grads);
      return value.dataSync()[0];
    });
    return { loss, correct, grads };
  }

  /** One optimiser step with `grads` (already averaged across replicas, if distributed). */
  applyGradients(grads: Float32Array): void {
    if (grads.length !== this.arch.paramCount) throw new RangeError(`gradient vector has ${grads.length} floats, the model ${this.arch.paramCount}`);
    this.optimizer.step(grads);
  }

  /** Loss and correct count in evaluation mode (BatchNorm with running statistics). */
  evaluate(batch: Batch): StepResult {
    return tf.tidy(() => {
      const { x, y } = this.inputs(batch);
      const { loss, correct } = this.lossAndCorrect(this.forward(x, false), y);
      return { loss: loss.dataSync()[0], correct: correct.dataSync()[0] };
    });
  }

  /** Class predictions in evaluation mode. */
  predict(batch: Omit<Batch, 'labels'>): Int32Array {
    return tf.tidy(() => {
      const s = this.config.imageSize;
      const x = tf.tensor4d(batch.images, [batch.n, s, s, this.config.inChannels]);
      return tf.argMax(this.forward(x, false), 1).dataSync() as Int32Array;
    });
  }

  // ---- state as flat vectors (broadcast, checkpoints) ------------------------------------

  getWeights(): Float32Array {
    return readFlat(this.vars);
  }

  setWeights(flat: Float32Array): void {
    writeFlat(this.vars, flat, 'weights');
  }

  private bnStatVars(): tf.Variable[] {
    return this.arch.batchNorms.flatMap((bn) => [this.runningMean.get(bn.name)!, this.runningVar.get(bn.name)!]);
  }

  /** Running mean and variance of every BatchNorm, in Architecture.batchNorms order. */
  getBatchNormStats(): Float32Array {
    return readFlat(this.bnStatVars());
  }

  setBatchNormStats(flat: Float32Array): void {
    writeFlat(this.bnStatVars(), flat, 'BatchNorm statistics');
  }

  dispose(): void {
    tf.dispose([...this.vars, ...this.runningMean.values(), ...this.runningVar.values()]);
    this.optimizer.dispose();
  }
}
