// Fused TensorFlow kernels for ReLU and training-mode BatchNorm, where the backend is the
// native TensorFlow library (tfjs-node and tfjs-node-gpu share one binding).
//
// Why: tfjs expresses the ReLU gradient as step(x) * dy and the BatchNorm gradient as ~20
// element-wise ops (mean, sub, mul, div, sum, tile...). On the 96x96 network those element-wise
// passes took about as long as all convolution gradients together (profiled: Multiply 496 ms,
// Step 390 ms, RealDiv 110 ms, ... per step of batch 64). TensorFlow has one kernel for each:
// ReluGrad, FusedBatchNormV3 (training mode computes the batch statistics itself) and
// FusedBatchNormGradV3. This module calls them through the backend's op executor and falls back
// to the plain tfjs ops on any other backend, so core still runs anywhere tfjs-core does.

import * as tf from '@tensorflow/tfjs-core';

interface TfeOpAttr {
  name: string;
  type: number;
  value: unknown;
}

interface NativeBackend {
  binding: Record<string, number>;
  executeSingleOutput(name: string, attrs: TfeOpAttr[], inputs: tf.TensorInfo[]): tf.Tensor;
  executeMultipleOutputs(name: string, attrs: TfeOpAttr[], inputs: tf.TensorInfo[], numOutputs: number): tf.Tensor[];
}

/** The native backend's op executor, or undefined on pure-JS/WebGL/WASM backends. */
export function nativeBackend(): NativeBackend | undefined {
  const b = tf.backend() as unknown as Partial<NativeBackend>;
  return typeof b.executeMultipleOutputs === 'function' && typeof b.executeSingleOutput === 'function' && b.binding ? (b as NativeBackend) : undefined;
}

function floatType(b: NativeBackend, name: string): TfeOpAttr {
  return { name, type: b.binding.TF_ATTR_TYPE, value: b.binding.TF_FLOAT };
}

/** Attributes of FusedBatchNormV3 (forward) and, without the averaging factor, of its gradient op. */
function bnAttrs(b: NativeBackend, eps: number, forward: boolean): TfeOpAttr[] {
  return [
    floatType(b, 'T'),
    floatType(b, 'U'),
    { name: 'epsilon', type: b.binding.TF_ATTR_FLOAT, value: eps },
    // 1: batch_mean/batch_variance are this batch's statistics (we keep PyTorch's running averages).
    ...(forward ? [{ name: 'exponential_avg_factor', type: b.binding.TF_ATTR_FLOAT, value: 1 }] : []),
    { name: 'data_format', type: b.binding.TF_ATTR_STRING, value: 'NHWC' },
    { name: 'is_training', type: b.binding.TF_ATTR_BOOL, value: true },
  ];
}

/** ReLU whose gradient is TensorFlow's ReluGrad kernel (one pass instead of step + multiply). */
export function makeRelu(): (x: tf.Tensor4D) => tf.Tensor4D {
  const b = nativeBackend();
  if (!b) return (x) => tf.relu(x);
  const op = tf.customGrad((...args: Array<tf.Tensor | tf.GradSaveFunc>) => {
    const [x, save] = args as [tf.Tensor4D, tf.GradSaveFunc];
    const y = tf.relu(x);
    save([y]);
    return {
      value: y,
      gradFunc: (dy: tf.Tensor, saved: tf.Tensor[]) => b.executeSingleOutput('ReluGrad', [floatType(b, 'T')], [dy, saved[0]]),
    };
  });
  return op as unknown as (x: tf.Tensor4D) => tf.Tensor4D;
}

export interface BatchStats {
  /** Batch mean per channel. */
  mean: tf.Tensor1D;
  /** Unbiased (n-1) batch variance per channel, as running statistics use it. */
  unbiasedVariance: tf.Tensor1D;
}

export type TrainingBatchNorm = (x: tf.Tensor4D, gamma: tf.Tensor1D, beta: tf.Tensor1D) => { y: tf.Tensor4D; stats: BatchStats };

/** The same with tfjs's own ops (moments + batchNorm) and their built-in gradients. */
export function referenceTrainingBatchNorm(eps: number): TrainingBatchNorm {
  return (x, gamma, beta) => {
    const { mean, variance } = tf.moments(x, [0, 1, 2]);
    const count = x.size / x.shape[3];
    const stats = {
      mean: tf.keep(mean as tf.Tensor1D),
      unbiasedVariance: tf.keep(tf.mul(variance, count > 1 ? count / (count - 1) : 1) as tf.Tensor1D),
    };
    return { y: tf.batchNorm(x, mean as tf.Tensor1D, variance as tf.Tensor1D, beta, gamma, eps), stats };
  };
}

/**
 * Training-mode BatchNorm (batch statistics, biased variance in the normalisation, as PyTorch)
 * returning the output and the batch statistics for the running averages. The statistics are
 * kept out of tidy scopes: the caller disposes them.
 */
export function makeTrainingBatchNorm(eps: number): TrainingBatchNorm {
  const b = nativeBackend();
  if (!b) return referenceTrainingBatchNorm(eps);
  return (x, gamma, beta) => {
    let stats: BatchStats | undefined;
    const op = tf.customGrad((...args: Array<tf.Tensor | tf.GradSaveFunc>) => {
      const [xi, g, bt, save] = args as [tf.Tensor4D, tf.Tensor1D, tf.Tensor1D, tf.GradSaveFunc];
      const empty = tf.tensor1d([]);
      // Outputs: y, batch_mean, batch_variance (Bessel-corrected), reserve 1-3 (for the gradient).
      const [y, mean, variance, r1, r2, r3] = b.executeMultipleOutputs('FusedBatchNormV3', bnAttrs(b, eps, true), [xi, g, bt, empty, empty], 6);
      stats = { mean: tf.keep(mean as tf.Tensor1D), unbiasedVariance: tf.keep(variance as tf.Tensor1D) };
      save([xi, g, r1, r2, r3]);
      return {
        value: y as tf.Tensor4D,
        gradFunc: (dy: tf.Tensor, saved: tf.Tensor[]) => {
          const [xs, gs, s1, s2, s3] = saved;
          const [dx, dgamma, dbeta] = b.executeMultipleOutputs('FusedBatchNormGradV3', bnAttrs(b, eps, false), [dy, xs, gs, s1, s2, s3], 5);
          return [dx, dgamma, dbeta];
        },
      };
    });
    const y = (op as unknown as (x: tf.Tensor4D, g: tf.Tensor1D, b: tf.Tensor1D) => tf.Tensor4D)(x, gamma, beta);
    return { y, stats: stats! };
  };
}
