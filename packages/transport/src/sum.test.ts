import { describe, expect, it } from 'vitest';
import { addInto, addKernelName, addPlain, addUnrolled, makeWasmAdd, WASM_BLOCK, type AddKernel } from './sum.js';
import { decodeHalf, encodeHalf, floatToHalf, HALF_TO_FLOAT, roundThroughHalf } from './fp16.js';

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

  it('has WebAssembly SIMD on Node 20 (measured against the JS loops in the benchmark)', () => {
    expect(wasm).toBeDefined();
    expect(addKernelName).toBe('js-unrolled');
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
});
