// The learning rate as a pure function of the settings, the world size and the position in
// training. Every rank computes it from the same numbers, so replicas apply identical updates
// without communicating it, and a resume (which restores the epoch and step) continues it exactly.
//
// The position is measured in epochs (epoch + stepInEpoch / stepsPerEpoch), not in global steps,
// so a resume with another world size (other steps per epoch) continues where the finished epochs
// left it. The shapes are PyTorch's:
//   constant   the peak rate throughout (after any warmup)
//   cosine     CosineAnnealingLR: from the peak at the end of warmup to `lrFinal` at the end of the run
//   step       MultiStepLR: the peak times lrGamma for each milestone epoch reached (per epoch)
//   onecycle   OneCycleLR with its defaults (pct_start 0.3, div_factor 25, final_div_factor 1e4,
//              cosine annealing): up from peak/25 over the first 30% of the run, down to peak/25e4;
//              it is its own warmup
// The peak is lr, or lr x world size with linear scaling (Goyal et al. 2017, "Accurate, Large
// Minibatch SGD"). Warmup ramps linearly over the first `warmupEpochs` epochs, changing every
// step: from lr to the peak with linear scaling (Goyal's gradual warmup), else from 0.

export type LrScaling = 'none' | 'linear';
export const LR_SCALINGS = ['none', 'linear'] as const satisfies readonly LrScaling[];
export type LrSchedule = 'constant' | 'cosine' | 'step' | 'onecycle';
export const LR_SCHEDULES = ['constant', 'cosine', 'step', 'onecycle'] as const satisfies readonly LrSchedule[];

/** OneCycleLR's defaults (torch.optim.lr_scheduler.OneCycleLR). */
export const ONE_CYCLE = { pctStart: 0.3, divFactor: 25, finalDivFactor: 1e4 } as const;

export interface LrScheduleSettings {
  /** The single-worker learning rate (`--lr`). */
  lr: number;
  lrScaling: LrScaling;
  /** Epochs of linear warmup (0: none). */
  warmupEpochs: number;
  lrSchedule: LrSchedule;
  /** cosine: the rate at the end of the run. */
  lrFinal: number;
  /** step: 0-based epochs from which the rate is multiplied by lrGamma once more, ascending. */
  lrMilestones: readonly number[];
  lrGamma: number;
  /** The run's length in epochs (cosine and onecycle end there). */
  epochs: number;
}

/** The rate after warmup: lr x worldSize with linear scaling, else lr. */
export function peakLr(s: Pick<LrScheduleSettings, 'lr' | 'lrScaling'>, worldSize: number): number {
  return s.lrScaling === 'linear' ? s.lr * worldSize : s.lr;
}

/** Half a cosine from `from` (x = 0, exactly) to `to` (x = 1). */
function cosineFrom(from: number, to: number, x: number): number {
  return from - ((from - to) * (1 - Math.cos(Math.PI * Math.min(1, Math.max(0, x))))) / 2;
}

/** The schedule's rate at position `t` (epochs) without warmup. */
function scheduled(s: LrScheduleSettings, peak: number, epoch: number, t: number): number {
  switch (s.lrSchedule) {
    case 'cosine':
      return s.epochs > s.warmupEpochs ? cosineFrom(peak, s.lrFinal, (t - s.warmupEpochs) / (s.epochs - s.warmupEpochs)) : peak;
    case 'step':
      return peak * s.lrGamma ** s.lrMilestones.filter((m) => m <= epoch).length;
    case 'onecycle': {
      const initial = peak / ONE_CYCLE.divFactor;
      const up = ONE_CYCLE.pctStart * s.epochs;
      if (t < up) return cosineFrom(initial, peak, t / up);
      return cosineFrom(peak, initial / ONE_CYCLE.finalDivFactor, (t - up) / (s.epochs - up));
    }
    default:
      return peak;
  }
}

/**
 * The rate of one optimiser step. `epoch` is 0-based; `stepInEpoch` is the 0-based index of the
 * step within it, of `stepsPerEpoch`.
 */
export function lrAt(s: LrScheduleSettings, worldSize: number, epoch: number, stepInEpoch: number, stepsPerEpoch: number): number {
  const peak = peakLr(s, worldSize);
  const t = epoch + stepInEpoch / stepsPerEpoch;
  if (s.warmupEpochs > 0 && t < s.warmupEpochs) {
    const from = s.lrScaling === 'linear' ? s.lr : 0;
    return from + (peak - from) * (t / s.warmupEpochs);
  }
  return scheduled(s, peak, epoch, t);
}
