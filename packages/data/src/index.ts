export type { Dataset } from './dataset.js';
export { makeDataset, subsetDataset, takeFirst, imageSize } from './dataset.js';
export {
  DataError,
  DataFileMissingError,
  DataFileSizeError,
  DataLabelError,
  DataFormatError,
  ChecksumMismatchError,
  DownloadError,
  DatasetArgumentError,
} from './errors.js';
export { defaultDataDir, resolveDataDir } from './datadir.js';
export {
  loadCifar10,
  readCifar10Batch,
  readCifar10ClassNames,
  hasCifar10,
  CIFAR10_DIRNAME,
  CIFAR10_TRAIN_FILES,
  CIFAR10_TEST_FILES,
  CIFAR10_META_FILE,
  CIFAR10_RECORD_BYTES,
  CIFAR10_RECORDS_PER_FILE,
} from './cifar10.js';
export type { Split, LoadCifar10Options } from './cifar10.js';
export { downloadCifar10, CIFAR10_URL, CIFAR10_MD5 } from './download.js';
export type { DownloadCifar10Options, DownloadProgress, DownloadResult } from './download.js';
export {
  loadFashionMnist,
  loadFashionMnistClasses,
  splitFashionMnist,
  fashionMnistCacheFile,
  FASHION_MNIST_CLASS_NAMES,
  FASHION_MNIST_TRAIN_PER_CLASS,
} from './fashion-mnist.js';
export { loadDataset, isDatasetName, datasetShape, DATASET_NAMES } from './datasets.js';
export type { DatasetName, DatasetShape, LoadDatasetOptions } from './datasets.js';
export { makeSyntheticTestDataset } from './synthetic.js';
export type { SyntheticTestDatasetOptions } from './synthetic.js';
export { Rng } from './rng.js';
export type { RngState } from './rng.js';
export { BatchAssembler, ImageResizer, bilinearAxisPlan, resizeBilinear, normalizationTable } from './pipeline.js';
export type { Batch, PreprocessOptions, AugmentOptions, AxisPlan } from './pipeline.js';
export { DistributedSampler, evaluationShard, batchesOf, shardFrom } from './sampler.js';
export type { DistributedSamplerOptions, Shard } from './sampler.js';
export { describeImage, imageToPng } from './inspect.js';
export type { ImageSummary, ChannelSummary } from './inspect.js';
