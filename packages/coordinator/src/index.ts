export { TrainingMetrics, startMetricsServer, MetricsPortError } from './metrics.js';
export type { WorkerStepReport, EpochReport, PhaseSeconds, BuildInfo, MetricsServer } from './metrics.js';
