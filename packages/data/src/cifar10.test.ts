import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { CIFAR10_DIRNAME, hasCifar10, loadCifar10, readCifar10Batch, readCifar10ClassNames } from './cifar10.js';
import { DataFileMissingError, DataFileSizeError, DataFormatError, DataLabelError } from './errors.js';

const NAMES = ['airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship', 'truck'];

/** A known value per (file, record, channel, row, col), different for every neighbour. */
function pixel(file: number, rec: number, ch: number, y: number, x: number): number {
  return (file * 97 + rec * 31 + ch * 83 + y * 7 + x * 3) & 255;
}

/** Writes records in the exact binary layout: label byte, 1024 R, 1024 G, 1024 B (rows top to bottom). */
function cifarBytes(file: number, records: number, label = (r: number) => (r + file) % 10): Buffer {
  const buf = Buffer.alloc(records * 3073);
  for (let r = 0; r < records; r++) {
    const o = r * 3073;
    buf[o] = label(r);
    for (let ch = 0; ch < 3; ch++)
      for (let y = 0; y < 32; y++) for (let x = 0; x < 32; x++) buf[o + 1 + ch * 1024 + y * 32 + x] = pixel(file, r, ch, y, x);
  }
  return buf;
}

let root: string;
let dir: string;
beforeEach(async () => {
  root = await fs.mkdtemp(path.join(os.tmpdir(), 'dtrain-cifar-'));
  dir = path.join(root, CIFAR10_DIRNAME);
  await fs.mkdir(dir);
});
afterEach(async () => {
  await fs.rm(root, { recursive: true, force: true });
});

async function writeAll(records: number): Promise<void> {
  for (let f = 1; f <= 5; f++) await fs.writeFile(path.join(dir, `data_batch_${f}.bin`), cifarBytes(f, records));
  await fs.writeFile(path.join(dir, 'test_batch.bin'), cifarBytes(0, records));
  await fs.writeFile(path.join(dir, 'batches.meta.txt'), NAMES.join('\n') + '\n\n');
}

describe('CIFAR-10 binary reader', () => {
  it('reads a full-size 10,000-record file and puts each byte at its NHWC position', async () => {
    const file = path.join(dir, 'data_batch_1.bin');
    await fs.writeFile(file, cifarBytes(1, 10_000));
    const { images, labels } = await readCifar10Batch(file);
    expect(labels.length).toBe(10_000);
    expect(images.length).toBe(10_000 * 3072);
    for (const [r, y, x] of [[0, 0, 0], [0, 31, 31], [1, 0, 1], [9_999, 17, 5], [4_321, 31, 0]]) {
      expect(labels[r]).toBe((r + 1) % 10);
      for (let ch = 0; ch < 3; ch++) expect(images[r * 3072 + (y * 32 + x) * 3 + ch]).toBe(pixel(1, r, ch, y, x));
    }
  });

  it('loads train (5 batches, in order) and test with class names', async () => {
    await writeAll(3);
    const train = await loadCifar10({ dataDir: root, split: 'train', recordsPerFile: 3 });
    expect([train.count, train.height, train.width, train.channels]).toEqual([15, 32, 32, 3]);
    expect(train.classNames).toEqual(NAMES);
    // Image 7 is record 1 of data_batch_3.bin.
    expect(train.labels[7]).toBe((1 + 3) % 10);
    expect(train.images[7 * 3072 + (2 * 32 + 30) * 3 + 2]).toBe(pixel(3, 1, 2, 2, 30));
    const test = await loadCifar10({ dataDir: root, split: 'test', recordsPerFile: 3 });
    expect(test.count).toBe(3);
    expect(test.name).toBe('cifar10/test');
    expect(test.images[2 * 3072 + 1]).toBe(pixel(0, 2, 1, 0, 0));
    expect(await hasCifar10(root)).toBe(true);
  });

  it('rejects a missing file, naming it and the download command', async () => {
    await writeAll(3);
    await fs.rm(path.join(dir, 'data_batch_4.bin'));
    expect(await hasCifar10(root)).toBe(false);
    const err = await loadCifar10({ dataDir: root, split: 'train', recordsPerFile: 3 }).catch((e) => e);
    expect(err).toBeInstanceOf(DataFileMissingError);
    expect(err.code).toBe('DATA_FILE_MISSING');
    expect(err.message).toContain(path.join(dir, 'data_batch_4.bin'));
    expect(err.message).toContain('data download cifar10');
    await expect(loadCifar10({ dataDir: path.join(root, 'nowhere'), split: 'test' })).rejects.toThrow(DataFileMissingError);
  });

  it('rejects a size that is not a multiple of 3,073 bytes', async () => {
    const file = path.join(dir, 'data_batch_1.bin');
    await fs.writeFile(file, cifarBytes(1, 3).subarray(0, 3 * 3073 - 1));
    const err = await readCifar10Batch(file, { recordsPerFile: 3 }).catch((e) => e);
    expect(err).toBeInstanceOf(DataFileSizeError);
    expect(err.code).toBe('DATA_FILE_SIZE');
    expect(err.message).toContain(file);
    expect(err.message).toMatch(/9218 bytes is not a multiple of the 3073-byte record/);
  });

  it('rejects a whole number of records that is not 10,000', async () => {
    const file = path.join(dir, 'test_batch.bin');
    await fs.writeFile(file, cifarBytes(0, 9_999));
    const err = await readCifar10Batch(file).catch((e) => e);
    expect(err).toBeInstanceOf(DataFileSizeError);
    expect(err.message).toContain('holds 9999 records, expected 10000');
    expect(err.message).toContain(file);
  });

  it('rejects a label outside 0-9, naming the record', async () => {
    const file = path.join(dir, 'data_batch_2.bin');
    await fs.writeFile(file, cifarBytes(2, 4, (r) => (r === 2 ? 10 : 0)));
    const err = await readCifar10Batch(file, { recordsPerFile: 4 }).catch((e) => e);
    expect(err).toBeInstanceOf(DataLabelError);
    expect(err.code).toBe('DATA_BAD_LABEL');
    expect(err.message).toContain(file);
    expect(err.message).toContain('record 2 (byte offset 6146) has label 10');
  });

  it('rejects a meta file without exactly 10 names', async () => {
    const file = path.join(dir, 'batches.meta.txt');
    await fs.writeFile(file, NAMES.slice(0, 9).join('\n'));
    const err = await readCifar10ClassNames(file).catch((e) => e);
    expect(err).toBeInstanceOf(DataFormatError);
    expect(err.message).toContain('has 9 class names');
    await expect(readCifar10ClassNames(path.join(dir, 'nope.txt'))).rejects.toThrow(DataFileMissingError);
  });
});
