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

/** dst[i] = half(src[i]). */
export function encodeHalf(dst: Uint16Array, src: Float32Array): void {
  const n = src.length;
  for (let i = 0; i < n; i++) dst[i] = floatToHalf(src[i]);
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
  for (let i = 0; i < n; i++) io[i] = floatToHalf(Math.fround(t[io[i]] + local[i]));
}

/** Rounds every value to the nearest binary16 and back (what the receiver of fp16 sees). */
export function roundThroughHalf(a: Float32Array): void {
  const t = HALF_TO_FLOAT;
  const n = a.length;
  for (let i = 0; i < n; i++) a[i] = t[floatToHalf(a[i])];
}
