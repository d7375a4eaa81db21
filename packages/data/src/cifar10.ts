import fs from 'node:fs/promises';
import path from 'node:path';
import { makeDataset, type Dataset } from './dataset.js';
import { DataFileMissingError, DataFileSizeError, DataFormatError, DataLabelError } from './errors.js';

export const CIFAR10_RECORD_BYTES = 3073;
export const CIFAR10_RECORDS_PER_FILE = 10_000;
/** The folder that `cifar-10-binary.tar.gz` unpacks to, inside the data directory. */
export const CIFAR10_DIRNAME = 'cifar-10-batches-bin';
export const CIFAR10_TRAIN_FILES = ['data_batch_1.bin', 'data_batch_2.bin', 'data_batch_3.bin', 'data_batch_4.bin', 'data_batch_5.bin'] as const;
export const CIFAR10_TEST_FILES = ['test_batch.bin'] as const;
export const CIFAR10_META_FILE = 'batches.meta.txt';
export const CIFAR10_ALL_FILES = [...CIFAR10_TRAIN_FILES, ...CIFAR10_TEST_FILES, CIFAR10_META_FILE] as const;

export type Split = 'train' | 'test';

function fixHint(dataDir: string): string {
  return (
    `Run 'pnpm cli data download cifar10 --dir ${dataDir}', or download cifar-10-binary.tar.gz by hand ` +
    `and unpack it there so that ${path.join(dataDir, CIFAR10_DIRNAME, 'data_batch_1.bin')} exists`
  );
}

export interface ReadBatchOptions {
  /** Records the file must hold: 10,000 for the real files; tests use fewer. */
  recordsPerFile?: number;
  /** What to tell the user on failure (defaults to re-downloading into the file's data directory). */
  hint?: string;
}

export interface Cifar10Batch {
  /** NHWC uint8, 32x32x3 per image. */
  images: Uint8Array;
  labels: Uint8Array;
}

async function readOrMissing(file: string, hint: string): Promise<Buffer> {
  try {
    return await fs.readFile(file);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') throw new DataFileMissingError(file, hint);
    throw err;
  }
}

/**
 * Reads one CIFAR-10 binary batch file: records of 1 label byte then the 1,024 red, 1,024 green and
 * 1,024 blue bytes (rows top to bottom). Converts planar (CHW) records to channels-last (HWC).
 */
export async function readCifar10Batch(file: string, options: ReadBatchOptions = {}): Promise<Cifar10Batch> {
  const records = options.recordsPerFile ?? CIFAR10_RECORDS_PER_FILE;
  const hint = options.hint ?? fixHint(path.dirname(path.dirname(path.resolve(file))));
  const buf = await readOrMissing(file, hint);
  if (buf.length % CIFAR10_RECORD_BYTES !== 0) {
    throw new DataFileSizeError(
      file,
      `size ${buf.length} bytes is not a multiple of the ${CIFAR10_RECORD_BYTES}-byte record (the file is truncated or not a CIFAR-10 binary batch)`,
      hint,
    );
  }
  const n = buf.length / CIFAR10_RECORD_BYTES;
  if (n !== records) {
    throw new DataFileSizeError(file, `holds ${n} records, expected ${records}`, hint);
  }
  const labels = new Uint8Array(n);
  const images = new Uint8Array(n * 3072);
  for (let i = 0; i < n; i++) {
    const rec = i * CIFAR10_RECORD_BYTES;
    const label = buf[rec];
    if (label > 9) {
      throw new DataLabelError(file, `record ${i} (byte offset ${rec}) has label ${label}, outside 0-9`, hint);
    }
    labels[i] = label;
    const r = rec + 1;
    const g = r + 1024;
    const b = g + 1024;
    let o = i * 3072;
    for (let p = 0; p < 1024; p++) {
      images[o] = buf[r + p];
      images[o + 1] = buf[g + p];
      images[o + 2] = buf[b + p];
      o += 3;
    }
  }
  return { images, labels };
}

/** The 10 class names, one per non-empty line of batches.meta.txt. */
export async function readCifar10ClassNames(file: string, hint?: string): Promise<string[]> {
  const h = hint ?? fixHint(path.dirname(path.dirname(path.resolve(file))));
  const text = (await readOrMissing(file, h)).toString('utf8');
  const names = text.split(/\r?\n/).map((s) => s.trim()).filter((s) => s.length > 0);
  if (names.length !== 10) {
    throw new DataFormatError(file, `has ${names.length} class names, expected 10 (one per line)`, h);
  }
  return names;
}

export interface LoadCifar10Options {
  /** The data directory: the files are read from `<dataDir>/cifar-10-batches-bin/`. */
  dataDir: string;
  split: Split;
  recordsPerFile?: number;
}

/** Loads the train split (data_batch_1..5, 50,000 images) or the test split (test_batch, 10,000). */
export async function loadCifar10(options: LoadCifar10Options): Promise<Dataset> {
  const dir = path.join(options.dataDir, CIFAR10_DIRNAME);
  const hint = fixHint(options.dataDir);
  const files = options.split === 'train' ? CIFAR10_TRAIN_FILES : CIFAR10_TEST_FILES;
  // Check every file exists first, so a user missing several hears about the first before a long read.
  for (const f of [CIFAR10_META_FILE, ...files]) {
    const p = path.join(dir, f);
    try {
      await fs.access(p);
    } catch {
      throw new DataFileMissingError(p, hint);
    }
  }
  const classNames = await readCifar10ClassNames(path.join(dir, CIFAR10_META_FILE), hint);
  const batches: Cifar10Batch[] = [];
  for (const f of files) {
    batches.push(await readCifar10Batch(path.join(dir, f), { recordsPerFile: options.recordsPerFile, hint }));
  }
  const count = batches.reduce((s, b) => s + b.labels.length, 0);
  const images = batches.length === 1 ? batches[0].images : new Uint8Array(count * 3072);
  const labels = batches.length === 1 ? batches[0].labels : new Uint8Array(count);
  if (batches.length > 1) {
    let n = 0;
    for (const b of batches) {
      images.set(b.images, n * 3072);
      labels.set(b.labels, n);
      n += b.labels.length;
    }
  }
  return makeDataset({ name: `cifar10/${options.split}`, images, labels, height: 32, width: 32, channels: 3, classNames });
}

/** True when every file of the binary version is present (sizes are checked when read). */
export async function hasCifar10(dataDir: string): Promise<boolean> {
  for (const f of CIFAR10_ALL_FILES) {
    try {
      await fs.access(path.join(dataDir, CIFAR10_DIRNAME, f));
    } catch {
      return false;
    }
  }
  return true;
}
