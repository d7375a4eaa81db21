// The Prometheus metrics of a training run, defined once. The coordinator's exporter registers
// exactly these, the Grafana dashboard queries them and the tests check both against this list.
// Plain data: core does no I/O and knows nothing of prom-client.
//
// Conventions (https://prometheus.io/docs/practices/naming/): one prefix `dtrain_`, base units in
// the name (`_seconds`, `_bytes`), counters end in `_total`, ratios are 0-1 and end in `_ratio`.
// Labels are few and bounded: `rank` and `host` (one series per worker), `phase` (four values),
// `reason` (a fixed list per metric, in `labelValues`: every series exists from the start at 0).
// `dtrain_build_info` is the usual exception: one series whose labels carry versions.

export type MetricType = 'counter' | 'gauge' | 'histogram';

/** What the number counts or measures; the name's suffix follows from it (see `metricNameProblems`). */
export type MetricUnit = 'seconds' | 'bytes' | 'ratio' | 'images' | 'steps' | 'epochs' | 'workers' | 'messages' | 'connections' | 'events' | 'images_per_second' | 'timestamp_seconds' | 'loss' | 'info' | 'learning_rate';

export interface MetricDef {
  readonly name: string;
  readonly help: string;
  readonly type: MetricType;
  readonly unit: MetricUnit;
  readonly labelNames: readonly string[];
  /** Upper bounds (seconds or bytes), histograms only. */
  readonly buckets?: readonly number[];
  /** Every value a label may take, for labels other than rank and host (`reason` must have one). */
  readonly labelValues?: Readonly<Record<string, readonly string[]>>;
}

/** The coordinator serves /metrics here unless told otherwise (`--metrics-port`; 0 disables). */
export const DEFAULT_METRICS_PORT = 9455;

export const METRIC_PREFIX = 'dtrain_';

/** Label names a per-worker series may carry. `build_info` alone has others (see BUILD_INFO_LABELS). */
export const WORKER_LABELS = ['rank', 'host'] as const;
export const PHASE_LABEL = 'phase';
/** Values of the `phase` label, in the order of a training step. */
export const STEP_PHASES = ['data', 'compute', 'allreduce', 'optimizer'] as const;
export type StepPhase = (typeof STEP_PHASES)[number];
export const BUILD_INFO_LABELS = ['version', 'tfjs', 'tensorflow', 'node', 'backend', 'world_size'] as const;
export const REASON_LABEL = 'reason';
/**
 * Why a worker was lost (`dtrain_workers_lost_total{reason}`): its process exited with a code, was
 * killed by a signal, missed its heartbeats for the timeout, dropped its connection, or stalled
 * (alive and connected but made no progress for the timeout).
 */
export const WORKER_LOST_REASONS = ['exit', 'signal', 'timeout', 'connection', 'stalled'] as const;
export type WorkerLostReason = (typeof WORKER_LOST_REASONS)[number];
/**
 * Why the coordinator refused a connection (`dtrain_connections_refused_total{reason}`):
 * handshake_failed: the CURVE handshake failed (the client has no CURVE, a wrong coordinator key,
 * or a secret key not matching its public key); key_not_allowed: the ZAP handler refused a client
 * key not in allowed_keys; hello_key_not_allowed: a Hello named a key not in allowed_keys;
 * hello_key_not_proven: a Hello named an allow-listed key its sender did not prove it holds;
 * other: a malformed ZAP request or credentials.
 */
export const REFUSAL_REASONS = ['handshake_failed', 'key_not_allowed', 'hello_key_not_allowed', 'hello_key_not_proven', 'other'] as const;
export type RefusalReason = (typeof REFUSAL_REASONS)[number];

// A 96x96 ResNet step takes about 4 s on 2 CPU cores and well under 0.1 s on a GPU; a phase can be
// a millisecond (optimiser on a GPU) or tens of seconds (a straggling all-reduce).
const PHASE_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60];
const STEP_BUCKETS = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64];
// One epoch: seconds (Fashion-MNIST subset on a GPU) to hours (CIFAR-10 at 96x96 on a CPU).
const EPOCH_BUCKETS = [10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400, 28800];

const w = WORKER_LABELS;

export const METRICS = {
  buildInfo: { name: 'dtrain_build_info', help: 'Always 1; the labels name the dtrain, TensorFlow.js, TensorFlow and Node versions, the backend and the world size of this run.', type: 'gauge', unit: 'info', labelNames: BUILD_INFO_LABELS },

  imagesProcessed: { name: 'dtrain_images_processed_total', help: 'Training images this worker has run through forward and backward passes.', type: 'counter', unit: 'images', labelNames: w },
  throughput: { name: 'dtrain_throughput_images_per_second', help: "Training images per second of this worker's last step (the whole step: data, compute, all-reduce, optimiser).", type: 'gauge', unit: 'images_per_second', labelNames: w },
  stepDuration: { name: 'dtrain_step_duration_seconds', help: 'Wall time of one training step on this worker, all phases together. Compare ranks to spot stragglers.', type: 'histogram', unit: 'seconds', labelNames: w, buckets: STEP_BUCKETS },
  stepPhaseDuration: { name: 'dtrain_step_phase_duration_seconds', help: 'Wall time of one phase of a training step: data (batch assembly), compute (forward and backward), allreduce (gradient all-reduce), optimizer (weight update).', type: 'histogram', unit: 'seconds', labelNames: [...w, PHASE_LABEL], buckets: PHASE_BUCKETS },
  allReduceDuration: { name: 'dtrain_allreduce_duration_seconds', help: "Wall time of one gradient all-reduce on this worker, waiting for the slowest peer included.", type: 'histogram', unit: 'seconds', labelNames: w, buckets: PHASE_BUCKETS },
  allReduceBytes: { name: 'dtrain_allreduce_bytes_total', help: 'Bytes of gradient this worker has all-reduced (the flat gradient buffer once per step, not the bytes on the wire).', type: 'counter', unit: 'bytes', labelNames: w },
  stepsCompleted: { name: 'dtrain_steps_completed_total', help: 'Optimiser steps this worker has completed.', type: 'counter', unit: 'steps', labelNames: w },
  batchLoss: { name: 'dtrain_batch_loss', help: "Mean cross-entropy loss of this worker's last batch.", type: 'gauge', unit: 'loss', labelNames: w },
  workerResidentMemory: { name: 'dtrain_worker_resident_memory_bytes', help: 'Resident memory of the worker process, as it last reported.', type: 'gauge', unit: 'bytes', labelNames: w },
  workerCpu: { name: 'dtrain_worker_cpu_seconds_total', help: 'CPU time (user and system) the worker process has used.', type: 'counter', unit: 'seconds', labelNames: w },
  workerLastReport: { name: 'dtrain_worker_last_report_timestamp_seconds', help: 'Unix time of the last step report from this worker; a worker that stops reporting stands still here.', type: 'gauge', unit: 'timestamp_seconds', labelNames: w },

  currentEpoch: { name: 'dtrain_current_epoch', help: 'Epoch being trained, 1-based.', type: 'gauge', unit: 'epochs', labelNames: [] },
  plannedEpochs: { name: 'dtrain_planned_epochs', help: 'Epochs this run will train in all.', type: 'gauge', unit: 'epochs', labelNames: [] },
  currentStep: { name: 'dtrain_current_step', help: 'Optimiser steps completed so far in the run, all epochs (the highest any worker reported).', type: 'gauge', unit: 'steps', labelNames: [] },
  epochDuration: { name: 'dtrain_epoch_duration_seconds', help: 'Wall time of a completed epoch, training and evaluation.', type: 'histogram', unit: 'seconds', labelNames: [], buckets: EPOCH_BUCKETS },
  lastEpochDuration: { name: 'dtrain_last_epoch_duration_seconds', help: 'Wall time of the last completed epoch, training and evaluation.', type: 'gauge', unit: 'seconds', labelNames: [] },
  epochThroughput: { name: 'dtrain_epoch_throughput_images_per_second', help: 'Training images (all workers) per second of training time in the last completed epoch.', type: 'gauge', unit: 'images_per_second', labelNames: [] },
  trainLoss: { name: 'dtrain_train_loss', help: 'Mean training loss of the last completed epoch, all workers.', type: 'gauge', unit: 'loss', labelNames: [] },
  testLoss: { name: 'dtrain_test_loss', help: 'Mean loss on the test split after the last completed epoch.', type: 'gauge', unit: 'loss', labelNames: [] },
  trainAccuracy: { name: 'dtrain_train_accuracy_ratio', help: 'Training accuracy (0-1) of the last completed epoch, all workers.', type: 'gauge', unit: 'ratio', labelNames: [] },
  testAccuracy: { name: 'dtrain_test_accuracy_ratio', help: 'Accuracy (0-1) on the test split after the last completed epoch.', type: 'gauge', unit: 'ratio', labelNames: [] },
  learningRate: { name: 'dtrain_learning_rate', help: 'Learning rate of the optimiser.', type: 'gauge', unit: 'learning_rate', labelNames: [] },
  lastCheckpoint: { name: 'dtrain_last_checkpoint_timestamp_seconds', help: 'Unix time at which the last checkpoint was written (0: none yet).', type: 'gauge', unit: 'timestamp_seconds', labelNames: [] },

  workersConnected: { name: 'dtrain_workers_connected', help: 'Workers connected to the coordinator now.', type: 'gauge', unit: 'workers', labelNames: [] },
  workersExpected: { name: 'dtrain_workers_expected', help: 'Workers this run needs (the world size).', type: 'gauge', unit: 'workers', labelNames: [] },
  malformedMessages: { name: 'dtrain_malformed_messages_rejected_total', help: 'Control-channel messages rejected because they did not decode, failed verification, or were replayed or out of order (a message number not above the last one from that connection).', type: 'counter', unit: 'messages', labelNames: [] },
  connectionsRefused: { name: 'dtrain_connections_refused_total', help: 'Connections to the control socket refused before any message of theirs was used: failed CURVE handshake, client key not in allowed_keys (ZAP), or a Hello naming a key not allowed or not proven.', type: 'counter', unit: 'connections', labelNames: [REASON_LABEL], labelValues: { [REASON_LABEL]: REFUSAL_REASONS } },

  workersLost: { name: 'dtrain_workers_lost_total', help: 'Workers the run lost, by what happened: exit (non-zero exit code), signal (killed), timeout (heartbeats missed), connection (control connection dropped), stalled (no progress).', type: 'counter', unit: 'workers', labelNames: [REASON_LABEL], labelValues: { [REASON_LABEL]: WORKER_LOST_REASONS } },
  regroups: { name: 'dtrain_regroups_total', help: 'Elastic membership changes: times the workers rebuilt their ring with a new set of members (a worker lost or admitted).', type: 'counter', unit: 'events', labelNames: [] },
  heartbeatAge: { name: 'dtrain_heartbeat_age_seconds', help: "Seconds since the coordinator last heard this worker's heartbeat; it is declared lost when this passes the timeout.", type: 'gauge', unit: 'seconds', labelNames: w },
  stallWarnings: { name: 'dtrain_stall_warnings_total', help: 'Warnings that this worker is late (heartbeat or step overdue by several intervals) but not yet past the timeout.', type: 'counter', unit: 'events', labelNames: w },
} as const satisfies Record<string, MetricDef>;

export type MetricKey = keyof typeof METRICS;

export const METRIC_DEFS: readonly MetricDef[] = Object.values(METRICS);

const ALLOWED_LABELS = new Set<string>([...WORKER_LABELS, PHASE_LABEL, REASON_LABEL]);

/** The name suffix each unit requires. */
const UNIT_SUFFIX: Partial<Record<MetricUnit, string>> = {
  seconds: '_seconds',
  bytes: '_bytes',
  ratio: '_ratio',
  images_per_second: '_images_per_second',
  timestamp_seconds: '_timestamp_seconds',
  info: '_info',
};

/** What is wrong with a definition by the naming rules above; empty when nothing. */
export function metricNameProblems(d: MetricDef): string[] {
  const p: string[] = [];
  if (!d.name.startsWith(METRIC_PREFIX)) p.push(`${d.name}: does not start with ${METRIC_PREFIX}`);
  if (!/^[a-z][a-z0-9_]*$/.test(d.name) || d.name.includes('__')) p.push(`${d.name}: not snake_case`);
  const base = d.type === 'counter' ? d.name.replace(/_total$/, '') : d.name;
  if (d.type === 'counter' && base === d.name) p.push(`${d.name}: a counter must end in _total`);
  if (d.type !== 'counter' && d.name.endsWith('_total')) p.push(`${d.name}: only counters end in _total`);
  const suffix = UNIT_SUFFIX[d.unit];
  if (suffix && !base.endsWith(suffix)) p.push(`${d.name}: unit ${d.unit} wants the name to end in ${suffix}${d.type === 'counter' ? '_total' : ''}`);
  if (/_(milliseconds|ms|kb|mb|gb|kilobytes|megabytes|percent|minutes|hours)(_|$)/.test(d.name)) p.push(`${d.name}: not in base units`);
  if (/_(bucket|sum|count)$/.test(d.name)) p.push(`${d.name}: ends in a suffix Prometheus reserves for histograms`);
  if (d.type === 'histogram') {
    const b = d.buckets ?? [];
    if (b.length === 0) p.push(`${d.name}: a histogram needs buckets`);
    if (b.some((x, i) => i > 0 && x <= b[i - 1])) p.push(`${d.name}: buckets must increase`);
  } else if (d.buckets) p.push(`${d.name}: only histograms have buckets`);
  const labels = d.name === METRICS.buildInfo.name ? [] : d.labelNames;
  for (const l of labels) if (!ALLOWED_LABELS.has(l)) p.push(`${d.name}: label ${l} is not one of ${[...ALLOWED_LABELS].join(', ')}`);
  if (labels.includes(REASON_LABEL) && !(d.labelValues?.[REASON_LABEL]?.length)) p.push(`${d.name}: label ${REASON_LABEL} needs its list of values (labelValues)`);
  for (const [l, values] of Object.entries(d.labelValues ?? {})) {
    if (!labels.includes(l)) p.push(`${d.name}: labelValues names ${l}, which is not one of its labels`);
    if (new Set(values).size !== values.length || values.some((v) => !/^[a-z][a-z0-9_]*$/.test(v))) p.push(`${d.name}: values of ${l} must be distinct snake_case words`);
  }
  if (d.help.trim().length < 10) p.push(`${d.name}: help text too short`);
  return p;
}

/** The definition a series name belongs to (`x_bucket`, `x_sum`, `x_count` belong to histogram `x`). */
export function findMetricDef(series: string): MetricDef | undefined {
  const exact = METRIC_DEFS.find((d) => d.name === series);
  if (exact) return exact;
  const m = /^(.*)_(bucket|sum|count)$/.exec(series);
  return m ? METRIC_DEFS.find((d) => d.type === 'histogram' && d.name === m[1]) : undefined;
}
