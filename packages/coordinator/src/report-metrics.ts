// Workers' reports into the Prometheus exporter: every rank's per-step figures (StepReport's
// fields) and rank 0's start, checkpoint and epoch reports (the worker's JSON, @dtrain/worker's
// WorkerReport). A report with impossible figures counts as a malformed message, never throws.
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
  detailJson?: string;
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

/** Rank 0's start, checkpoint and epoch reports (the worker's JSON, see @dtrain/worker's WorkerReport). */
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
