// PyTorch-style Conv2d (symmetric zero padding, stride 1 or 2, odd square kernel) for
// TensorFlow.js, with hand-written gradients.
//
// Why: TensorFlow's CPU kernel for the convolution input gradient (Conv2DBackpropInput) is
// 10-80x slower than the forward convolution on the small maps of this network's later
// stages (measured 470 ms vs 6 ms for 3x3x512 -> 1x1x512 at batch 64). We express both
// gradients through fast forward ops instead:
//   - dX, stride 1: a 'same' convolution of dy with the spatially flipped, in/out-transposed
//     filter (exact for odd k and padding (k-1)/2).
//   - dX, stride 2: polyphase decomposition. Each of the 4 output phases (row parity, column
//     parity) of the padded input's gradient is a stride-1 convolution of dy with a sub-kernel
//     of the flipped filter; one convolution with a [kt, kt, Cout, 4*Cin] kernel computes all
//     four, and depthToSpace interleaves them. FLOPs: (2*kt/k)^2 of the forward (16/9 for 3x3).
//   - dW: TensorFlow's filter-gradient kernel, except on the tiniest output maps (stage 4 at
//     32x32 and 96x96 input), where an im2col matMul measured 2-4x faster (64 -> 16 ms for
//     3x3x512 on a 1x1 map; 107 -> 60 ms on a 3x3 map) and slower everywhere else.
// Padding: tfjs-node offers only 'same'/'valid'; 'same' puts the odd pixel of a stride-2
// window at the bottom/right where PyTorch pads symmetrically, so stride-2 layers pad
// explicitly and convolve 'valid'.
//
// 1x1 kernels (the shortcuts) never reach TensorFlow's convolution kernels: forward, dX and dW
// are the matrix products a 1x1 convolution is. Two reasons. (1) oneDNN's brgemm 1x1
// convolution, which TensorFlow uses on AVX-512 CPUs without AMX (e.g. AMD EPYC Zen 4/5),
// divides by zero while choosing its blocking for (Cin, Cout) in {(256,1024), (512,1024),
// (512,2048), (1024,512), (1024,2048)} (a size heuristic in brg_blocking_t::est_eff_1x1; the
// process dies by SIGFPE; tensorflow/tensorflow#57749). The polyphase dX of the 256->512
// shortcut was exactly such a convolution (512 -> 4*256). (2) For k=1 that polyphase kernel is
// three-quarters zeros: the product with the transposed filter, scattered onto the even
// pixels, does a quarter of its FLOPs.

import * as tf from '@tensorflow/tfjs-core';

export interface ConvSpec {
  kernel: number;
  stride: 1 | 2;
  padding: number;
  /** False for the first layer: its input is data, so dX would be wasted work. */
  inputGrad: boolean;
}

type Conv2dFn = (x: tf.Tensor4D, w: tf.Tensor4D) => tf.Tensor4D;

export function validateConvSpec(spec: ConvSpec): void {
  const { kernel: k, stride, padding: p } = spec;
  if (k % 2 !== 1) throw new Error(`conv: kernel ${k} must be odd`);
  if (stride === 1 && p !== (k - 1) / 2) {
    throw new Error(`conv: stride 1 needs padding (k-1)/2 = ${(k - 1) / 2}, got ${p}`);
  }
  if (stride !== 1 && stride !== 2) throw new Error(`conv: stride ${stride} unsupported`);
}

/** Plain forward: what the custom op computes, built from TensorFlow's own differentiable ops. */
export function conv2dReference(x: tf.Tensor4D, w: tf.Tensor4D, spec: Omit<ConvSpec, 'inputGrad'>): tf.Tensor4D {
  const p = spec.padding;
  const xp = p > 0 ? tf.pad(x, [[0, 0], [p, p], [p, p], [0, 0]]) : x;
  return tf.conv2d(xp, w, spec.stride, 'valid');
}

function forward(x: tf.Tensor4D, w: tf.Tensor4D, spec: ConvSpec): tf.Tensor4D {
  if (spec.stride === 1) return tf.conv2d(x, w, 1, 'same');
  return conv2dReference(x, w, spec);
}

/** dW = im2col(x_padded)^T . dy, the patches built from k*k strided slices. */
function filterGradIm2col(x: tf.Tensor4D, dy: tf.Tensor4D, spec: ConvSpec): tf.Tensor4D {
  const { kernel: k, stride: s, padding: p } = spec;
  const xp = p > 0 ? tf.pad(x, [[0, 0], [p, p], [p, p], [0, 0]]) : x;
  const [n, ho, wo, cout] = dy.shape;
  const cin = x.shape[3];
  const cols: tf.Tensor4D[] = [];
  for (let a = 0; a < k; a++) {
    for (let b = 0; b < k; b++) {
      cols.push(tf.stridedSlice(xp, [0, a, b, 0], [n, a + s * (ho - 1) + 1, b + s * (wo - 1) + 1, cin], [1, s, s, 1]) as tf.Tensor4D);
    }
  }
  const patches = cols.length === 1 ? cols[0] : tf.concat(cols, 3);
  const dw = tf.matMul(tf.reshape(patches, [n * ho * wo, k * k * cin]), tf.reshape(dy, [n * ho * wo, cout]), true, false);
  return tf.reshape(dw, [k, k, cin, cout]);
}

function filterGrad(x: tf.Tensor4D, dy: tf.Tensor4D, spec: ConvSpec, filterShape: [number, number, number, number]) {
  const outArea = dy.shape[1] * dy.shape[2];
  if (spec.stride === 1 ? outArea <= 9 : outArea <= 1) return filterGradIm2col(x, dy, spec);
  const p = spec.padding;
  const stride1 = spec.stride === 1;
  const xp = stride1 || p === 0 ? x : tf.pad(x, [[0, 0], [p, p], [p, p], [0, 0]]);
  return tf.engine().runKernel('Conv2DBackpropFilter', { x: xp, dy }, {
    strides: spec.stride,
    pad: stride1 ? 'same' : 'valid',
    dataFormat: 'NHWC',
    dimRoundingMode: undefined,
    dilations: 1,
    filterShape,
  } as unknown as tf.NamedAttrMap) as tf.Tensor4D;
}

/** [k,k,Cin,Cout] -> flipped in space, transposed to [k,k,Cout,Cin]. */
function flipTranspose(w: tf.Tensor4D): tf.Tensor4D {
  return tf.transpose(tf.reverse(w, [0, 1]), [0, 1, 3, 2]);
}

/**
 * The [kt, kt, Cout, 4*Cin] kernel whose channel block (ph*2 + pw) computes the gradient of
 * the padded input at rows of parity ph and columns of parity pw (see the header).
 * Tap t of phase ph reads filter row a = ph + 2*(kt-1-t), or nothing when a >= k.
 */
function polyphaseKernel(w: tf.Tensor4D, k: number): tf.Tensor4D {
  const kt = (k + 1) / 2;
  const [, , cin, cout] = w.shape;
  const wT = tf.transpose(w, [0, 1, 3, 2]); // [k,k,Cout,Cin]
  // Row/column index k holds zeros, for taps that fall outside the filter.
  const wz = tf.pad(wT, [[0, 1], [0, 1], [0, 0], [0, 0]]);
  const idx: number[] = [];
  for (let t = 0; t < kt; t++) {
    for (let ph = 0; ph < 2; ph++) {
      const a = ph + 2 * (kt - 1 - t);
      idx.push(a < k ? a : k);
    }
  }
  const ix = tf.tensor1d(idx, 'int32');
  const rows = tf.gather(wz, ix, 0); // [kt*2, k+1, Cout, Cin]
  const both = tf.gather(rows, ix, 1); // [kt*2, kt*2, Cout, Cin]
  const k6 = tf.reshape(both, [kt, 2, kt, 2, cout, cin]);
  return tf.reshape(tf.transpose(k6, [0, 2, 4, 1, 3, 5]), [kt, kt, cout, 4 * cin]);
}

function inputGrad(dy: tf.Tensor4D, w: tf.Tensor4D, xShape: number[], spec: ConvSpec): tf.Tensor4D {
  if (spec.stride === 1) return tf.conv2d(dy, flipTranspose(w), 1, 'same');
  const k = spec.kernel;
  const kt = (k + 1) / 2;
  const p = spec.padding;
  const [n, h, wd, cin] = xShape as [number, number, number, number];
  const dyp = kt > 1 ? tf.pad(dy, [[0, 0], [kt - 1, kt - 1], [kt - 1, kt - 1], [0, 0]]) : dy;
  const phases = tf.conv2d(dyp, polyphaseKernel(w, k), 1, 'valid'); // [N, Ho+kt-1, Wo+kt-1, 4*Cin]
  const dxp = tf.depthToSpace(phases, 2, 'NHWC'); // gradient of the padded input (and maybe one more row/col)
  return tf.slice(dxp, [0, p, p, 0], [n, h, wd, cin]);
}

/** Rows of [N*H*W, C]: a 1x1 convolution's input as the left operand of a matMul. */
function pixelRows(x: tf.Tensor4D): tf.Tensor2D {
  const [n, h, w, c] = x.shape;
  return tf.reshape(x, [n * h * w, c]);
}

/** The pixels a 1x1 convolution with this stride and padding reads (all of them at stride 1). */
function sampledPixels(x: tf.Tensor4D, spec: ConvSpec): tf.Tensor4D {
  const p = spec.padding;
  const xp = p > 0 ? tf.pad(x, [[0, 0], [p, p], [p, p], [0, 0]]) : x;
  if (spec.stride === 1) return xp;
  const [n, h, w, c] = xp.shape;
  return tf.stridedSlice(xp, [0, 0, 0, 0], [n, h, w, c], [1, 2, 2, 1]) as tf.Tensor4D;
}

/** dX of a 1x1 convolution: dy . W^T, placed at the pixels the forward read (zeros elsewhere). */
function inputGrad1x1(dy: tf.Tensor4D, w: tf.Tensor4D, xShape: number[], spec: ConvSpec): tf.Tensor4D {
  const [n, ho, wo, cout] = dy.shape;
  const [, h, wd, cin] = xShape as [number, number, number, number];
  const g = tf.matMul(tf.reshape(dy, [n * ho * wo, cout]), tf.reshape(w, [cin, cout]), false, true);
  const p = spec.padding;
  if (spec.stride === 1) return tf.reshape(g, [n, h, wd, cin]) as tf.Tensor4D;
  // Row/column pairs (read, skipped): [N, Ho, 2, Wo, 2, Cin] is the stride-2 grid of the padded input.
  const grid = tf.pad(tf.reshape(g, [n, ho, 1, wo, 1, cin]), [[0, 0], [0, 0], [0, 1], [0, 0], [0, 1], [0, 0]]);
  return tf.slice(tf.reshape(grid, [n, 2 * ho, 2 * wo, cin]) as tf.Tensor4D, [0, p, p, 0], [n, h, wd, cin]);
}

/** A 1x1 convolution and its gradients as matrix products (see the header for why). */
function makeConv1x1(spec: ConvSpec): Conv2dFn {
  const op = (...args: Array<tf.Tensor | tf.GradSaveFunc>) => {
    const [x, w, save] = args as [tf.Tensor4D, tf.Tensor4D, tf.GradSaveFunc];
    const xs = sampledPixels(x, spec);
    const [n, ho, wo] = xs.shape;
    const [, , cin, cout] = w.shape;
    save([xs, w]);
    const y = tf.matMul(pixelRows(xs), tf.reshape(w, [cin, cout]));
    return {
      value: tf.reshape(y, [n, ho, wo, cout]) as tf.Tensor4D,
      gradFunc: (dy: tf.Tensor4D, saved: tf.Tensor[]) => {
        const [xsSaved, ws] = saved as [tf.Tensor4D, tf.Tensor4D];
        const dw = tf.reshape(tf.matMul(pixelRows(xsSaved), pixelRows(dy), true, false), ws.shape) as tf.Tensor4D;
        const dx = spec.inputGrad ? inputGrad1x1(dy, ws, x.shape, spec) : tf.zeros(x.shape);
        return [dx, dw];
      },
    };
  };
  return tf.customGrad(op) as unknown as Conv2dFn;
}

/** A differentiable conv with the fast gradients above; one instance per layer shape. */
export function makeConv2d(spec: ConvSpec): Conv2dFn {
  validateConvSpec(spec);
  if (spec.kernel === 1) return makeConv1x1(spec);
  const op = (...args: Array<tf.Tensor | tf.GradSaveFunc>) => {
    const [x, w, save] = args as [tf.Tensor4D, tf.Tensor4D, tf.GradSaveFunc];
    save([x, w]);
    return {
      value: forward(x, w, spec),
      gradFunc: (dy: tf.Tensor4D, saved: tf.Tensor[]) => {
        const [xs, ws] = saved as [tf.Tensor4D, tf.Tensor4D];
        const dw = filterGrad(xs, dy, spec, ws.shape);
        const dx = spec.inputGrad ? inputGrad(dy, ws, xs.shape, spec) : tf.zerosLike(xs);
        return [dx, dw];
      },
    };
  };
  return tf.customGrad(op) as unknown as Conv2dFn;
}
