// The timing model of a training step that `pnpm bench scaling` uses in place of compute (shared
// by scaling.ts and its worker processes; the leading underscore keeps it out of `pnpm bench`).
import { describeResNet, gradientBuckets, TUTORIAL_CONFIG } from '@dtrain/core';

/** The forward pass's share of a training step (the backward pass costs about twice the forward). */
export const FORWARD_SHARE = 1 / 3;

/**
 * The tutorial ResNet's gradient buckets as [from, to) ranges of a `floats`-long buffer (scaled
 * when --floats is not the real size), and when each is ready, as a fraction of the backward pass.
 */
export function bucketSchedule(floats: number, bucketMb: number): { ranges: [number, number][]; readyAt: number[] } {
  const arch = describeResNet(TUTORIAL_CONFIG);
  const buckets = gradientBuckets(arch, bucketMb * 2 ** 20);
  const flopsOf = new Map(arch.layers.map((l) => [l.name, l.flops]));
  const layerOf = (param: string) => param.slice(0, param.lastIndexOf('.'));
  // Backward FLOPs from the head down to (and including) each parameter's layer.
  const total = arch.layers.reduce((a, l) => a + l.flops, 0);
  const layerIndex = new Map(arch.layers.map((l, i) => [l.name, i]));
  const doneFrom = (layer: number) => arch.layers.slice(layer).reduce((a, l) => a + l.flops, 0) / total;
  const scale = floats / arch.paramCount;
  return {
    ranges: buckets.map((b) => [Math.round(b.from * scale), Math.round(b.to * scale)]),
    readyAt: buckets.map((b) => {
      const name = layerOf(arch.params[b.firstParam].name);
      const i = layerIndex.get(name);
      if (i === undefined || !flopsOf.has(name)) throw new Error(`bench: parameter ${arch.params[b.firstParam].name} has no layer ${name} in the architecture summary`);
      return doneFrom(i);
    }),
  };
}
