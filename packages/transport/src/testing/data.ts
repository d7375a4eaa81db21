// Deterministic test data and the reference results the all-reduce must reproduce.
import { floatToHalf, HALF_TO_FLOAT } from '../fp16.js';

/** mulberry32: small, fast, deterministic. */
export function rng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

export interface DataSpec {
  len: number;
  seed: number;
  /** Put NaN, +Inf and -Inf at fixed places on ranks 0, 1 and 2. */
  specials?: boolean;
}

/** Rank `rank`'s input: values in +-[0.001, 100), never zero, sign and magnitude varied. */
export function makeData(spec: DataSpec, rank: number): Float32Array {
  const next = rng(spec.seed * 7919 + rank * 104729 + 1);
  const a = new Float32Array(spec.len);
  for (let i = 0; i < a.length; i++) {
    const m = 0.001 + next() * 10 ** Math.floor(next() * 5 - 2);
    a[i] = next() < 0.5 ? -m : m;
  }
  if (spec.specials === true && spec.len >= 8) {
    if (rank === 0) a[1] = NaN;
    if (rank === 1) a[3] = Infinity;
    if (rank === 2) a[3] = -Infinity; // +Inf + -Inf = NaN at index 3 when world >= 3
    if (rank === 1) a[5] = Infinity;
    if (rank === 0) a[6] = -Infinity;
  }
  return a;
}

/** The documented result: chunk c of each op summed as ((x_c + x_{c+1}) + ...) + x_{c-1}. */
export function ringReference(inputs: Float32Array[], opts: { average?: boolean; fp16?: boolean } = {}): Float32Array {
  const n = inputs.length;
  const len = inputs[0].length;
  const out = new Float32Array(len);
  const per = Math.max(1, len);
  for (let b = 0; b < len; b += per) {
    const blen = Math.min(per, len - b);
    const base = Math.floor(blen / n);
    const extra = blen % n;
    for (let c = 0; c < n; c++) {
      const start = b + c * base + Math.min(c, extra);
      const count = base + (c < extra ? 1 : 0);
      for (let i = start; i < start + count; i++) {
        if (n === 1) {
          out[i] = inputs[0][i];
          continue;
        }
        if (opts.fp16 !== true) {
          let acc = inputs[c][i];
          for (let k = 1; k < n; k++) acc = Math.fround(acc + inputs[(c + k) % n][i]);
          out[i] = opts.average === true ? Math.fround(acc / n) : acc;
        } else {
          let h = floatToHalf(inputs[c][i]);
          for (let k = 1; k < n; k++) {
            let v = Math.fround(HALF_TO_FLOAT[h] + inputs[(c + k) % n][i]);
            if (k === n - 1 && opts.average === true) v = Math.fround(v / n);
            h = floatToHalf(v);
          }
          out[i] = HALF_TO_FLOAT[h];
        }
      }
    }
  }
  return out;
}

/** Plain sum in rank order, in float64: what the ring's result must be close to. */
export function naiveSum(inputs: Float32Array[]): Float64Array {
  const out = new Float64Array(inputs[0].length);
  for (const a of inputs) for (let i = 0; i < a.length; i++) out[i] += a[i];
  return out;
}

/** Ring.allReduceStaged's result: each of `buckets` (together covering the buffer) one all-reduce. */
export function stagedReference(inputs: Float32Array[], buckets: ReadonlyArray<readonly [number, number]>, opts: { average?: boolean; fp16?: boolean } = {}): Float32Array {
  const want = new Float32Array(inputs[0].length);
  for (const [from, to] of buckets) want.set(ringReference(inputs.map((a) => a.subarray(from, to)), opts), from);
  return want;
}

/** [from, to) ranges of `per` floats covering `len`, last first (the order a backward pass fills them). */
export function tailFirstBuckets(len: number, per: number): [number, number][] {
  const out: [number, number][] = [];
  for (let from = 0; from < len; from += per) out.push([from, Math.min(len, from + per)]);
  return out.reverse();
}
