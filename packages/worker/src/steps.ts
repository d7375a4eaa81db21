// How one rank's share of (the rest of) an epoch is cut into training steps. Every rank of a
// group has a share of the same length (shardFrom pads), so every rank computes the same steps:
// the collectives line up.

/**
 * Batches of `batchSize`, except that a last batch smaller than `minBatch` joins the one before
 * it (at most minBatch - 1 extra images in that step). Why: a BatchNorm over fewer than
 * MIN_BATCHNORM_VALUES values per channel has a degenerate gradient (see @dtrain/core's
 * minTrainingBatch); PyTorch's DataLoader would run that tiny last batch, and users switch on
 * drop_last to get rid of it. Folding keeps every image of the epoch.
 * Returns 0 for a share shorter than `minBatch`: it cannot make a healthy step at all.
 * A batchSize below minBatch makes every step unhealthy: the trainer refuses it up front.
 */
export function stepsOfShare(shareLength: number, batchSize: number, minBatch: number): number {
  if (batchSize < minBatch) throw new RangeError(`batch size ${batchSize} is below the minimum ${minBatch}`);
  if (shareLength < minBatch) return 0;
  const steps = Math.ceil(shareLength / batchSize);
  const last = shareLength - (steps - 1) * batchSize;
  return steps > 1 && last < minBatch ? steps - 1 : steps;
}

/** [from, to) of step j's images in the share: the last step takes whatever is left. */
export function stepBounds(j: number, steps: number, shareLength: number, batchSize: number): [number, number] {
  return [j * batchSize, j === steps - 1 ? shareLength : (j + 1) * batchSize];
}

/** The most images one step can hold. */
export function maxStepImages(batchSize: number, minBatch: number): number {
  return batchSize + minBatch - 1;
}
