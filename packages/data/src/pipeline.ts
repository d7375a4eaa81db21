import type { Dataset } from './dataset.js';
import { DatasetArgumentError } from './errors.js';
import type { Rng } from './rng.js';

/** Pillow's fixed-point precision for 8-bit resampling (Resample.c: 32 - 8 - 2). */
const PRECISION_BITS = 22;
const HALF = 1 << (PRECISION_BITS - 1);
const MAX_SS = 255 << PRECISION_BITS;

/** One axis of a separable resize: for each output position, `taps` source indices and weights. */
export interface AxisPlan {
  inSize: number;
  outSize: number;
  taps: number;
  /** outSize * taps source indices (unused taps repeat a valid index with weight 0). */
  index: Int32Array;
  /** outSize * taps fixed-point weights, summing to about 2^22 per output. */
  weight: Int32Array;
}

/**
 * Bilinear coefficients exactly as Pillow computes them for `Image.resize(..., BILINEAR)`, which is
 * what torchvision's `Resize` does to the PIL images of `datasets.CIFAR10`: a triangle filter centred
 * on each output pixel's centre, widened by the scale when shrinking (so shrinking averages, like
 * torchvision's antialias=True), weights normalised and rounded to 22-bit fixed point. When
 * enlarging (32 -> 96) this is ordinary half-pixel bilinear interpolation with edges clamped, the
 * same as torch.nn.functional.interpolate(mode='bilinear', align_corners=False).
 */
export function bilinearAxisPlan(inSize: number, outSize: number): AxisPlan {
  if (!Number.isInteger(inSize) || inSize < 1 || !Number.isInteger(outSize) || outSize < 1) {
    throw new DatasetArgumentError(`resize sizes must be positive integers, got ${inSize} -> ${outSize}`);
  }
  const scale = inSize / outSize;
  const filterscale = Math.max(scale, 1);
  const support = 1 * filterscale;
  const ksize = Math.ceil(support) * 2 + 1;
  const bounds: Array<[number, number[]]> = [];
  let taps = 1;
  for (let xx = 0; xx < outSize; xx++) {
    const center = (xx + 0.5) * scale;
    const ss = 1 / filterscale;
    const xmin = Math.max(Math.trunc(center - support + 0.5), 0);
    const xmax = Math.min(Math.trunc(center + support + 0.5), inSize) - xmin;
    const k: number[] = [];
    let ww = 0;
    for (let x = 0; x < xmax; x++) {
      const d = Math.abs((x + xmin - center + 0.5) * ss);
      const w = d < 1 ? 1 - d : 0;
      k.push(w);
      ww += w;
    }
    for (let x = 0; x < k.length; x++) if (ww !== 0) k[x] /= ww;
    // Trailing zero weights change nothing; trimming them keeps the inner loops short.
    while (k.length > 1 && k[k.length - 1] === 0) k.pop();
    taps = Math.max(taps, k.length);
    bounds.push([xmin, k]);
  }
  if (taps > ksize) throw new Error(`internal: ${taps} taps exceed Pillow's ${ksize}`);
  const index = new Int32Array(outSize * taps);
  const weight = new Int32Array(outSize * taps);
  for (let xx = 0; xx < outSize; xx++) {
    const [xmin, k] = bounds[xx];
    for (let t = 0; t < taps; t++) {
      index[xx * taps + t] = t < k.length ? xmin + t : xmin;
      // Pillow rounds half away from zero: (int)(0.5 + k * 2^22) for k >= 0.
      weight[xx * taps + t] = t < k.length ? Math.trunc(k[t] < 0 ? -0.5 + k[t] * (1 << PRECISION_BITS) : 0.5 + k[t] * (1 << PRECISION_BITS)) : 0;
    }
  }
  return { inSize, outSize, taps, index, weight };
}

function clip8(ss: number): number {
  if (ss >= MAX_SS) return 255;
  if (ss <= 0) return 0;
  return ss >> PRECISION_BITS;
}

/** Horizontal pass: rows of `src` (h x inW x C) into `dst` (h x outW x C). */
function resizeRows(src: Uint8Array, srcOff: number, h: number, C: number, p: AxisPlan, dst: Uint8Array): void {
  const { inSize: inW, outSize: outW, taps, index, weight } = p;
  const inRow = inW * C;
  const outRow = outW * C;
  if (taps === 2) {
    // The enlarging case (e.g. 32 -> 96): two taps, unrolled.
    for (let y = 0; y < h; y++) {
      const rowIn = srcOff + y * inRow;
      let o = y * outRow;
      for (let ox = 0; ox < outW; ox++) {
        const i0 = rowIn + index[2 * ox] * C;
        const i1 = rowIn + index[2 * ox + 1] * C;
        const w0 = weight[2 * ox];
        const w1 = weight[2 * ox + 1];
        for (let c = 0; c < C; c++) {
          const ss = HALF + src[i0 + c] * w0 + src[i1 + c] * w1;
          dst[o++] = ss >= MAX_SS ? 255 : ss <= 0 ? 0 : ss >> PRECISION_BITS;
        }
      }
    }
    return;
  }
  for (let y = 0; y < h; y++) {
    const rowIn = srcOff + y * inRow;
    let o = y * outRow;
    for (let ox = 0; ox < outW; ox++) {
      const b = ox * taps;
      for (let c = 0; c < C; c++) {
        let ss = HALF;
        for (let t = 0; t < taps; t++) ss += src[rowIn + index[b + t] * C + c] * weight[b + t];
        dst[o++] = ss >= MAX_SS ? 255 : ss <= 0 ? 0 : ss >> PRECISION_BITS;
      }
    }
  }
}

/**
 * Resizes one HWC uint8 image like Pillow's bilinear resize: horizontal pass, rounded to uint8,
 * then vertical pass, rounded to uint8 (a pass is skipped when that size does not change).
 */
export class ImageResizer {
  readonly rows: AxisPlan;
  readonly cols: AxisPlan;
  private readonly tmp: Uint8Array;
  constructor(
    readonly inH: number,
    readonly inW: number,
    readonly channels: number,
    readonly outH: number,
    readonly outW: number,
  ) {
    this.cols = bilinearAxisPlan(inW, outW);
    this.rows = bilinearAxisPlan(inH, outH);
    this.tmp = new Uint8Array(inH * outW * channels);
  }

  /** `src` from `srcOff` (inH x inW x C) -> `dst` (outH x outW x C, uint8). */
  resize(src: Uint8Array, srcOff: number, dst: Uint8Array): void {
    const { inH, inW, outH, outW, channels: C } = this;
    let rowsSrc = src;
    let rowsOff = srcOff;
    if (inW !== outW) {
      resizeRows(src, srcOff, inH, C, this.cols, this.tmp);
      rowsSrc = this.tmp;
      rowsOff = 0;
    }
    const rowLen = outW * C;
    if (inH === outH) {
      dst.set(rowsSrc.subarray(rowsOff, rowsOff + outH * rowLen));
      return;
    }
    const { taps, index, weight } = this.rows;
    for (let oy = 0; oy < outH; oy++) {
      const b = oy * taps;
      for (let j = 0; j < rowLen; j++) {
        let ss = HALF;
        for (let t = 0; t < taps; t++) ss += rowsSrc[rowsOff + index[b + t] * rowLen + j] * weight[b + t];
        dst[oy * rowLen + j] = clip8(ss);
      }
    }
  }

  /**
   * Resizes and maps each output byte through `lut` (256 entries per channel, channel-major) into
   * `out` at `outOff`: resize and normalisation in one pass over the output.
   */
  resizeToFloat(src: Uint8Array, srcOff: number, lut: Float32Array, out: Float32Array, outOff: number): void {
    const { inH, inW, outH, outW, channels: C } = this;
    const hPass = inW !== outW;
    let rowsSrc = src;
    let rowsOff = srcOff;
    if (hPass) {
      resizeRows(src, srcOff, inH, C, this.cols, this.tmp);
      rowsSrc = this.tmp;
      rowsOff = 0;
    }
    const rowLen = outW * C;
    const uniform = lut.length === 256;
    if (inH === outH) {
      for (let i = 0; i < outH * rowLen; i++) out[outOff + i] = lut[(uniform ? 0 : (i % C) * 256) + rowsSrc[rowsOff + i]];
      return;
    }
    const { taps, index, weight } = this.rows;
    for (let oy = 0; oy < outH; oy++) {
      const b = oy * taps;
      const o = outOff + oy * rowLen;
      if (taps === 2) {
        const r0 = rowsOff + index[b] * rowLen;
        const r1 = rowsOff + index[b + 1] * rowLen;
        const w0 = weight[b];
        const w1 = weight[b + 1];
        if (uniform) {
          for (let j = 0; j < rowLen; j++) {
            const ss = HALF + rowsSrc[r0 + j] * w0 + rowsSrc[r1 + j] * w1;
            out[o + j] = lut[ss >= MAX_SS ? 255 : ss <= 0 ? 0 : ss >> PRECISION_BITS];
          }
        } else {
          for (let j = 0, c = 0; j < rowLen; j++) {
            const ss = HALF + rowsSrc[r0 + j] * w0 + rowsSrc[r1 + j] * w1;
            out[o + j] = lut[c * 256 + (ss >= MAX_SS ? 255 : ss <= 0 ? 0 : ss >> PRECISION_BITS)];
            if (++c === C) c = 0;
          }
        }
      } else {
        for (let j = 0, c = 0; j < rowLen; j++) {
          let ss = HALF;
          for (let t = 0; t < taps; t++) ss += rowsSrc[rowsOff + index[b + t] * rowLen + j] * weight[b + t];
          out[o + j] = lut[(uniform ? 0 : c * 256) + clip8(ss)];
          if (++c === C) c = 0;
        }
      }
    }
  }
}

/** Resizes one HWC uint8 image (Pillow bilinear semantics, see `bilinearAxisPlan`). */
export function resizeBilinear(src: Uint8Array, inH: number, inW: number, channels: number, outH: number, outW: number): Uint8Array {
  if (src.length !== inH * inW * channels) throw new DatasetArgumentError(`image has ${src.length} bytes, expected ${inH}x${inW}x${channels}`);
  const dst = new Uint8Array(outH * outW * channels);
  new ImageResizer(inH, inW, channels, outH, outW).resize(src, 0, dst);
  return dst;
}

export interface AugmentOptions {
  /** RandomCrop(size, padding=p): zero-pad by p on each side, then crop a random window. 0 = off. */
  cropPadding?: number;
  /** RandomHorizontalFlip(0.5). */
  horizontalFlip?: boolean;
}

export interface PreprocessOptions {
  /** Model input size; the tutorial resizes 32x32 to 96x96. Defaults to the data set's size. */
  height?: number;
  width?: number;
  /** Normalize((x - mean) / std) after scaling to [0, 1]; one value or one per channel. Default 0.5. */
  mean?: number | readonly number[];
  std?: number | readonly number[];
  /** Applied at the source resolution before resizing, only when an Rng is passed to assemble(). */
  augment?: AugmentOptions;
}

export interface Batch {
  /** [n, height, width, channels], channels last, float32. */
  x: Float32Array;
  /** Class indices, int32 (what tf.oneHot wants). */
  y: Int32Array;
  n: number;
  shape: [number, number, number, number];
}

/**
 * Builds model-ready batches: optional augmentation, bilinear resize, ToTensor's /255 and
 * Normalize, in two tight passes over typed arrays per image (the normalisation is a 256-entry
 * table, since every output value is a rounded byte first, as with torchvision on PIL images).
 */
export class BatchAssembler {
  readonly height: number;
  readonly width: number;
  readonly channels: number;
  private readonly resizer: ImageResizer;
  private readonly lut: Float32Array;
  private readonly scratch: Uint8Array;
  private readonly srcSize: number;
  private readonly augment: Required<AugmentOptions>;

  constructor(
    readonly source: Pick<Dataset, 'height' | 'width' | 'channels'>,
    options: PreprocessOptions = {},
  ) {
    this.height = options.height ?? source.height;
    this.width = options.width ?? source.width;
    this.channels = source.channels;
    this.resizer = new ImageResizer(source.height, source.width, source.channels, this.height, this.width);
    this.lut = normalizationTable(source.channels, options.mean ?? 0.5, options.std ?? 0.5);
    this.srcSize = source.height * source.width * source.channels;
    this.scratch = new Uint8Array(this.srcSize);
    const pad = options.augment?.cropPadding ?? 0;
    if (!Number.isInteger(pad) || pad < 0) throw new DatasetArgumentError(`crop padding must be a non-negative integer, got ${pad}`);
    this.augment = { cropPadding: pad, horizontalFlip: options.augment?.horizontalFlip ?? false };
  }

  get augmenting(): boolean {
    return this.augment.cropPadding > 0 || this.augment.horizontalFlip;
  }

  /** Floats per image. */
  get imageLength(): number {
    return this.height * this.width * this.channels;
  }

  /**
   * The images at `indices` of `ds`. Pass `rng` to augment (training); without it no randomness is
   * used (evaluation). Pass `into` to reuse buffers (it must hold at least indices.length images).
   */
  assemble(ds: Dataset, indices: ArrayLike<number>, rng?: Rng, into?: { x: Float32Array; y: Int32Array }): Batch {
    if (ds.height !== this.source.height || ds.width !== this.source.width || ds.channels !== this.channels) {
      throw new DatasetArgumentError(
        `${ds.name} is ${ds.height}x${ds.width}x${ds.channels}, this pipeline expects ${this.source.height}x${this.source.width}x${this.channels}`,
      );
    }
    const n = indices.length;
    const len = this.imageLength;
    const x = into && into.x.length >= n * len ? into.x.subarray(0, n * len) : new Float32Array(n * len);
    const y = into && into.y.length >= n ? into.y.subarray(0, n) : new Int32Array(n);
    const augment = rng !== undefined && this.augmenting;
    for (let k = 0; k < n; k++) {
      const i = indices[k];
      if (!(i >= 0 && i < ds.count) || !Number.isInteger(i)) throw new DatasetArgumentError(`${ds.name}: index ${i} is outside 0..${ds.count - 1}`);
      let src = ds.images;
      let off = i * this.srcSize;
      if (augment) {
        this.cropAndFlip(ds.images, off, rng);
        src = this.scratch;
        off = 0;
      }
      this.resizer.resizeToFloat(src, off, this.lut, x, k * len);
      y[k] = ds.labels[i];
    }
    return { x, y, n, shape: [n, this.height, this.width, this.channels] };
  }

  /** RandomCrop with zero padding then RandomHorizontalFlip, into the scratch image. */
  private cropAndFlip(src: Uint8Array, off: number, rng: Rng): void {
    const { height: H, width: W, channels: C } = this.source;
    const p = this.augment.cropPadding;
    const top = p > 0 ? rng.int(2 * p + 1) - p : 0;
    const left = p > 0 ? rng.int(2 * p + 1) - p : 0;
    const flip = this.augment.horizontalFlip && rng.next() < 0.5;
    const dst = this.scratch;
    for (let yy = 0; yy < H; yy++) {
      const sy = yy + top;
      const rowOut = yy * W * C;
      if (sy < 0 || sy >= H) {
        dst.fill(0, rowOut, rowOut + W * C);
        continue;
      }
      const rowIn = off + sy * W * C;
      for (let xx = 0; xx < W; xx++) {
        const sx = xx + left;
        const o = rowOut + (flip ? W - 1 - xx : xx) * C;
        if (sx < 0 || sx >= W) {
          for (let c = 0; c < C; c++) dst[o + c] = 0;
        } else {
          const s = rowIn + sx * C;
          for (let c = 0; c < C; c++) dst[o + c] = src[s + c];
        }
      }
    }
  }
}

/** 256 floats per channel (one table when all channels share mean and std): (v/255 - mean)/std in float32. */
export function normalizationTable(channels: number, mean: number | readonly number[], std: number | readonly number[]): Float32Array {
  const means = typeof mean === 'number' ? new Array<number>(channels).fill(mean) : [...mean];
  const stds = typeof std === 'number' ? new Array<number>(channels).fill(std) : [...std];
  if (means.length !== channels || stds.length !== channels) {
    throw new DatasetArgumentError(`normalisation needs ${channels} means and stds, got ${means.length} and ${stds.length}`);
  }
  if (stds.some((s) => !(s > 0))) throw new DatasetArgumentError(`normalisation std must be positive, got ${stds.join(', ')}`);
  const uniform = means.every((m) => m === means[0]) && stds.every((s) => s === stds[0]);
  const tables = uniform ? 1 : channels;
  const lut = new Float32Array(256 * tables);
  for (let c = 0; c < tables; c++) {
    const m = Math.fround(means[c]);
    const s = Math.fround(stds[c]);
    // Same float32 steps as ToTensor (x / 255) then Normalize ((x - m) / s).
    for (let v = 0; v < 256; v++) lut[c * 256 + v] = Math.fround(Math.fround(Math.fround(v / 255) - m) / s);
  }
  return lut;
}
