import { describe, expect, it } from 'vitest';
import { addInto, addKernelNames, chooseAddKernels, addPlain, addUnrolled, makeWasmAdd, WASM_BLOCK, type AddKernel } from './sum.js';
import { accumulateHalf, decodeHalf, encodeHalf, finishHalf, floatToHalf, HALF_TO_FLOAT, roundThroughHalf } from './fp16.js';

function random(n: number, seed: number): Float32Array {
  let s = seed;
  const a = new Float32Array(n);
  for (let i = 0; i < n; i++) {
    s = (s * 1103515245 + 12345) >>> 0;
    a[i] = ((s / 2 ** 32) - 0.5) * 10 ** ((s % 7) - 3);
  }
  return a;
}

const bits = (a: Float32Array) => Buffer.from(a.buffer, a.byteOffset, a.byteLength);

describe('sum kernels', () => {
  const wasm = makeWasmAdd();
  const kernels: [string, AddKernel][] = [['unrolled', addUnrolled], ['addInto', addInto]];
  if (wasm !== undefined) kernels.push(['wasm', wasm], ['wasm small blocks', makeWasmAdd(64)!]);

  it('has WebAssembly SIMD on Node 20; the ring picks a kernel per use by timing both here, or as forced', () => {
    expect(wasm).toBeDefined();
    const names = addKernelNames();
    for (const use of ['inPlace', 'outOfPlace'] as const) expect(['js-unrolled', 'wasm-simd']).toContain(names[use]);
    const saved = process.env.DTRAIN_SUM_KERNEL;
    try {
      process.env.DTRAIN_SUM_KERNEL = 'wasm';
      expect(chooseAddKernels().names).toEqual({ inPlace: 'wasm-simd', outOfPlace: 'wasm-simd' });
      process.env.DTRAIN_SUM_KERNEL = 'js';
      expect(chooseAddKernels().names).toEqual({ inPlace: 'js-unrolled', outOfPlace: 'js-unrolled' });
    } finally {
      if (saved === undefined) delete process.env.DTRAIN_SUM_KERNEL;
      else process.env.DTRAIN_SUM_KERNEL = saved;
      chooseAddKernels();
    }
  });

  it('match the plain loop bit for bit, at every length around block edges, aliased or not', () => {
    const lengths = [0, 1, 3, 15, 16, 17, 63, 64, 65, 1000, WASM_BLOCK - 1, WASM_BLOCK, WASM_BLOCK + 17, 3 * WASM_BLOCK + 5];
    for (const n of lengths) {
      const a = random(n, n + 1);
      const b = random(n, n + 2);
      if (n > 10) {
        a[3] = NaN;
        b[4] = Infinity;
        a[5] = Infinity;
        b[5] = -Infinity;
        a[6] = -0;
        b[6] = -0;
      }
      const ref = new Float32Array(n);
      addPlain(ref, a, b);
      for (const [name, k] of kernels) {
        const out = new Float32Array(n);
        k(out, a, b);
        expect(bits(out).equals(bits(ref)), `${name} n=${n}`).toBe(true);
        const inPlace = a.slice();
        k(inPlace, inPlace, b);
        expect(bits(inPlace).equals(bits(ref)), `${name} in place n=${n}`).toBe(true);
        const both = a.slice();
        const second = new Float32Array(n);
        k(both, both, b, second);
        expect(bits(both).equals(bits(ref)) && bits(second).equals(bits(ref)), `${name} two outputs n=${n}`).toBe(true);
      }
    }
  });

  it('work on unaligned-length subarrays of a larger buffer', () => {
    const big = random(5 * WASM_BLOCK, 9);
    const other = random(5 * WASM_BLOCK, 10);
    const a = big.subarray(7, 7 + 2 * WASM_BLOCK + 3);
    const b = other.subarray(1, 1 + a.length);
    const ref = new Float32Array(a.length);
    addPlain(ref, a, b);
    const out = new Float32Array(a.length);
    addInto(out, a, b);
    expect(bits(out).equals(bits(ref))).toBe(true);
  });
});

describe('fp16', () => {
  it('decodes every half exactly and encodes it back to itself', () => {
    const bad: number[] = [];
    for (let h = 0; h < 65536; h++) {
      const f = HALF_TO_FLOAT[h];
      if (Number.isNaN(f) ? !Number.isNaN(HALF_TO_FLOAT[floatToHalf(f)]) : floatToHalf(f) !== h) bad.push(h);
    }
    expect(bad).toEqual([]);
    expect(HALF_TO_FLOAT[0x3c00]).toBe(1);
    expect(HALF_TO_FLOAT[0x7bff]).toBe(65504);
    expect(HALF_TO_FLOAT[0x0001]).toBe(2 ** -24);
  });

  it('rounds to the nearest half, ties to even, overflow to infinity', () => {
    const a = random(200000, 5);
    const bad: number[] = [];
    for (let i = 0; i < a.length; i++) {
      const x = a[i];
      const h = floatToHalf(x);
      const v = HALF_TO_FLOAT[h];
      // No other half is closer: check both neighbours.
      for (const nb of [h - 1, h + 1]) {
        if ((nb & 0x7fff) > 0x7c00 || nb < 0 || nb > 0xffff || ((nb ^ h) & 0x8000) !== 0) continue;
        const w = HALF_TO_FLOAT[nb];
        if (Math.abs(x - v) > Math.abs(x - w)) bad.push(x);
        if (Math.abs(x - v) === Math.abs(x - w) && (h & 1) !== 0) bad.push(x);
      }
    }
    expect(bad).toEqual([]);
    expect(floatToHalf(65520)).toBe(0x7c00); // halfway to 2^16 rounds to even: infinity
    expect(floatToHalf(65519)).toBe(0x7bff);
    expect(floatToHalf(-1e9)).toBe(0xfc00);
    expect(floatToHalf(2 ** -25)).toBe(0); // tie between 0 and the smallest subnormal: even
    expect(floatToHalf(2 ** -25 * 1.5)).toBe(1);
    expect(Number.isNaN(HALF_TO_FLOAT[floatToHalf(NaN)])).toBe(true);
  });

  it('encodeHalf/decodeHalf/roundThroughHalf agree', () => {
    const a = random(1000, 3);
    const h = new Uint16Array(a.length);
    encodeHalf(h, a);
    const back = new Float32Array(a.length);
    decodeHalf(back, h);
    const r = a.slice();
    roundThroughHalf(r);
    expect(bits(back).equals(bits(r))).toBe(true);
  });

  it('the bulk conversions round exactly as floatToHalf, bit for bit: every half, its neighbours and midpoints, specials, random bits', () => {
    const cases: number[] = [];
    const f = new Float32Array(1);
    const u = new Uint32Array(f.buffer);
    for (let h = 0; h < 0x10000; h++) {
      f[0] = HALF_TO_FLOAT[h];
      const b = u[0];
      // The float itself, one float ulp either side, and the midpoint to the next half (a tie).
      cases.push(b, b + 1, b - 1);
      if ((h & 0x7c00) !== 0x7c00) {
        f[0] = (HALF_TO_FLOAT[h] + HALF_TO_FLOAT[h + 1]) / 2;
        cases.push(u[0], u[0] + 1, u[0] - 1);
      }
    }
    let s = 7;
    for (let i = 0; i < 1_000_000; i++) cases.push((s = (Math.imul(s, 1103515245) + 12345) >>> 0));
    cases.push(0, 0x80000000, 0x7f800000, 0xff800000, 0x7fc00000, 0x7f800001, 0x477fe000, 0x477ff000, 0x477fffff, 0x47800000, 0x33000000, 0x33000001, 0x387fffff, 0x38800000);
    const src = new Float32Array(new Uint32Array(cases.map((c) => c >>> 0)).buffer);
    const want = Uint16Array.from(src, (x) => floatToHalf(x));
    const got = new Uint16Array(src.length);
    encodeHalf(got, src);
    const diff = got.findIndex((h, i) => h !== want[i] && !(Number.isNaN(HALF_TO_FLOAT[h]) && Number.isNaN(HALF_TO_FLOAT[want[i]])));
    expect(diff, diff >= 0 ? `bits 0x${(cases[diff] >>> 0).toString(16)}: 0x${got[diff].toString(16)} vs 0x${want[diff].toString(16)}` : '').toBe(-1);

    // The ring's two hops, against the per-element definition.
    const local = random(50_001, 9);
    const io = new Uint16Array(local.length);
    encodeHalf(io, random(50_001, 10));
    const sumRef = Uint16Array.from(io, (h, i) => floatToHalf(Math.fround(HALF_TO_FLOAT[h] + local[i])));
    const acc = io.slice();
    accumulateHalf(acc, local);
    expect(Buffer.from(acc.buffer).equals(Buffer.from(sumRef.buffer))).toBe(true);
    for (const divisor of [1, 3]) {
      const wire = io.slice();
      const mine = local.slice();
      finishHalf(wire, mine, divisor);
      for (let i = 0; i < io.length; i++) {
        const h = floatToHalf(Math.fround(Math.fround(HALF_TO_FLOAT[io[i]] + local[i]) / divisor));
        if (wire[i] !== h || mine[i] !== HALF_TO_FLOAT[h]) throw new Error(`finishHalf differs at ${i} (divisor ${divisor})`);
      }
    }
  });
});
