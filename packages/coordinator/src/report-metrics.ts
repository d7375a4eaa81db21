// Workers' reports into the Prometheus exporter: every rank's per-step figures (StepReport's
// fields) and rank 0's start, checkpoint and epoch reports (StepReport.report). A report with
// impossible figures counts as a malformed message, never throws.
import { dtrain } from '@dtrain/transport';
import type { TrainingMetrics } from './metrics.js';

/** The StepReport fields the coordinator reads (proto3: absent fields are undefined). */
export interface StepReportBody {
  epoch?: number;
  step?: number;
  loss?: number;
  examples?: number;
  dataMs?: number;
  computeMs?: number;
  allReduceMs?: number;
  optimizerMs?: number;
  allReduceBytes?: number;
  host?: string;
  rssBytes?: number;
  cpuSec?: number;
  stepMs?: number;
  /** StepReport.report, as decoded: plain objects of the fields present (64-bit integers as numbers). */
  start?: Record<string, unknown>;
  epochMetrics?: Record<string, unknown>;
  checkpoint?: Record<string, unknown>;
  final?: Record<string, unknown>;
  regroup?: Record<string, unknown>;
  rejected?: { total?: number };
}

/**
 * A start, epoch, checkpoint or final report as the launcher's events and LaunchResult show it:
 * the shapes of @dtrain/worker's WorkerReport (`kind` and its fields), with the zeros proto3 left
 * off the wire put back, and `null` where those types say a field may be null. Undefined for a
 * plain step report (and for the regroup and rejected reports, which the coordinator acts on).
 */
export function reportDetail(r: StepReportBody): Record<string, unknown> | undefined {
  if (r.start) {
    const { info, worldSize } = withDefaults(dtrain.StartReport, r.start);
    return { kind: 'start', info: { ...info, resumedFromEpoch: info?.resumedFromEpoch ?? null, runDir: info?.runDir ?? null }, worldSize };
  }
  if (r.epochMetrics) return { kind: 'epoch', metrics: { kind: 'epoch', ...withDefaults(dtrain.EpochMetrics, r.epochMetrics) } };
  if (r.checkpoint) return { kind: 'checkpoint', ...withDefaults(dtrain.CheckpointReport, r.checkpoint) };
  if (r.final) {
    const { summary, ...final } = withDefaults(dtrain.FinalReport, r.final);
    // Rank 0's alone has a summary.
    return { kind: 'done', ...final, ...(summary ? { summary: { ...summary, runDir: summary.runDir ?? null, lastCheckpoint: summary.lastCheckpoint ?? null } } : {}) };
  }
  return undefined;
}

/** A generated message type's conversions: from a plain object, and back with every default filled in. */
interface MessageType<T> {
  fromObject(o: { [k: string]: unknown }): T;
  toObject(m: T, o: { defaults: boolean; longs: NumberConstructor }): { [k: string]: any };
}

function withDefaults<T>(type: MessageType<T>, body: Record<string, unknown>): { [k: string]: any } {
  return type.toObject(type.fromObject(body), { defaults: true, longs: Number });
}

/** A worker's per-step report into the exporter; one with impossible figures counts as malformed. */
export function observeStep(metrics: TrainingMetrics, rank: number, host: string, r: StepReportBody): void {
  const ms = (x: number | undefined) => (x ?? 0) / 1000;
  try {
    metrics.observeStep({
      rank,
      host,
      epoch: r.epoch ?? 0,
      step: r.step ?? 0,
      images: r.examples ?? 0,
      loss: r.loss ?? 0,
      phaseSec: { data: ms(r.dataMs), compute: ms(r.computeMs), allReduce: ms(r.allReduceMs), optimizer: ms(r.optimizerMs) },
      allReduceBytes: r.allReduceBytes ?? 0,
      stepSec: r.stepMs !== undefined ? r.stepMs / 1000 : undefined,
      rssBytes: r.rssBytes,
      cpuSec: r.cpuSec,
    });
  } catch {
    metrics.countMalformedMessages();
  }
}

export const num = (x: unknown, fallback = 0): number => (typeof x === 'number' && Number.isFinite(x) ? x : fallback);
const str = (x: unknown): string => (typeof x === 'string' && x ? x : 'unknown');

/** Rank 0's start, checkpoint and epoch reports (as reportDetail shows them). */
export function observeRank0(metrics: TrainingMetrics, d: Record<string, unknown>, worldSize: number): void {
  if (d.kind === 'start') {
    const info = (d.info ?? {}) as Record<string, unknown>;
    const v = (info.versions ?? {}) as Record<string, unknown>;
    metrics.setBuildInfo({ version: str(v.dtrain), tfjs: str(v.tfjs), tensorflow: str(v.tensorflow), node: str(v.node), backend: str(info.backend), worldSize });
    metrics.setRun({ epochs: num(info.epochs), lr: num(info.lr), startEpoch: num(info.startEpoch, 1) });
  } else if (d.kind === 'checkpoint') {
    metrics.observeCheckpoint(new Date(num(d.unixMs, Date.now())));
  } else if (d.kind === 'epoch' && typeof d.metrics === 'object' && d.metrics !== null) {
    const e = d.metrics as Record<string, unknown>;
    metrics.observeEpoch({
      epoch: num(e.epoch),
      epochs: num(e.epochs),
      loss: num(e.loss, NaN),
      trainAcc: num(e.trainAcc),
      testLoss: num(e.testLoss, NaN),
      testAcc: num(e.testAcc),
      elapsedSec: num(e.elapsedSec),
      imagesPerSec: num(e.imagesPerSec),
      lr: num(e.lr),
    });
  }
}
