export { launch, CoordinatorError, WorkerFailedError, JoinTimeoutError, ReplicaDivergedError } from './coordinator.js';
export type { LaunchOptions, LaunchResult, RunEvent } from './coordinator.js';
export { TrainingMetrics, startMetricsServer, MetricsPortError } from './metrics.js';
export type { WorkerStepReport, EpochReport, PhaseSeconds, BuildInfo, MetricsServer } from './metrics.js';
