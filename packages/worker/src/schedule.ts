// The learning rate as a pure function of the settings, the world size and the position in
// training. Every rank computes it from the same numbers, so replicas apply identical updates
// without communicating it, and a resume (which restores the epoch and step) continues it exactly.
//
// Linear scaling rule with gradual warmup (Goyal et al. 2017, "Accurate, Large Minibatch SGD"):
// with a global batch k times the single-worker one, use k x lr; ramp linearly from lr (the
// single-worker rate) to k x lr over the first `warmupEpochs` epochs, changing every step.

export type LrScaling = 'none' | 'linear';
export const LR_SCALINGS = ['none', 'linear'] as const satisfies readonly LrScaling[];

export interface LrScheduleSettings {
  /** The single-worker learning rate (`--lr`). */
  lr: number;
  lrScaling: LrScaling;
  /** Epochs of linear warmup from `lr` to the scaled rate (0: none). */
  warmupEpochs: number;
}

/** The rate after warmup: lr x worldSize with linear scaling, else lr. */
export function peakLr(s: LrScheduleSettings, worldSize: number): number {
  return s.lrScaling === 'linear' ? s.lr * worldSize : s.lr;
}

/**
 * The rate of one optimiser step. `epoch` is 0-based; `stepInEpoch` is the 0-based index of the
 * step within it, of `stepsPerEpoch`. Warmup progress is measured in epochs (epoch +
 * stepInEpoch / stepsPerEpoch) rather than in global steps, so a resume with another world size
 * (other steps per epoch) continues the ramp from where the finished epochs left it.
 */
export function lrAt(s: LrScheduleSettings, worldSize: number, epoch: number, stepInEpoch: number, stepsPerEpoch: number): number {
  const peak = peakLr(s, worldSize);
  if (!(s.warmupEpochs > 0)) return peak;
  const t = epoch + stepInEpoch / stepsPerEpoch;
  if (t >= s.warmupEpochs) return peak;
  return s.lr + (peak - s.lr) * (t / s.warmupEpochs);
}
