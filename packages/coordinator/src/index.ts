export { launch } from './coordinator.js';
export type { LaunchOptions, LaunchResult, RunEvent } from './coordinator.js';
export { CoordinatorError, WorkerFailedError, JoinTimeoutError, ReplicaDivergedError, OfferedFileError, RunStoppedError } from './errors.js';
export { NODE_AGENT_RANK } from './membership.js';
export { TrainingMetrics, startMetricsServer, MetricsPortError } from './metrics.js';
export type { WorkerStepReport, EpochReport, PhaseSeconds, BuildInfo, MetricsServer } from './metrics.js';
export { join, JoinFailedError } from './join.js';
export type { JoinOptions, JoinEvent, JoinResult } from './join.js';
export { deviceForLocalRank, visibleDeviceIds, visibleGpus, GpuSelectionError } from './gpus.js';
