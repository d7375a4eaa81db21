// IEEE 754 binary16 <-> binary32 conversion for fp16 on the wire. Decoding is a 64K-entry table
// lookup (exact). Encoding rounds to nearest, ties to even, overflows to +-Infinity, keeps NaN a
// NaN (quiet) and produces subnormals, as a hardware conversion would.

const f32 = new Float32Array(1);
const u32 = new Uint32Array(f32.buffer);

function halfToFloatSlow(h: number): number {
  const sign = h & 0x8000 ? -1 : 1;
  const exp = (h >> 10) & 0x1f;
  const frac = h & 0x3ff;
  if (exp === 0) return sign * frac * 2 ** -24;
  if (exp === 31) return frac === 0 ? sign * Infinity : NaN;
  return sign * (1 + frac / 1024) * 2 ** (exp - 15);
}

/** HALF_TO_FLOAT[h] is the float32 value of the binary16 bit pattern h. */
export const HALF_TO_FLOAT: Float32Array = (() => {
  const t = new Float32Array(65536);
  for (let h = 0; h < 65536; h++) t[h] = halfToFloatSlow(h);
  return t;
})();

/** Bits of the binary16 nearest to the float32 `x` (ties to even). */
export function floatToHalf(x: number): number {
  f32[0] = x;
  const b = u32[0];
  const sign = (b >>> 16) & 0x8000;
  const exp = (b >>> 23) & 0xff;
  let mant = b & 0x7fffff;
  if (exp === 0xff) return sign | (mant !== 0 ? 0x7e00 : 0x7c00);
  const e = exp - 127 + 15;
  if (e >= 31) return sign | 0x7c00;
  if (e <= 0) {
    if (e < -10) return sign; // below half the smallest subnormal: rounds to zero
    mant |= 0x800000;
    const shift = 14 - e; // 14..24
    const half = mant >>> shift;
    const rem = mant & ((1 << shift) - 1);
    const mid = 1 << (shift - 1);
    return sign | (half + (rem > mid || (rem === mid && (half & 1) === 1) ? 1 : 0));
  }
  const half = (e << 10) | (mant >>> 13);
  const rem = mant & 0x1fff;
  // A carry out of the mantissa correctly bumps the exponent (up to Infinity).
  return sign | (half + (rem > 0x1000 || (rem === 0x1000 && (half & 1) === 1) ? 1 : 0));
}

// The bulk conversions below read the float's bits through a Uint32Array view of the same
// memory (no per-element scratch store and reload) and round with integer arithmetic: F. Giesen's
// float_to_half_fast3_rtne. Measured on 5.6M floats: 4-7x faster than floatToHalf per element.
// floatToHalf stays the reference they are tested against, bit for bit.

/** Bits of the binary16 nearest to the float32 whose bits are `b` (ties to even). */
function bitsToHalf(b: number): number {
  const sign = (b >>> 16) & 0x8000;
  const a = b & 0x7fffffff;
  // >= 65520 rounds to Infinity; NaN stays NaN (quiet), Infinity stays Infinity.
  if (a >= 0x47800000) return sign | (a > 0x7f800000 ? 0x7e00 : 0x7c00);
  // Normal binary16: rebias the exponent, add the rounding bias (0xfff + the lowest kept bit), cut.
  if (a >= 0x38800000) return sign | ((a - 0x38000000 + 0xfff + ((a >>> 13) & 1)) >>> 13);
  // Subnormal or zero: adding 0.5 in float32 shifts the 10 kept bits to the bottom, rounding them
  // to nearest even as float addition does (|x| < 2^-14 here, so no carry reaches the exponent
  // of 0.5); the bits of the sum minus those of 0.5 are the result.
  SCRATCH_U32[0] = a;
  SCRATCH_F32[0] = SCRATCH_F32[0] + 0.5;
  return sign | (SCRATCH_U32[0] - 0x3f000000);
}
const SCRATCH_F32 = new Float32Array(1);
const SCRATCH_U32 = new Uint32Array(SCRATCH_F32.buffer);

/** A Uint32Array over the same bytes as `a`. */
const bitsOf = (a: Float32Array) => new Uint32Array(a.buffer, a.byteOffset, a.length);

/** Float32 work area of the bulk conversions (sums are rounded to float32 here, then read as bits). */
const BLOCK = 4096;
const BLOCK_F32 = new Float32Array(BLOCK);
const BLOCK_U32 = new Uint32Array(BLOCK_F32.buffer);

/** dst[i] = half(src[i]). */
export function encodeHalf(dst: Uint16Array, src: Float32Array): void {
  const n = src.length;
  const bits = bitsOf(src);
  for (let i = 0; i < n; i++) dst[i] = bitsToHalf(bits[i]);
}

/** dst[i] = float(src[i]). */
export function decodeHalf(dst: Float32Array, src: Uint16Array): void {
  const t = HALF_TO_FLOAT;
  const n = src.length;
  for (let i = 0; i < n; i++) dst[i] = t[src[i]];
}

/** The reduce-scatter hop in fp16: io[i] = half(float(io[i]) + local[i]), summed in float32. */
export function accumulateHalf(io: Uint16Array, local: Float32Array): void {
  const t = HALF_TO_FLOAT;
  const n = io.length;
  for (let o = 0; o < n; o += BLOCK) {
    const m = Math.min(BLOCK, n - o);
    for (let j = 0; j < m; j++) BLOCK_F32[j] = t[io[o + j]] + local[o + j];
    for (let j = 0; j < m; j++) io[o + j] = bitsToHalf(BLOCK_U32[j]);
  }
}

/**
 * The chunk owner's last reduce-scatter hop in fp16: the sum (divided by `divisor`, in float32)
 * goes on the wire as io[i] = half(sum), and local[i] keeps exactly the value the others will
 * decode from it, so every rank ends with the same bits.
 */
export function finishHalf(io: Uint16Array, local: Float32Array, divisor: number): void {
  const t = HALF_TO_FLOAT;
  const n = io.length;
  for (let o = 0; o < n; o += BLOCK) {
    const m = Math.min(BLOCK, n - o);
    if (divisor === 1) for (let j = 0; j < m; j++) BLOCK_F32[j] = t[io[o + j]] + local[o + j];
    else for (let j = 0; j < m; j++) BLOCK_F32[j] = Math.fround(t[io[o + j]] + local[o + j]) / divisor;
    for (let j = 0; j < m; j++) {
      const h = bitsToHalf(BLOCK_U32[j]);
      io[o + j] = h;
      local[o + j] = t[h];
    }
  }
}

/** Rounds every value to the nearest binary16 and back (what the receiver of fp16 sees). */
export function roundThroughHalf(a: Float32Array): void {
  const t = HALF_TO_FLOAT;
  const n = a.length;
  const bits = bitsOf(a);
  for (let i = 0; i < n; i++) a[i] = t[bitsToHalf(bits[i])];
}
