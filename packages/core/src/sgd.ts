// SGD with PyTorch's semantics (torch.optim.SGD, dampening 0):
//   g = grad + weight_decay * p
//   buf = momentum * buf + g        (buf = g on the first step)
//   g = g + momentum * buf          (nesterov), else g = buf
//   p = p - lr * g                  (p = p - lr * g without momentum)
// Weight decay applies to every parameter, BatchNorm and biases included, as PyTorch's default
// does; `skipNormBiasDecay` leaves out the tensors of one dimension (biases, BatchNorm scale and
// shift), timm's filter_bias_and_bn rule. State (the momentum buffers) reads and writes as one
// flat vector.

import * as tf from '@tensorflow/tfjs-core';
import { readFlat } from './flat.js';

export interface SgdOptions {
  lr: number;
  momentum?: number;
  weightDecay?: number;
  /** Nesterov momentum (needs momentum > 0, as torch.optim.SGD). */
  nesterov?: boolean;
  /** No weight decay on tensors of one dimension: biases and BatchNorm scale and shift. */
  skipNormBiasDecay?: boolean;
}

/** Whether weight decay applies to a tensor of this shape under `skipNormBiasDecay` (timm's rule: not to 1-D ones). */
export function decaysTensor(shape: readonly number[], skipNormBiasDecay: boolean): boolean {
  return !skipNormBiasDecay || shape.length > 1;
}

export function checkSgdOptions(options: SgdOptions): void {
  for (const k of ['lr', 'momentum', 'weightDecay'] as const) {
    const v = options[k];
    if (v !== undefined && !(Number.isFinite(v) && v >= 0)) throw new RangeError(`SGD: ${k} must be a non-negative number, got ${v}`);
  }
  if (options.nesterov && !((options.momentum ?? 0) > 0)) throw new RangeError('SGD: Nesterov momentum needs a momentum above 0');
}

export class Sgd {
  lr: number;
  readonly momentum: number;
  readonly weightDecay: number;
  readonly nesterov: boolean;
  readonly skipNormBiasDecay: boolean;
  private readonly decays: boolean[];
  private readonly buffers: tf.Variable[] | undefined;
  /** Steps taken; 0 means the momentum buffers are still empty. */
  steps = 0;

  constructor(
    private readonly params: tf.Variable[],
    options: SgdOptions,
  ) {
    checkSgdOptions(options);
    this.lr = options.lr;
    this.momentum = options.momentum ?? 0;
    this.weightDecay = options.weightDecay ?? 0;
    this.nesterov = options.nesterov ?? false;
    this.skipNormBiasDecay = options.skipNormBiasDecay ?? false;
    this.decays = params.map((p) => decaysTensor(p.shape, this.skipNormBiasDecay));
    this.buffers = this.momentum > 0 ? params.map((p) => tf.variable(tf.zerosLike(p), false)) : undefined;
  }

  get stateSize(): number {
    return this.buffers ? this.params.reduce((a, p) => a + p.size, 0) : 0;
  }

  /** Applies one update with the flat gradient vector (parameter order of the constructor). */
  step(flatGrads: Float32Array): void {
    tf.tidy(() => {
      const grads = tf.split(tf.tensor1d(flatGrads), this.params.map((p) => p.size));
      this.params.forEach((p, i) => {
        let g: tf.Tensor = tf.reshape(grads[i], p.shape);
        if (this.weightDecay > 0 && this.decays[i]) g = tf.add(g, tf.mul(p, this.weightDecay));
        if (this.buffers) {
          const buf = this.buffers[i];
          const next = this.steps === 0 ? g : tf.add(tf.mul(buf, this.momentum), g);
          buf.assign(next);
          g = this.nesterov ? tf.add(g, tf.mul(buf, this.momentum)) : buf;
        }
        p.assign(tf.sub(p, tf.mul(g, this.lr)));
      });
    });
    this.steps++;
  }

  /** Momentum buffers as one flat vector (empty without momentum). */
  async getState(): Promise<{ steps: number; buffers: Float32Array }> {
    if (!this.buffers) return { steps: this.steps, buffers: new Float32Array(0) };
    return { steps: this.steps, buffers: await readFlat(this.buffers) };
  }

  setState(state: { steps: number; buffers: Float32Array }): void {
    if (state.buffers.length !== this.stateSize) {
      throw new RangeError(`SGD state: expected ${this.stateSize} floats of momentum buffers, got ${state.buffers.length}`);
    }
    if (this.buffers) {
      const bufs = this.buffers;
      tf.tidy(() => {
        const parts = tf.split(tf.tensor1d(state.buffers), bufs.map((b) => b.size));
        bufs.forEach((b, i) => b.assign(tf.reshape(parts[i], b.shape)));
      });
    }
    this.steps = state.steps;
  }

  dispose(): void {
    if (this.buffers) tf.dispose(this.buffers);
  }
}
