export { Trainer, AUGMENT_STREAM, layoutHash } from './trainer.js';
export type { TrainData, TrainerOptions, TrainerHooks, TrainResult, StepInfo, StartInfo } from './trainer.js';
export { readMetrics, readRun, listRunDirs, runStatus } from './run-folder.js';
export type { PhaseTimes, StepMetrics, EpochMetrics, MetricsLine, Summary, RunConfig, RunFiles, RunStatus } from './run-folder.js';
export { runTraining, loadTrainData, defaultRunDir } from './run.js';
export type { RunTrainingOptions, RunTrainingResult } from './run.js';
export { SingleProcess, createInProcessGroup, GroupChangedError, RunCompleteError, isElastic } from './collective.js';
export type { Collective, ElasticCollective, Progress, RegroupResult, BucketRanges, StagedReduce } from './collective.js';
export { ElasticRingCollective } from './elastic-ring.js';
export type { RegroupReport, RegroupAnnouncement } from './elastic-ring.js';
export { CoordinatorLink } from './coordinator-link.js';
export {
  resolveSettings,
  resumeSettings,
  validateSettings,
  DEFAULTS,
  TUTORIAL_PRESET,
  FASHION_MNIST_PRESET,
  CIFAR10_PRESET,
  PRESETS,
  AUGMENT_CROP_PADDING,
  AUGMENT_NAMES,
  DATASET_AUGMENT,
  augmentationOf,
  TRAJECTORY_SETTINGS,
} from './settings.js';
export { lrAt, peakLr, LR_SCALINGS, LR_SCHEDULES } from './schedule.js';
export type { LrScaling, LrScheduleSettings } from './schedule.js';
export type { AugmentName, TrainSettings, TrainSettingsInput, PresetName, BackendKind, EngineKind, Precision } from './settings.js';
export { ENGINE_KINDS, PRECISIONS } from './settings.js';
export { loadEngine } from './engine.js';
export type { ModelEngine } from './engine.js';
export {
  readCheckpoint,
  readLatestCheckpoint,
  BEST_CHECKPOINT,
  writeCheckpoint,
  listCheckpoints,
  encodeCheckpoint,
  decodeCheckpoint,
  checkpointFileName,
  CHECKPOINT_MAGIC,
  CHECKPOINT_VERSION,
} from './checkpoint.js';
export type { Checkpoint, CheckpointHeader, CheckpointHistory, CheckpointContent } from './checkpoint.js';
export { writeFileAtomic, removeStaleTemporaries } from './files.js';
export { TrainError, TrainSettingsError, TrainingDivergedError, CheckpointError, NoCheckpointError, ReplicaMismatchError, RunDirError, RunFolderError } from './errors.js';
export { RingCollective, hashFloats } from './ring-collective.js';
export type { RingCollectiveOptions, CollectiveStats, CollectiveOp } from './ring-collective.js';
export { runDistributedWorker, WORKER_ENTRY, DEFAULT_BUCKET_MB } from './distributed.js';
export type { DistributedConfig, DoneReport, StartReport, WorkerReport, RejectedReport } from './distributed.js';
export type { CrashSpec } from './test-crashes.js';
export { fetchOfferedFiles, isCached, sha256File, DataTransferError } from './dataset-fetch.js';
export type { OfferedFile } from './dataset-fetch.js';
export { checkInitFile, exportSafetensors, readInitFile } from './model-file.js';
export { encodeSafetensors, decodeSafetensors, SafetensorsError } from './safetensors.js';
export type { SafeTensor } from './safetensors.js';
