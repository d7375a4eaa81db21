// Measures batch assembly and Fashion-MNIST loading on this machine:
//   node --import tsx packages/data/scripts/measure.ts
// Prints one JSON line per measurement. Numbers, not assertions: machines are shared and noisy.
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { BatchAssembler, loadFashionMnistClasses, makeSyntheticTestDataset, Rng, splitFashionMnist } from '../src/index.js';
import { fashionMnistPackageDir, readFashionMnistPackage } from '../src/fashion-mnist.js';

function timeIt(reps: number, f: () => void): number {
  for (let i = 0; i < Math.min(10, reps); i++) f();
  const t = performance.now();
  for (let i = 0; i < reps; i++) f();
  return (performance.now() - t) / reps;
}

const cases = [
  { name: 'rgb 32->96, batch 64', h: 32, c: 3, out: 96, augment: false },
  { name: 'rgb 32->96, batch 64, crop 4 + flip', h: 32, c: 3, out: 96, augment: true },
  { name: 'gray 28->96, batch 64', h: 28, c: 1, out: 96, augment: false },
  { name: 'rgb 32->32 (no resize), batch 64', h: 32, c: 3, out: 32, augment: false },
];
for (const k of cases) {
  const ds = makeSyntheticTestDataset({ count: 2048, height: k.h, width: k.h, channels: k.c, seed: 1 });
  const asm = new BatchAssembler(ds, { height: k.out, width: k.out, augment: k.augment ? { cropPadding: 4, horizontalFlip: true } : undefined });
  const rng = new Rng(0);
  const idx = rng.permutation(ds.count);
  const into = { x: new Float32Array(64 * asm.imageLength), y: new Int32Array(64) };
  let at = 0;
  const ms = timeIt(100, () => {
    asm.assemble(ds, idx.subarray(at, at + 64), k.augment ? rng : undefined, into);
    at = (at + 64) % (ds.count - 64);
  });
  console.log(JSON.stringify({ measure: 'batch-assembly', case: k.name, msPerBatch: +ms.toFixed(2) }));
}

const dir = await fs.mkdtemp(path.join(os.tmpdir(), 'dtrain-measure-'));
try {
  let t = performance.now();
  await readFashionMnistPackage();
  const parseMs = performance.now() - t;
  t = performance.now();
  await loadFashionMnistClasses({ dataDir: dir });
  const firstMs = performance.now() - t;
  t = performance.now();
  const classes = await loadFashionMnistClasses({ dataDir: dir });
  const cachedMs = performance.now() - t;
  t = performance.now();
  splitFashionMnist(classes, 'train');
  splitFashionMnist(classes, 'test');
  const splitMs = performance.now() - t;
  t = performance.now();
  for (let c = 0; c < 10; c++) {
    JSON.parse(await fs.readFile(path.join(fashionMnistPackageDir(), 'src', 'clothes', `${c}.json`), 'utf8'));
  }
  const jsonParseMs = performance.now() - t;
  console.log(JSON.stringify({
    measure: 'fashion-mnist-load',
    parsePackageMs: Math.round(parseMs),
    parsePlusCacheWriteMs: Math.round(firstMs),
    fromCacheMs: Math.round(cachedMs),
    splitBothMs: Math.round(splitMs),
    plainJsonParseMs: Math.round(jsonParseMs),
  }));
} finally {
  await fs.rm(dir, { recursive: true, force: true });
}

