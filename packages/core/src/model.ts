// The seam between training and whatever computes the network: "a model that trains". The
// TensorFlow.js ResNet (resnet.ts) and the libtorch engine (@dtrain/torch-engine) implement it;
// the trainer, the all-reduce, checkpoints and resume see only this.
//
// Flat vectors follow Architecture.params order. Weights, momentum and BatchNorm statistics are
// read and written in TensorFlow's layouts (conv [kh, kw, in, out], dense [in, out]): the
// checkpoint format, so a checkpoint of one engine resumes on the other. The flat gradient has
// the same tensors at the same offsets (so the same buckets), each in the engine's own layout
// (`gradientLayout`): the all-reduce only sums it, and every rank of a run uses one engine.

import type { Architecture, ResNetConfig } from './architecture.js';
import type { Batch, GradientReadiness, StepResult } from './resnet.js';

/** The optimiser as the trainer drives it (the schedule sets `lr` before each step). */
export interface TrainableOptimizer {
  lr: number;
  readonly momentum: number;
  readonly weightDecay: number;
  readonly nesterov: boolean;
  /** Weight decay skips biases and BatchNorm scale and shift. */
  readonly skipNormBiasDecay: boolean;
  /** Steps taken; 0 means the momentum buffers are still empty. */
  readonly steps: number;
  /** Momentum buffers as one flat vector, TensorFlow layouts (empty without momentum). */
  getState(): Promise<{ steps: number; buffers: Float32Array }>;
  setState(state: { steps: number; buffers: Float32Array }): void;
}

export interface TrainableModel {
  /** Which engine computes it: 'tfjs' or 'torch'. */
  readonly engine: string;
  /**
   * How each tensor of the flat gradient is laid out: 'tensorflow' (the weights' layout) or, for
   * the libtorch engine, 'pytorch' / 'pytorch-channels-last' (conv weights [out, in, kh, kw]).
   */
  readonly gradientLayout: string;
  readonly arch: Architecture;
  readonly config: ResNetConfig;
  readonly paramCount: number;
  readonly optimizer: TrainableOptimizer;
  /** Forward and backward (BatchNorm in training mode); gradients of the mean loss into `out`. */
  computeGradients(batch: Batch, out?: Float32Array, readiness?: GradientReadiness): Promise<StepResult & { grads: Float32Array }>;
  /** One optimiser step with `grads` (averaged across replicas, if distributed; `gradientLayout`). */
  applyGradients(grads: Float32Array): void;
  /**
   * Optional: computeGradients then applyGradients with the gradient kept inside the engine, for a
   * process that trains alone (no all-reduce needs it): no copy of the gradient out and back in
   * (on a GPU, none through the host). A non-finite loss leaves the weights as they were.
   */
  trainStep?(batch: Batch): Promise<StepResult>;
  /** Loss and correct count in evaluation mode (BatchNorm with running statistics). */
  evaluate(batch: Batch): Promise<StepResult>;
  predict(batch: Omit<Batch, 'labels'>): Promise<Int32Array>;
  getWeights(): Promise<Float32Array>;
  setWeights(flat: Float32Array): void;
  /** Running mean and variance of every BatchNorm, in Architecture.batchNorms order. */
  getBatchNormStats(): Promise<Float32Array>;
  setBatchNormStats(flat: Float32Array): void;
  dispose(): void;
}

/** Refuses a batch whose image or label count does not match `n` and the model's input. */
export function checkBatch(config: ResNetConfig, batch: { images: Float32Array; labels?: ArrayLike<number>; n: number }): void {
  const s = config.imageSize;
  const expected = batch.n * s * s * config.inChannels;
  if (batch.images.length !== expected || (batch.labels !== undefined && batch.labels.length !== batch.n)) {
    throw new RangeError(
      `batch: expected ${batch.n} images of ${s}x${s}x${config.inChannels} (${expected} floats)${batch.labels !== undefined ? ` and ${batch.n} labels` : ''}, ` +
        `got ${batch.images.length} floats${batch.labels !== undefined ? ` and ${batch.labels.length} labels` : ''}`,
    );
  }
}
