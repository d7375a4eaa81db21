// The tutorial's ResNet in TensorFlow.js, and the seam that data-parallel training uses:
//   computeGradients(batch) -> loss, correct count, and ONE flat Float32Array of gradients
//   applyGradients(flat)    -> the optimiser step with (averaged) gradients
// Flat vectors follow Architecture.params order (definition order: stem, blocks, head; within
// a conv, weight then bias; within a BN, gamma then beta), TensorFlow layouts (conv weights
// [kh, kw, in, out], dense [in, out]). Every replica must use the same order: it is the
// contract of the all-reduce, like DDP's "parameters in the same order on every rank".

import * as tf from '@tensorflow/tfjs-core';
import { describeResNet, type Architecture, type BatchNormSpec, type ConvLayerSpec, type ResNetConfig } from './architecture.js';
import { conv2dReference, makeConv2d } from './conv.js';
import { makeRelu, makeTrainingBatchNorm, nativeBackend, referenceTrainingBatchNorm, type TrainingBatchNorm } from './native.js';
import { copyOut, readFlat, readScalar, readsSync, writeFlat } from './flat.js';
import { checkSgdOptions, Sgd, type SgdOptions } from './sgd.js';
import { checkBatch, type TrainableModel } from './model.js';

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
   * Label smoothing of the training loss, PyTorch's CrossEntropyLoss(label_smoothing=e): the
   * target is (1 - e) one-hot + e / classes. Evaluation reports the plain cross-entropy.
   */
  labelSmoothing?: number;
  /**
   * Plain TensorFlow.js ops and their built-in gradients everywhere (convolutions, ReLU,
   * BatchNorm): the reference the fast path is tested against; much slower.
   */
  referenceOps?: boolean;
}

/**
 * A contiguous run of parameters whose gradients the backward pass completes together: one
 * all-reduce of floats [from, to) of the flat gradient (PyTorch DDP's buckets).
 */
export interface GradientBucket {
  /** Parameters [firstParam, endParam) of Architecture.params. */
  firstParam: number;
  endParam: number;
  /** Their floats in the flat gradient. */
  from: number;
  to: number;
}

/**
 * Splits the flat gradient into buckets of at least `bucketBytes` (whole tensors; the stem's may
 * be smaller), in the order the backward pass completes them: it runs from the head back to the
 * stem, so bucket 0 holds the last parameters. As with DDP, the first bucket to be ready can
 * start its all-reduce while the backward pass still works on the earlier layers.
 */
/** Refuses a label smoothing outside [0, 1) (PyTorch allows 1, whose target carries no label). */
export function checkLabelSmoothing(e: number): number {
  if (!(Number.isFinite(e) && e >= 0 && e < 1)) throw new RangeError(`label smoothing must be in [0, 1), got ${e}`);
  return e;
}

export function gradientBuckets(arch: Architecture, bucketBytes: number): GradientBucket[] {
  if (!(bucketBytes >= 4)) throw new RangeError(`bucket size must be at least 4 bytes, got ${bucketBytes}`);
  const limit = bucketBytes / 4;
  const buckets: GradientBucket[] = [];
  let end = arch.params.length;
  while (end > 0) {
    // As DDP: a bucket takes tensors until it holds at least the limit, so a small tensor next to
    // a large one rides with it instead of costing an all-reduce of its own.
    let first = end - 1;
    let floats = arch.params[first].size;
    while (first > 0 && floats < limit) floats += arch.params[--first].size;
    buckets.push({ firstParam: first, endParam: end, from: arch.params[first].offset, to: arch.params[end - 1].offset + arch.params[end - 1].size });
    end = first;
  }
  return buckets;
}

/** What computeGradients reports while the backward pass runs. */
export interface GradientReadiness {
  /** From gradientBuckets(arch, ...). */
  buckets: readonly GradientBucket[];
  /**
   * Called once per bucket as soon as its floats of the output are final: on the CPU inside the
   * backward pass; on WebGPU when the bucket's read from the GPU lands, while the GPU still works
   * on the earlier layers (buckets the backward pass did not complete are reported after it).
   */
  onBucketReady: (index: number) => void;
}

let instanceCounter = 0;

type ConvFn = (x: tf.Tensor4D, w: tf.Tensor4D) => tf.Tensor4D;

export class ResNet implements TrainableModel {
  readonly engine = 'tfjs';
  readonly gradientLayout = 'tensorflow';
  readonly arch: Architecture;
  readonly config: ResNetConfig;
  readonly optimizer: Sgd;
  readonly labelSmoothing: number;
  private readonly vars: tf.Variable[];
  private readonly byName = new Map<string, tf.Variable>();
  private readonly runningMean = new Map<string, tf.Variable>();
  private readonly runningVar = new Map<string, tf.Variable>();
  private readonly convs = new Map<string, ConvFn>();
  private readonly relu: (x: tf.Tensor4D) => tf.Tensor4D;
  private readonly trainingBn = new Map<string, TrainingBatchNorm>();
  /** Identity ops whose gradient function hands each parameter's gradient to `tapSink`. */
  private readonly taps: Array<(v: tf.Tensor) => tf.Tensor>;
  private tapSink: ((param: number, grad: tf.Tensor) => void) | undefined;
  private readonly paramIndex = new Map<string, number>();

  constructor(config: ResNetConfig, options: ResNetOptions = {}) {
    this.arch = describeResNet(config);
    this.config = config;
    this.labelSmoothing = checkLabelSmoothing(options.labelSmoothing ?? 0);
    if (options.sgd) checkSgdOptions(options.sgd);
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
    // The hand-written convolution gradients (conv.ts) work around TensorFlow's slow CPU kernels;
    // elsewhere (WebGPU) the backend's own Conv2DBackpropInput/Filter kernels are used, unmeasured
    // against the alternatives until a real GPU run says otherwise.
    const customConvGrads = !options.referenceOps && nativeBackend() !== undefined;
    for (const c of convSpecs) {
      const spec = { kernel: c.kernel, stride: c.stride, padding: c.padding, inputGrad: c !== this.arch.stemConv };
      this.convs.set(
        c.name,
        customConvGrads ? makeConv2d(spec) : (x, w) => conv2dReference(x, w, spec),
      );
    }
    this.relu = options.referenceOps ? (x) => tf.relu(x) : makeRelu();
    for (const bn of this.arch.batchNorms) {
      this.trainingBn.set(bn.name, options.referenceOps ? referenceTrainingBatchNorm(bn.eps) : makeTrainingBatchNorm(bn.eps));
    }
    this.optimizer = new Sgd(this.vars, options.sgd ?? { lr: 0.01 });
    this.arch.params.forEach((p, i) => this.paramIndex.set(p.name, i));
    this.taps = this.arch.params.map((_, i) =>
      tf.customGrad((...args: Array<tf.Tensor | tf.GradSaveFunc>) => {
        const x = args[0] as tf.Tensor;
        return {
          value: tf.clone(x),
          gradFunc: (dy: tf.Tensor) => {
            this.tapSink?.(i, dy);
            return dy;
          },
        };
      }) as unknown as (v: tf.Tensor) => tf.Tensor,
    );
  }

  /**
   * A parameter as the forward pass reads it. While computeGradients reports buckets, it goes
   * through an identity whose gradient function sees the parameter's finished gradient: each
   * parameter is read once, so its gradient is complete when the backward pass reaches its read.
   */
  private param(name: string): tf.Tensor {
    const v = this.byName.get(name)!;
    return this.tapSink === undefined ? v : this.taps[this.paramIndex.get(name)!](v);
  }

  get paramCount(): number {
    return this.arch.paramCount;
  }

  // ---- forward ---------------------------------------------------------------------------

  private conv(spec: ConvLayerSpec, x: tf.Tensor4D): tf.Tensor4D {
    const y = this.convs.get(spec.name)!(x, this.param(`${spec.name}.weight`) as tf.Tensor4D);
    return spec.bias ? tf.add(y, this.param(`${spec.name}.bias`)) : y;
  }

  private batchNorm(spec: BatchNormSpec, x: tf.Tensor4D, training: boolean): tf.Tensor4D {
    const gamma = this.param(`${spec.name}.gamma`) as tf.Tensor1D;
    const beta = this.param(`${spec.name}.beta`) as tf.Tensor1D;
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
    return tf.add(tf.matMul(pooled, this.param('head.fc.weight') as tf.Tensor2D), this.param('head.fc.bias'));
  }

  private inputs(batch: Batch): { x: tf.Tensor4D; y: tf.Tensor1D } {
    checkBatch(this.config, batch);
    const s = this.config.imageSize;
    const labels = batch.labels instanceof Int32Array ? batch.labels : Int32Array.from(batch.labels);
    return { x: tf.tensor4d(batch.images, [batch.n, s, s, this.config.inChannels]), y: tf.tensor1d(labels, 'int32') };
  }

  private lossAndCorrect(logits: tf.Tensor2D, y: tf.Tensor1D, labelSmoothing = 0): { loss: tf.Scalar; correct: tf.Scalar } {
    const loss = tf.losses.softmaxCrossEntropy(tf.oneHot(y, this.config.classes), logits, undefined, labelSmoothing) as tf.Scalar;
    const correct = tf.sum(tf.cast(tf.equal(tf.argMax(logits, 1), y), 'int32')) as tf.Scalar;
    return { loss, correct };
  }

  // ---- the data-parallel seam ------------------------------------------------------------

  /**
   * Forward and backward on one batch (BatchNorm in training mode). Writes the gradients of
   * the mean loss into `out` (allocated when omitted) in Architecture.params order.
   */
  async computeGradients(batch: Batch, out?: Float32Array, readiness?: GradientReadiness): Promise<StepResult & { grads: Float32Array }> {
    const grads = out ?? new Float32Array(this.arch.paramCount);
    if (grads.length !== this.arch.paramCount) throw new RangeError(`gradient buffer has ${grads.length} floats, the model ${this.arch.paramCount}`);
    const tracker = readiness === undefined ? undefined : new ReadinessTracker(this.arch, grads, readiness, readsSync());
    this.tapSink = tracker === undefined ? undefined : (i, g) => tracker.deliver(i, g);
    let kept: tf.Tensor[] = [];
    try {
      // The loss, the correct count and (without buckets) the gradients outlive the tidy scope.
      kept = tf.tidy(() => {
        const { x, y } = this.inputs(batch);
        let correctT: tf.Scalar | undefined;
        const { value, grads: g } = tf.variableGrads(() => {
          const r = this.lossAndCorrect(this.forward(x, true), y, this.labelSmoothing);
          correctT = tf.keep(r.correct);
          return r.loss;
        }, this.vars);
        if (tracker === undefined) return [value, correctT!, ...this.vars.map((v) => g[v.name])];
        tracker.finish((i) => g[this.vars[i].name]);
        return [value, correctT!];
      });
      this.tapSink = undefined;
      if (tracker === undefined) await copyOut(kept.slice(2), grads);
      else await tracker.settled();
      const [loss, correct] = [await readScalar(kept[0]), await readScalar(kept[1])];
      return { loss, correct, grads };
    } finally {
      this.tapSink = undefined;
      tf.dispose(kept);
      if (tracker !== undefined) await tracker.dispose();
    }
  }

  /** One optimiser step with `grads` (already averaged across replicas, if distributed). */
  applyGradients(grads: Float32Array): void {
    if (grads.length !== this.arch.paramCount) throw new RangeError(`gradient vector has ${grads.length} floats, the model ${this.arch.paramCount}`);
    this.optimizer.step(grads);
  }

  /** Loss and correct count in evaluation mode (BatchNorm with running statistics). */
  async evaluate(batch: Batch): Promise<StepResult> {
    const [loss, correct] = tf.tidy(() => {
      const { x, y } = this.inputs(batch);
      const r = this.lossAndCorrect(this.forward(x, false), y);
      return [r.loss, r.correct];
    });
    try {
      return { loss: await readScalar(loss), correct: await readScalar(correct) };
    } finally {
      tf.dispose([loss, correct]);
    }
  }

  /** Class predictions in evaluation mode. */
  async predict(batch: Omit<Batch, 'labels'>): Promise<Int32Array> {
    const classes = tf.tidy(() => {
      const s = this.config.imageSize;
      const x = tf.tensor4d(batch.images, [batch.n, s, s, this.config.inChannels]);
      return tf.argMax(this.forward(x, false), 1);
    });
    try {
      return Int32Array.from(await classes.data());
    } finally {
      classes.dispose();
    }
  }

  // ---- state as flat vectors (broadcast, checkpoints) ------------------------------------

  getWeights(): Promise<Float32Array> {
    return readFlat(this.vars);
  }

  setWeights(flat: Float32Array): void {
    writeFlat(this.vars, flat, 'weights');
  }

  private bnStatVars(): tf.Variable[] {
    return this.arch.batchNorms.flatMap((bn) => [this.runningMean.get(bn.name)!, this.runningVar.get(bn.name)!]);
  }

  /** Running mean and variance of every BatchNorm, in Architecture.batchNorms order. */
  getBatchNormStats(): Promise<Float32Array> {
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

/**
 * computeGradients' bookkeeping of which parameters' gradients are in, per bucket. A gradient is
 * kept as a tensor until its bucket is complete, then the bucket is read in one go: one wait per
 * bucket (not per tensor) keeps the backward pass streaming. On the CPU the read is synchronous,
 * inside the backward pass; on WebGPU it is started there and lands while the GPU goes on.
 */
class ReadinessTracker {
  private readonly held: (tf.Tensor | undefined)[];
  private readonly delivered: Uint8Array;
  private readonly missing: number[];
  private readonly fired: Uint8Array;
  private readonly bucketOf: Int32Array;
  /** WebGPU: the reads in flight, in the order they were started. */
  private readonly reads: Promise<void>[] = [];

  constructor(
    private readonly arch: Architecture,
    private readonly out: Float32Array,
    private readonly r: GradientReadiness,
    private readonly sync: boolean,
  ) {
    this.held = new Array(arch.params.length);
    this.delivered = new Uint8Array(arch.params.length);
    this.fired = new Uint8Array(r.buckets.length);
    this.bucketOf = new Int32Array(arch.params.length).fill(-1);
    this.missing = r.buckets.map((b, k) => {
      for (let i = b.firstParam; i < b.endParam; i++) this.bucketOf[i] = k;
      return b.endParam - b.firstParam;
    });
  }

  deliver(param: number, grad: tf.Tensor): void {
    if (this.delivered[param]) return;
    this.delivered[param] = 1;
    // The engine owns `grad`; a kept clone (same data, no copy) outlives the gradient scope.
    this.held[param] = tf.keep(tf.clone(grad));
    const k = this.bucketOf[param];
    if (k < 0) this.read([param], () => undefined);
    else if (--this.missing[k] === 0) this.complete(k);
  }

  /** After the backward pass: any gradient not seen yet, then every bucket not reported yet. */
  finish(gradOf: (param: number) => tf.Tensor): void {
    for (let i = 0; i < this.delivered.length; i++) if (!this.delivered[i]) this.deliver(i, gradOf(i));
    for (let k = 0; k < this.fired.length; k++) if (!this.fired[k]) this.complete(k);
  }

  /** Resolves when every bucket is in the output and reported (rejects with the first failed read). */
  async settled(): Promise<void> {
    await Promise.all(this.reads);
  }

  /** Waits for reads in flight, then drops gradients still held (computeGradients failed half-way). */
  async dispose(): Promise<void> {
    await Promise.allSettled(this.reads);
    for (const t of this.held) t?.dispose();
    this.held.fill(undefined);
  }

  private complete(k: number): void {
    this.fired[k] = 1;
    const b = this.r.buckets[k];
    const params: number[] = [];
    for (let i = b.firstParam; i < b.endParam; i++) if (this.held[i] !== undefined) params.push(i);
    this.read(params, () => this.r.onBucketReady(k));
  }

  /** Copies the held gradients of `params` into the output, then calls `then`. */
  private read(params: number[], then: () => void): void {
    const land = (i: number, data: Float32Array) => {
      this.out.set(data, this.arch.params[i].offset);
      this.held[i]!.dispose();
      this.held[i] = undefined;
    };
    if (this.sync) {
      for (const i of params) land(i, this.held[i]!.dataSync() as Float32Array);
      then();
      return;
    }
    const pending = Promise.all(params.map((i) => this.held[i]!.data() as Promise<Float32Array>)).then((parts) => {
      params.forEach((i, j) => land(i, parts[j]));
      then();
    });
    pending.catch(() => undefined); // handled in settled(); not an unhandled rejection meanwhile
    this.reads.push(pending);
  }
}
