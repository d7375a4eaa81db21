// The summing step of the all-reduce: out[i] = a[i] + b[i] over float32 (out may alias a).
// Two uses: in place (acc += local: a received socket frame, then sent on) and into another
// buffer (out = received + local: a shared-memory slot in, the next slot out). Which kernel is
// fastest depends on the machine, so the ring measures them once per thread (chooseAddKernels)
// and keeps the faster for each use. Measured (tools/bench/allreduce.ts prints it each run), in
// place over 11.2M floats in 4 MiB pieces: on the 2-vCPU AMD EPYC of our CI, the 8-way unrolled JS
// loop `a[i] += b[i]` 17.6 ms, WebAssembly SIMD over cache-sized blocks copied into its memory
// 24.6 ms; on a 16-core Intel Xeon, JS 19.9 ms, WebAssembly 11.7 ms. All give identical bits
// (IEEE single addition, a + b in that operand order, no reassociation), so the choice changes
// speed only, and ranks that choose differently still agree bit for bit.

export type AddKernel = (out: Float32Array, a: Float32Array, b: Float32Array, also?: Float32Array) => void;

/** Reference: the obvious loop. */
export const addPlain: AddKernel = (out, a, b, also) => {
  const n = a.length;
  for (let i = 0; i < n; i++) out[i] = a[i] + b[i];
  if (also !== undefined) also.set(out.subarray(0, n));
};

/** 8-way unrolled JS loop: fewer bounds checks and loop overhead per element. In place
 * (out === a, the ring's case) it runs as `a[i] += b[i]`, which V8 compiles tighter. */
export const addUnrolled: AddKernel = (out, a, b, also) => {
  if (out === a && also === undefined) return accumulateUnrolled(a, b);
  if (also !== undefined) return addTwice(out, a, b, also);
  const n = a.length;
  let i = 0;
  for (; i + 8 <= n; i += 8) {
    out[i] = a[i] + b[i];
    out[i + 1] = a[i + 1] + b[i + 1];
    out[i + 2] = a[i + 2] + b[i + 2];
    out[i + 3] = a[i + 3] + b[i + 3];
    out[i + 4] = a[i + 4] + b[i + 4];
    out[i + 5] = a[i + 5] + b[i + 5];
    out[i + 6] = a[i + 6] + b[i + 6];
    out[i + 7] = a[i + 7] + b[i + 7];
  }
  for (; i < n; i++) out[i] = a[i] + b[i];
};

function addTwice(out: Float32Array, a: Float32Array, b: Float32Array, also: Float32Array): void {
  const n = a.length;
  let i = 0;
  for (; i + 4 <= n; i += 4) {
    const v0 = a[i] + b[i];
    const v1 = a[i + 1] + b[i + 1];
    const v2 = a[i + 2] + b[i + 2];
    const v3 = a[i + 3] + b[i + 3];
    out[i] = v0;
    out[i + 1] = v1;
    out[i + 2] = v2;
    out[i + 3] = v3;
    also[i] = v0;
    also[i + 1] = v1;
    also[i + 2] = v2;
    also[i + 3] = v3;
  }
  for (; i < n; i++) {
    const v = a[i] + b[i];
    out[i] = v;
    also[i] = v;
  }
}

function accumulateUnrolled(a: Float32Array, b: Float32Array): void {
  const n = a.length;
  let i = 0;
  for (; i + 8 <= n; i += 8) {
    a[i] += b[i];
    a[i + 1] += b[i + 1];
    a[i + 2] += b[i + 2];
    a[i + 3] += b[i + 3];
    a[i + 4] += b[i + 4];
    a[i + 5] += b[i + 5];
    a[i + 6] += b[i + 6];
    a[i + 7] += b[i + 7];
  }
  for (; i < n; i++) a[i] += b[i];
}

function leb128(n: number): number[] {
  const out: number[] = [];
  do {
    let byte = n & 0x7f;
    n >>>= 7;
    if (n !== 0) byte |= 0x80;
    out.push(byte);
  } while (n !== 0);
  return out;
}

/**
 * The bytes of a WebAssembly module, written out by hand (no toolchain needed):
 *
 *   (module
 *     (memory (export "mem") 1)
 *     (func (export "add") (param $a i32) (param $b i32) (param $o i32) (param $n i32)
 *       (local $i i32)
 *       (block $done (loop $next
 *         (br_if $done (i32.ge_u (local.get $i) (local.get $n)))
 *         ;; UNROLL times, at byte offsets 0, 16, 32, ...:
 *         (v128.store offset=k (i32.add (local.get $o) (local.get $i))
 *           (f32x4.add (v128.load offset=k (i32.add (local.get $a) (local.get $i)))
 *                      (v128.load offset=k (i32.add (local.get $b) (local.get $i)))))
 *         (local.set $i (i32.add (local.get $i) (i32.const 16*UNROLL)))
 *         (br $next)))))
 *
 * `add` sums $n bytes (a multiple of 16*UNROLL) of float32 at $a and $b into $o.
 */
export function addModuleBytes(unroll = 4): Uint8Array {
  const body: number[] = [];
  body.push(0x02, 0x40, 0x03, 0x40); // block, loop
  body.push(0x20, 4, 0x20, 3, 0x4f, 0x0d, 1); // br_if 1 (i >= n)
  for (let u = 0; u < unroll; u++) {
    const off = leb128(u * 16);
    body.push(0x20, 2, 0x20, 4, 0x6a); // o + i
    body.push(0x20, 0, 0x20, 4, 0x6a, 0xfd, 0x00, 4, ...off); // v128.load (a + i)
    body.push(0x20, 1, 0x20, 4, 0x6a, 0xfd, 0x00, 4, ...off); // v128.load (b + i)
    body.push(0xfd, 0xe4, 0x01); // f32x4.add
    body.push(0xfd, 0x0b, 4, ...off); // v128.store
  }
  const step = unroll * 16;
  // i32.const is signed LEB128: 64 needs two bytes.
  const stepLeb = step < 64 ? [step] : [(step & 0x7f) | 0x80, step >> 7];
  body.push(0x20, 4, 0x41, ...stepLeb, 0x6a, 0x21, 4); // i += step
  body.push(0x0c, 0, 0x0b, 0x0b, 0x0b); // br 0, end loop, end block, end func
  const code = [1, 1, 0x7f, ...body]; // one local group: 1 x i32
  const section = (id: number, content: number[]) => [id, ...leb128(content.length), ...content];
  const name = (s: string) => [s.length, ...Array.from(s, (c) => c.charCodeAt(0))];
  return new Uint8Array([
    0x00, 0x61, 0x73, 0x6d, 0x01, 0x00, 0x00, 0x00,
    ...section(1, [1, 0x60, 4, 0x7f, 0x7f, 0x7f, 0x7f, 0]),
    ...section(3, [1, 0]),
    ...section(5, [1, 0, 1]),
    ...section(7, [2, ...name('mem'), 0x02, 0, ...name('add'), 0x00, 0]),
    ...section(10, [1, ...leb128(code.length), ...code]),
  ]);
}

// Our tsconfig's libs (ES2022, no DOM) do not declare WebAssembly; this is the part we use.
interface WasmMemory {
  readonly buffer: ArrayBuffer;
  grow(pages: number): number;
}
interface WasmApi {
  Module: new (bytes: Uint8Array) => object;
  Instance: new (module: object) => { exports: Record<string, unknown> };
}
const WA = (globalThis as unknown as { WebAssembly?: WasmApi }).WebAssembly;

/** Floats per block copied into WebAssembly memory: 3 blocks of 64 KiB stay in L2. */
export const WASM_BLOCK = 16 * 1024;

/** WebAssembly SIMD kernel, or undefined where SIMD is unavailable. Blocks of `block` floats are
 * copied into its memory (in cache), summed 16 at a time, and copied out. */
export function makeWasmAdd(block = WASM_BLOCK, unroll = 4): AddKernel | undefined {
  const quantum = 4 * unroll; // floats per loop iteration
  if (block % quantum !== 0) throw new RangeError(`block must be a multiple of ${quantum}`);
  if (WA === undefined) return undefined;
  let exports: Record<string, unknown>;
  try {
    exports = new WA.Instance(new WA.Module(addModuleBytes(unroll))).exports;
  } catch {
    return undefined; // no SIMD in this engine
  }
  const mem = exports.mem as WasmMemory;
  const add = exports.add as (a: number, b: number, o: number, n: number) => void;
  const need = 3 * block * 4;
  if (mem.buffer.byteLength < need) mem.grow(Math.ceil((need - mem.buffer.byteLength) / 65536));
  const f = new Float32Array(mem.buffer, 0, 3 * block);
  const A = f.subarray(0, block);
  const B = f.subarray(block, 2 * block);
  const O = f.subarray(2 * block, 3 * block);
  return (out, a, b, also) => {
    const n = a.length;
    let i = 0;
    for (; i + block <= n; i += block) {
      A.set(a.subarray(i, i + block));
      B.set(b.subarray(i, i + block));
      add(0, block * 4, 2 * block * 4, block * 4);
      out.set(O, i);
      if (also !== undefined) also.set(O, i); // O is still in cache
    }
    const rest = n - i;
    const vec = rest - (rest % quantum);
    if (vec > 0) {
      A.set(a.subarray(i, i + vec));
      B.set(b.subarray(i, i + vec));
      add(0, block * 4, 2 * block * 4, vec * 4);
      out.set(O.subarray(0, vec), i);
      if (also !== undefined) also.set(O.subarray(0, vec), i);
      i += vec;
    }
    for (; i < n; i++) {
      const v = a[i] + b[i];
      out[i] = v;
      if (also !== undefined) also[i] = v;
    }
  };
}

export interface AddKernelChoice {
  inPlace: AddKernel;
  outOfPlace: AddKernel;
  names: { inPlace: string; outOfPlace: string };
}

let choice: AddKernelChoice | undefined;

/**
 * Times the JS and WebAssembly kernels here, in both uses, on 4 MiB buffers (the ring's piece
 * size: memory-bound as in the ring), alternating, best of 4; keeps the faster for each use.
 * About 50 ms, once per thread, at the first all-reduce. DTRAIN_SUM_KERNEL=js or wasm forces one.
 */
export function chooseAddKernels(): AddKernelChoice {
  const wasm = makeWasmAdd();
  const forced = process.env.DTRAIN_SUM_KERNEL;
  const js = { name: 'js-unrolled', k: addUnrolled };
  if (wasm === undefined || forced === 'js') return (choice = { inPlace: addUnrolled, outOfPlace: addUnrolled, names: { inPlace: js.name, outOfPlace: js.name } });
  const w = { name: 'wasm-simd', k: wasm };
  if (forced === 'wasm') return (choice = { inPlace: wasm, outOfPlace: wasm, names: { inPlace: w.name, outOfPlace: w.name } });
  const n = 1 << 20;
  const a = new Float32Array(n);
  const b = new Float32Array(n);
  const o = new Float32Array(n);
  for (let i = 0; i < n; i++) {
    a[i] = (i % 251) * 0.25;
    b[i] = (i % 97) * 0.5;
  }
  const time = (f: () => void) => {
    const t0 = performance.now();
    f();
    return performance.now() - t0;
  };
  const best = { jsIn: Infinity, wIn: Infinity, jsOut: Infinity, wOut: Infinity };
  for (let r = 0; r < 4; r++) {
    best.jsIn = Math.min(best.jsIn, time(() => addUnrolled(a, a, b)));
    best.wIn = Math.min(best.wIn, time(() => wasm(a, a, b)));
    best.jsOut = Math.min(best.jsOut, time(() => addUnrolled(o, a, b)));
    best.wOut = Math.min(best.wOut, time(() => wasm(o, a, b)));
  }
  const inPlace = best.wIn < best.jsIn ? w : js;
  const outOfPlace = best.wOut < best.jsOut ? w : js;
  return (choice = { inPlace: inPlace.k, outOfPlace: outOfPlace.k, names: { inPlace: inPlace.name, outOfPlace: outOfPlace.name } });
}

/** The kernels this thread uses (measured at the first call). */
export function addKernelNames(): AddKernelChoice['names'] {
  return (choice ?? chooseAddKernels()).names;
}

/** The kernel the all-reduce uses: in place or not, the faster one on this machine. */
export const addInto: AddKernel = (out, a, b, also) => {
  const c = choice ?? chooseAddKernels();
  return (out === a && also === undefined ? c.inPlace : c.outOfPlace)(out, a, b, also);
};

/** out[i] = a[i] / d, in place allowed. Division (not multiplication by 1/d) so averaging gives
 * the correctly rounded quotient. */
export function divideInto(out: Float32Array, a: Float32Array, d: number): void {
  const n = a.length;
  for (let i = 0; i < n; i++) out[i] = a[i] / d;
}
