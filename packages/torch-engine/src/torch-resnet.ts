// The tutorial's ResNet on the libtorch engine, behind core's TrainableModel seam: the trainer,
// the all-reduce, checkpoints and resume use it exactly as the TensorFlow.js ResNet.

import os from 'node:os';
import {
  checkBatch,
  checkLabelSmoothing,
  checkSgdOptions,
  describeResNet,
  type Architecture,
  type Batch,
  type GradientBucket,
  type GradientReadiness,
  type ResNetConfig,
  type SgdOptions,
  type StepResult,
  type TrainableModel,
  type TrainableOptimizer,
} from '@dtrain/core';
import { loadAddon, type NativeEngine } from './addon.js';
import { nativeNetSpec } from './spec.js';

export const PRECISIONS = ['fp32', 'tf32', 'bf16'] as const;
export type Precision = (typeof PRECISIONS)[number];

export interface TorchResNetOptions {
  /** Seed of the initial weights: same seed, same weights (on this engine; the TensorFlow.js ResNet draws others). */
  seed?: number;
  sgd?: SgdOptions;
  /** Label smoothing of the training loss, as core's ResNetOptions (evaluation reports the plain cross-entropy). */
  labelSmoothing?: number;
  /** 'cpu' or 'cuda[:i]'. */
  device?: string;
  /** CPU intra-op threads; default: OMP_NUM_THREADS, else this machine's cores / `localWorkers`. */
  threads?: number;
  /** Workers of this run on this machine (LOCAL_WORLD_SIZE), who share its cores. */
  localWorkers?: number;
  /**
   * fp32: float32 everywhere (on CUDA, TF32 off); tf32: PyTorch's default on CUDA (TF32 cuDNN
   * convolutions); bf16: autocast (bf16 convolutions and matmuls; float32 weights, BatchNorm, loss).
   */
  precision?: Precision;
  /** Activations and conv weights in channels-last memory (NHWC), as PyTorch users run for speed on GPUs. */
  channelsLast?: boolean;
}

/** The labels as the engine reads them (int32). */
function int32Labels(batch: Batch): Int32Array {
  return batch.labels instanceof Int32Array ? batch.labels : Int32Array.from(batch.labels);
}

/** CPU threads per worker: OMP_NUM_THREADS if set (as torchrun users set it), else cores / local workers. */
export function defaultThreads(localWorkers = 1): number {
  const env = Number(process.env.OMP_NUM_THREADS);
  if (Number.isInteger(env) && env > 0) return env;
  return Math.max(1, Math.floor(os.availableParallelism() / Math.max(1, localWorkers)));
}

class TorchSgd implements TrainableOptimizer {
  lr: number;
  readonly momentum: number;
  readonly weightDecay: number;
  readonly nesterov: boolean;
  readonly skipNormBiasDecay: boolean;
  steps = 0;

  constructor(
    private readonly engine: NativeEngine,
    private readonly paramCount: number,
    options: Required<SgdOptions>,
  ) {
    this.lr = options.lr;
    this.momentum = options.momentum;
    this.weightDecay = options.weightDecay;
    this.nesterov = options.nesterov;
    this.skipNormBiasDecay = options.skipNormBiasDecay;
  }

  step(grads: Float32Array): void {
    this.engine.apply(grads, this.lr, this.steps === 0);
    this.steps++;
  }

  async getState(): Promise<{ steps: number; buffers: Float32Array }> {
    if (this.momentum === 0) return { steps: this.steps, buffers: new Float32Array(0) };
    const buffers = new Float32Array(this.paramCount);
    this.engine.read('momentum', buffers);
    return { steps: this.steps, buffers };
  }

  setState(state: { steps: number; buffers: Float32Array }): void {
    const size = this.momentum > 0 ? this.paramCount : 0;
    if (state.buffers.length !== size) throw new RangeError(`SGD state: expected ${size} floats of momentum buffers, got ${state.buffers.length}`);
    if (size > 0) this.engine.write('momentum', state.buffers);
    this.steps = state.steps;
  }
}

export class TorchResNet implements TrainableModel {
  readonly engine = 'torch';
  readonly gradientLayout: string;
  readonly arch: Architecture;
  readonly config: ResNetConfig;
  readonly optimizer: TorchSgd;
  /** E.g. "cpu (2 threads, fp32, NCHW)". */
  readonly device: string;
  private readonly native: NativeEngine;
  private bucketsSeen: readonly GradientBucket[] | undefined;
  private bucketOf: Int32Array | undefined;

  constructor(config: ResNetConfig, options: TorchResNetOptions = {}) {
    this.arch = describeResNet(config);
    this.config = config;
    const { Engine } = loadAddon();
    const channelsLast = options.channelsLast ?? false;
    const given = options.sgd ?? { lr: 0.01 };
    checkSgdOptions(given);
    const sgd = { momentum: 0, weightDecay: 0, nesterov: false, skipNormBiasDecay: false, ...given };
    this.native = new Engine(nativeNetSpec(this.arch), {
      device: options.device ?? 'cpu',
      threads: options.threads ?? defaultThreads(options.localWorkers),
      precision: options.precision ?? 'fp32',
      channelsLast,
      seed: options.seed ?? 0,
      sgd,
      labelSmoothing: checkLabelSmoothing(options.labelSmoothing ?? 0),
    });
    this.gradientLayout = channelsLast ? 'pytorch-channels-last' : 'pytorch';
    this.device = this.native.describe();
    this.optimizer = new TorchSgd(this.native, this.arch.paramCount, sgd);
  }

  get paramCount(): number {
    return this.arch.paramCount;
  }

  async computeGradients(batch: Batch, out?: Float32Array, readiness?: GradientReadiness): Promise<StepResult & { grads: Float32Array }> {
    checkBatch(this.config, batch);
    const grads = out ?? new Float32Array(this.arch.paramCount);
    if (grads.length !== this.arch.paramCount) throw new RangeError(`gradient buffer has ${grads.length} floats, the model ${this.arch.paramCount}`);
    const labels = int32Labels(batch);
    const bucketOf = readiness === undefined ? null : this.bucketIndex(readiness.buckets);
    const onBucket = readiness === undefined ? null : (k: number) => readiness.onBucketReady(k);
    const r = await this.native.step(batch.images, labels, batch.n, grads, bucketOf, onBucket);
    return { loss: r.loss, correct: r.correct, grads };
  }

  /** Parameter -> bucket, for the engine to count each bucket's missing gradients. */
  private bucketIndex(buckets: readonly GradientBucket[]): Int32Array {
    if (this.bucketsSeen !== buckets) {
      const of = new Int32Array(this.arch.params.length).fill(-1);
      buckets.forEach((b, k) => of.fill(k, b.firstParam, b.endParam));
      this.bucketsSeen = buckets;
      this.bucketOf = of;
    }
    return this.bucketOf!;
  }

  applyGradients(grads: Float32Array): void {
    if (grads.length !== this.arch.paramCount) throw new RangeError(`gradient vector has ${grads.length} floats, the model ${this.arch.paramCount}`);
    this.optimizer.step(grads);
  }

  async trainStep(batch: Batch): Promise<StepResult> {
    checkBatch(this.config, batch);
    const labels = int32Labels(batch);
    const o = this.optimizer;
    const r = await this.native.trainStep(batch.images, labels, batch.n, o.lr, o.steps === 0);
    if (Number.isFinite(r.loss)) o.steps++;
    return r;
  }

  async evaluate(batch: Batch): Promise<StepResult> {
    checkBatch(this.config, batch);
    const labels = int32Labels(batch);
    return this.native.evaluate(batch.images, labels, batch.n);
  }

  predict(batch: Omit<Batch, 'labels'>): Promise<Int32Array> {
    checkBatch(this.config, batch);
    return this.native.predict(batch.images, batch.n);
  }

  async getWeights(): Promise<Float32Array> {
    return this.readState('weights', this.arch.paramCount);
  }

  setWeights(flat: Float32Array): void {
    this.writeState('weights', flat, this.arch.paramCount);
  }

  async getBatchNormStats(): Promise<Float32Array> {
    return this.readState('bnStats', this.arch.bnStatCount);
  }

  setBatchNormStats(flat: Float32Array): void {
    this.writeState('bnStats', flat, this.arch.bnStatCount);
  }

  dispose(): void {
    this.native.close();
  }

  private readState(what: 'weights' | 'bnStats', size: number): Float32Array {
    const out = new Float32Array(size);
    this.native.read(what, out);
    return out;
  }

  private writeState(what: 'weights' | 'bnStats', flat: Float32Array, size: number): void {
    const name = what === 'weights' ? 'weights' : 'BatchNorm statistics';
    if (flat.length !== size) throw new RangeError(`${name}: expected ${size} floats, got ${flat.length}`);
    this.native.write(what, flat);
  }
}
