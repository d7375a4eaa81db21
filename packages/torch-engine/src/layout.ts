// The torch engine's flat gradient seen in TensorFlow's layouts: for tests and checks that
// compare it with the TensorFlow.js ResNet. (Training never needs this: the all-reduce sums the
// engine's layout, and apply takes it back.)

import type { Architecture } from '@dtrain/core';

/** A flat vector of `layout` ('pytorch' or 'pytorch-channels-last') in TensorFlow's layouts. */
export function toTensorFlowLayout(arch: Architecture, flat: Float32Array, layout: string): Float32Array {
  if (layout === 'tensorflow') return flat.slice();
  if (layout !== 'pytorch' && layout !== 'pytorch-channels-last') throw new RangeError(`unknown gradient layout '${layout}'`);
  const out = flat.slice();
  for (const p of arch.params) {
    if (p.shape.length !== 4) continue;
    const [kh, kw, cin, cout] = p.shape;
    for (let o = 0; o < cout; o++)
      for (let i = 0; i < cin; i++)
        for (let y = 0; y < kh; y++)
          for (let x = 0; x < kw; x++) {
            // Source: [out, in, kh, kw], or channels-last [out, kh, kw, in]; target: [kh, kw, in, out].
            const src = layout === 'pytorch' ? ((o * cin + i) * kh + y) * kw + x : ((o * kh + y) * kw + x) * cin + i;
            out[p.offset + ((y * kw + x) * cin + i) * cout + o] = flat[p.offset + src];
          }
  }
  return out;
}
