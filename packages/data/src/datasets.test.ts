import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { DataFileMissingError, DatasetArgumentError } from './errors.js';
import { DATASET_NAMES, datasetShape, isDatasetName, loadDataset } from './datasets.js';
import { fashionMnistCacheFile } from './fashion-mnist.js';

describe('loadDataset', () => {
  it('loads Fashion-MNIST by name, caching under the data directory', async () => {
    const dataDir = await fs.mkdtemp(path.join(os.tmpdir(), 'dtrain-ds-'));
    try {
      const test = await loadDataset('fashion-mnist', 'test', { dataDir });
      expect([test.name, test.count, test.height, test.width, test.channels]).toEqual(['fashion-mnist/test', 10_000, 28, 28, 1]);
      // What the network is built for before the data is loaded is what the data is.
      expect(datasetShape('fashion-mnist')).toEqual({ channels: test.channels, classes: test.classNames.length, size: test.height });
      expect((await fs.stat(fashionMnistCacheFile(dataDir))).size).toBeGreaterThan(70_000 * 784);
      // From the cache, the same images.
      const again = await loadDataset('fashion-mnist', 'test', { dataDir });
      // Buffer.equals: vitest's deep equality walks 7.8M elements one by one.
      expect(Buffer.from(again.images).equals(Buffer.from(test.images))).toBe(true);
    } finally {
      await fs.rm(dataDir, { recursive: true, force: true });
    }
  });

  it('names the missing CIFAR-10 files, and rejects unknown names and splits', async () => {
    await expect(loadDataset('cifar10', 'train', { dataDir: path.join(os.tmpdir(), 'dtrain-no-such-dir') })).rejects.toThrow(
      DataFileMissingError,
    );
    await expect(loadDataset('mnist', 'train')).rejects.toThrow(/unknown data set 'mnist': choose one of cifar10, fashion-mnist/);
    await expect(loadDataset('cifar10', 'val' as never)).rejects.toThrow(DatasetArgumentError);
    expect(DATASET_NAMES).toEqual(['cifar10', 'fashion-mnist']);
    expect(isDatasetName('fashion-mnist')).toBe(true);
    expect(isDatasetName('synthetic')).toBe(false);
    expect(datasetShape('cifar10')).toEqual({ channels: 3, classes: 10, size: 32 });
    expect(datasetShape('synthetic')).toBeUndefined();
  });
});
