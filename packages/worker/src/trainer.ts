// The training loop, written once for every world size. All communication goes through a
// Collective (identity in one process, a ring all-reduce across workers), in the same order on
// every rank:
//
//   start (sync from root = 0, or an elastic collective's initialRoot):
//                fingerprint check (broadcast 8 floats from root, all-reduce-sum 1 float);
//                broadcast from root: [n] = byte length of the state JSON, the state JSON (n
//                floats, one byte each: progress, epoch totals, history, optimiser steps and lr),
//                weights, BatchNorm statistics, momentum buffers (so replicas start identical,
//                also after a resume, also when only rank 0 could read the checkpoint)
//   every step:  all-reduce-mean of [loss x n, correct, n, regroup flag, flat gradient]; the
//                first four are multiplied back by the world size: the step's global sums. With
//                bucketBytes, in buckets that start during the backward pass (head first): the
//                GradientReducer (reducer.ts) owns this buffer, its buckets and its all-reduce
//   every epoch: all-reduce-mean of BatchNorm running statistics (before evaluation and the
//                checkpoint), all-reduce-sum of [eval loss sum, correct, count] (each rank
//                evaluates its own contiguous shard, so every test image counts exactly once)
//
// The trainer tracks a position (Progress: epoch, positions of the epoch's order done, steps),
// not a loop counter: rank r trains shardFrom(order, done, worldSize, r). With an
// ElasticCollective it commits (position, totals, BatchNorm statistics) at every step boundary;
// on GroupChangedError anywhere it restores the commit, calls regroup(committed progress), runs
// the start sync from the returned root, and continues from the root's position (see README).
//
// Only the current rank 0 writes files (their format is run-folder.ts's and checkpoint.ts's).
// One gradient buffer and one batch buffer are reused by every step.

import { createHash } from 'node:crypto';
import fs from 'node:fs/promises';
import { existsSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import type { WebGpuAdapterInfo } from '@dtrain/backend';
import { describeResNet, minTrainingBatch, MIN_BATCHNORM_VALUES, type ResNetConfig, type StepResult, type TrainableModel } from '@dtrain/core';
import { BatchAssembler, DistributedSampler, Rng, batchesOf, evaluationShard, shardFrom, type Dataset } from '@dtrain/data';
import { loadEngine, type ModelEngine } from './engine.js';
import { BEST_CHECKPOINT, keepAsBest, writeCheckpoint, type Checkpoint, type CheckpointHeader, type CheckpointHistory, type EpochTotals } from './checkpoint.js';
import { GroupChangedError, SingleProcess, isElastic, type Collective, type ElasticCollective, type Progress, type RegroupResult } from './collective.js';
import { CheckpointError, ReplicaMismatchError, TrainingDivergedError, TrainSettingsError } from './errors.js';
import type { AtomicWriteOptions } from './files.js';
import { lrAt, peakLr } from './schedule.js';
import { readInitFile } from './model-file.js';
import { appendMetrics, readMetrics, trimMetrics, writeConfig, writeSummary, type EpochMetrics, type PhaseTimes, type ResumeRecord, type StepMetrics, type Summary } from './run-folder.js';
import { GradientReducer, type StepSums } from './reducer.js';
import { SafetensorsError } from './safetensors.js';
import { maxStepImages, stepBounds, stepsOfShare } from './steps.js';
import { augmentationOf, sameSetting, TRAJECTORY_SETTINGS, withScheduleDefaults, type TrainSettings } from './settings.js';

/** Stream id mixed into the augmentation generator's seed, so it never repeats the sampler's stream. */
export const AUGMENT_STREAM = 0xa06e;

export interface TrainData {
  train: Dataset;
  test: Dataset;
}

export interface StepInfo {
  /** 1-based. */
  epoch: number;
  stepInEpoch: number;
  stepsInEpoch: number;
  /** Optimiser steps so far, all epochs (1-based after this step). */
  step: number;
  /** Images in this rank's batch. */
  n: number;
  /** The learning rate this step's update used (schedule.ts; the same on every rank). */
  lr: number;
  loss: number;
  correct: number;
  phases: PhaseTimes;
  /** This rank's sample indices of the step (a copy). */
  indices: Int32Array;
  /** Positions of the epoch's order consumed after this step (all ranks). */
  done: number;
  /** World size of the group that applied the step. */
  worldSize: number;
  /** Bytes of the buffer this rank all-reduced for the step: the gradient with the step sums in front (0: one process whose engine applied its own gradient). */
  allReduceBytes: number;
}

/** What `onRegroup` sees after an elastic regroup and the sync from the new root. */
export interface RegroupInfo extends RegroupResult {
  /** This rank in the new group, and the new group's size. */
  rank: number;
  worldSize: number;
  /** The adopted position. */
  progress: Progress;
}

/** The index of the first NaN or infinity in `a`, or -1. */
function firstNonFinite(a: Float32Array): number {
  for (let i = 0; i < a.length; i++) if (a[i] - a[i] !== 0) return i; // NaN and +-Infinity only
  return -1;
}

export interface StartInfo {
  startEpoch: number;
  epochs: number;
  stepsPerEpoch: number;
  trainImages: number;
  testImages: number;
  resumedFromEpoch: number | null;
  runDir: string | null;
  /** What config.json records of the run: the base learning rate, the backend, the versions. */
  lr: number;
  backend: string;
  versions: Record<string, string>;
}

export interface TrainerHooks {
  onStart?(info: StartInfo): void;
  onEpochStart?(epoch: number, stepsInEpoch: number): void;
  onStep?(info: StepInfo): void;
  onEvalStart?(epoch: number, testImages: number): void;
  onEpochEnd?(metrics: EpochMetrics): void;
  onCheckpoint?(file: string): void;
  /** Elastic only: after a regroup and the sync from its root. */
  onRegroup?(info: RegroupInfo): void;
}

export interface TrainerOptions {
  settings: TrainSettings;
  data: TrainData;
  collective?: Collective;
  /**
   * The run folder, given to every rank: the CURRENT rank 0 writes config.json, metrics.jsonl,
   * checkpoints and summary.json there (after an elastic regroup another process may be rank 0);
   * none when omitted.
   */
  runDir?: string;
  hooks?: TrainerHooks;
  /** Test seam for checkpoint writes. */
  checkpointWrite?: AtomicWriteOptions;
  /** Extra fields for config.json (e.g. the data set's origin). */
  configExtra?: Record<string, unknown>;
  /**
   * All-reduce the gradient in buckets of about this many bytes while the backward pass still
   * runs (PyTorch DDP's bucket_cap_mb), where the collective can (Collective.allReduceMeanStaged)
   * and there is more than one rank. 0 or absent: one all-reduce after the backward pass. Part of
   * the summation order, so every rank must use the same value.
   */
  bucketBytes?: number;
  /** Workers of this run on this machine (LOCAL_WORLD_SIZE): WebGPU refuses to put several on one GPU unless settings.shareGpu. */
  localWorkers?: number;
}

/**
 * A WebGPU buffer larger than the adapter's maxStorageBufferBindingSize cannot be bound to a shader:
 * tfjs would fail deep inside a kernel. Checked before anything runs, on the largest tensor of a
 * step, estimated as the largest layer output with a pixel of padding on each side (the padded
 * inputs of the 3x3 convolutions and the max-pool), at the larger of the train and eval batches.
 */
function checkFitsGpu(s: TrainSettings, data: TrainData, adapter: WebGpuAdapterInfo): void {
  const arch = describeResNet({ inChannels: data.train.channels, classes: data.train.classNames.length, imageSize: s.imageSize });
  let largest = { name: 'input', floats: s.imageSize * s.imageSize * data.train.channels };
  for (const l of arch.layers) {
    const [h, w, c] = l.outputShape;
    const floats = c === undefined ? 0 : (h + 2) * (w + 2) * c;
    if (floats > largest.floats) largest = { name: l.name, floats };
  }
  const batch = Math.max(s.batchSize, s.evalBatchSize);
  const bytes = largest.floats * 4 * batch;
  if (bytes <= adapter.maxStorageBufferBindingSize) return;
  const fits = Math.floor(adapter.maxStorageBufferBindingSize / (largest.floats * 4));
  const flag = s.evalBatchSize > s.batchSize ? `--eval-batch-size ${s.evalBatchSize}` : `--batch-size ${s.batchSize}`;
  throw new TrainSettingsError(
    s.evalBatchSize > s.batchSize ? 'evalBatchSize' : 'batchSize',
    `${flag} at ${s.imageSize}x${s.imageSize}: the largest tensor of a step (${largest.name}, padded: ${(bytes / 2 ** 20).toFixed(0)} MiB) is more than this GPU binds at once ` +
      `(maxStorageBufferBindingSize ${(adapter.maxStorageBufferBindingSize / 2 ** 20).toFixed(0)} MiB on ${adapter.description || adapter.device}); use a batch of at most ${fits}`,
  );
}

export interface TrainResult {
  summary: Summary;
  epochs: EpochMetrics[];
}

const now = () => performance.now() / 1000;

function zeroPhases(): PhaseTimes {
  return { data: 0, compute: 0, allReduce: 0, optimizer: 0 };
}

function zeroTotals(): EpochTotals {
  return { lossSum: 0, correct: 0, count: 0, steps: 0, trainSec: 0, phases: zeroPhases(), lrFirst: null, lrLast: null };
}

function emptyHistory(): CheckpointHistory {
  return { testAcc: [], bestTestAcc: 0, bestEpoch: 0, elapsedSec: 0, trainSec: 0, images: 0 };
}

/** Everything a rank's position consists of besides the model: committed, rolled back, synced. */
interface RunState {
  progress: Progress;
  /** The running totals of epoch `progress.epoch`. */
  totals: EpochTotals;
  history: CheckpointHistory;
  /**
   * The line of the last completed epoch. Elastic: a rank that completed the epoch-end
   * evaluation while rank 0 failed in it carries the line to the new group, whose rank 0 writes
   * the checkpoint and line the old one never wrote (writeMissingEpoch).
   */
  lastEpoch?: EpochMetrics;
}

/** The state JSON of the start sync. */
interface SyncedState extends RunState {
  optSteps: number;
  lr: number;
}


/** The steps since the last `kind: 'step'` line of metrics.jsonl: the group's sums, rank 0's phases. */
interface StepWindow {
  steps: number;
  lossSum: number;
  correct: number;
  n: number;
  /** now()'s time when the window opened. */
  start: number;
  phases: PhaseTimes;
}

/** What trainRest trains: this rank's part of the rest of an epoch. */
interface Segment {
  /** 0-based. */
  epoch: number;
  /** Images of the epoch (all ranks) consumed before it. */
  start: number;
  /** This rank's images, in the epoch's order. */
  mine: Int32Array;
  steps: number;
  /** Steps of the whole epoch, those before the segment included. */
  stepsInEpoch: number;
  rng: Rng | undefined;
}

function emptyWindow(start: number): StepWindow {
  return { steps: 0, lossSum: 0, correct: 0, n: 0, start, phases: zeroPhases() };
}

/** One step's group sums, phase times and rate added to the epoch's totals and to the step line's window. */
function addStep(t: EpochTotals, win: StepWindow, sums: StepSums, p: PhaseTimes, lr: number): void {
  for (const key of Object.keys(p) as (keyof PhaseTimes)[]) {
    t.phases[key] += p[key];
    win.phases[key] += p[key];
  }
  t.lossSum += sums.lossSum;
  t.correct += sums.correct;
  t.count += sums.images;
  t.steps++;
  t.lrFirst ??= lr;
  t.lrLast = lr;
  win.steps++;
  win.lossSum += sums.lossSum;
  win.correct += sums.correct;
  win.n += sums.images;
}

/** The `kind: 'step'` line of the window `win`, closed at `end` (now()'s time). */
function stepLine(win: StepWindow, epoch: number, step: number, end: number): StepMetrics {
  const secs = end - win.start;
  return {
    kind: 'step',
    epoch,
    step,
    steps: win.steps,
    loss: round(win.lossSum / win.n),
    trainAcc: round(win.correct / win.n),
    images: win.n,
    imagesPerSec: round(win.n / secs, 2),
    phaseSec: { data: round(win.phases.data, 4), compute: round(win.phases.compute, 4), allReduce: round(win.phases.allReduce, 4), optimizer: round(win.phases.optimizer, 4) },
    time: new Date().toISOString(),
  };
}

function round(x: number, digits = 6): number {
  const f = 10 ** digits;
  return Math.round(x * f) / f;
}

/** Names and shapes of every tensor, hashed: two models with the same hash share a flat layout. */
export function layoutHash(model: TrainableModel): string {
  const h = createHash('sha256');
  for (const p of model.arch.params) h.update(`${p.name}:${p.shape.join('x')};`);
  for (const b of model.arch.batchNorms) h.update(`${b.name}:${b.channels};`);
  return h.digest('hex').slice(0, 16);
}

export class Trainer {
  readonly model: TrainableModel;
  readonly settings: TrainSettings;
  readonly collective: Collective;
  readonly data: TrainData;
  private readonly runDirPath: string | null;
  private readonly elastic: ElasticCollective | null;
  private readonly hooks: TrainerHooks;
  private readonly assembler: BatchAssembler;
  /** The gradient's buffer (step sums in front), its buckets and its all-reduce. */
  private readonly reducer: GradientReducer;
  private readonly batchBuf: { x: Float32Array; y: Int32Array };
  private readonly evalBuf: { x: Float32Array; y: Int32Array };
  private readonly sampler: DistributedSampler;
  private readonly layout: string;

  private constructor(
    o: TrainerOptions,
    private readonly engine: ModelEngine,
  ) {
    this.settings = o.settings;
    this.collective = o.collective ?? new SingleProcess();
    this.data = o.data;
    this.runDirPath = o.runDir ?? null;
    this.elastic = isElastic(this.collective) ? this.collective : null;
    this.hooks = o.hooks ?? {};
    this.checkpointWrite = o.checkpointWrite;
    this.configExtra = o.configExtra ?? {};
    const { train, test } = o.data;
    if (train.channels !== test.channels || train.height !== test.height || train.width !== test.width) {
      throw new TrainSettingsError('dataset', `train (${train.height}x${train.width}x${train.channels}) and test (${test.height}x${test.width}x${test.channels}) images differ in shape`);
    }
    if (train.classNames.length !== test.classNames.length) throw new TrainSettingsError('dataset', 'train and test splits have different numbers of classes');
    if (train.count === 0 || test.count === 0) throw new TrainSettingsError('dataset', `${train.count === 0 ? train.name : test.name} has no images`);
    const s = o.settings;
    const config: ResNetConfig = { inChannels: train.channels, classes: train.classNames.length, imageSize: s.imageSize };
    this.model = engine.create(config);
    this.layout = layoutHash(this.model);
    this.minBatch = minTrainingBatch(this.model.arch);
    this.checkBatchNormRoom(s.batchSize, Math.ceil(train.count / this.collective.worldSize), this.collective.worldSize);
    this.assembler = new BatchAssembler(train, {
      height: s.imageSize,
      width: s.imageSize,
      augment: augmentationOf(s),
    });
    this.reducer = new GradientReducer(this.model.arch, this.collective, o.bucketBytes);
    // One process alone (not elastic: its group may grow) has no all-reduce: the engine may keep the gradient.
    this.fusedStep = this.model.trainStep !== undefined && this.collective.worldSize === 1 && this.elastic === null && s.accumulate === 1;
    this.accumulation = s.accumulate > 1 ? { sum: new Float64Array(this.model.paramCount), micro: new Float32Array(this.model.paramCount) } : undefined;
    const len = this.assembler.imageLength;
    const most = maxStepImages(s.batchSize, this.minBatch);
    this.batchBuf = { x: new Float32Array(most * len), y: new Int32Array(most) };
    this.evalBuf = { x: new Float32Array(s.evalBatchSize * len), y: new Int32Array(s.evalBatchSize) };
    // Only its unpadded order is used: shardFrom shards it over whatever the group is.
    this.sampler = new DistributedSampler({ size: train.count, seed: s.seed, shuffle: true, dropLast: false });
  }

  private readonly checkpointWrite: AtomicWriteOptions | undefined;
  /** The smallest healthy per-rank batch for this image size (@dtrain/core's minTrainingBatch). */
  private readonly minBatch: number;
  /** Each step is the model's trainStep (one process alone, an engine that offers it). */
  private readonly fusedStep: boolean;
  /** --accumulate K > 1: the running sum of a step's micro-batch gradients, and one micro-batch's. */
  private readonly accumulation: { sum: Float64Array; micro: Float32Array } | undefined;
  private readonly configExtra: Record<string, unknown>;
  private state: RunState = { progress: { epoch: 0, done: 0, step: 0 }, totals: zeroTotals(), history: emptyHistory() };
  private committed: { state: RunState; bn: Float32Array } | null = null;
  private order: { epoch: number; order: Int32Array } | null = null;
  private startedEpoch = -1;
  private voluntaryRegroup = false;
  private epochs: EpochMetrics[] = [];
  private lastCheckpoint: string | null = null;
  private t0 = 0;
  private elapsedBefore = 0;

  /** The run folder if this process is the current rank 0 (which alone writes files), else null. */
  get runDir(): string | null {
    return this.collective.rank === 0 ? this.runDirPath : null;
  }

  /** Where this rank stands (a copy). */
  get progress(): Progress {
    return { ...this.state.progress };
  }

  /** Loads the engine (tfjs: its backend, once per process) and builds the model with the settings' seed. */
  static async create(o: TrainerOptions): Promise<Trainer> {
    const s = o.settings;
    const engine = await loadEngine(s, o.localWorkers);
    if (engine.adapter) checkFitsGpu(s, o.data, engine.adapter);
    return new Trainer(o, engine);
  }

  /** Steps of a whole epoch with the current world size. */
  get stepsPerEpoch(): number {
    return stepsOfShare(Math.ceil(this.data.train.count / this.collective.worldSize), this.stepImages, this.minBatch);
  }

  /** A rank's images per optimiser step: its batch, times the micro-batches accumulated. */
  private get stepImages(): number {
    return this.settings.batchSize * this.settings.accumulate;
  }

  /**
   * Refuses a batch, or a rank's share of an epoch, with which some BatchNorm would normalise
   * fewer than MIN_BATCHNORM_VALUES values per channel (a degenerate gradient: steps.ts).
   */
  private checkBatchNormRoom(batchSize: number, share: number, worldSize: number): void {
    const min = this.minBatch;
    const why = `at ${this.settings.imageSize}x${this.settings.imageSize} input the last stage's maps are too small for BatchNorm to see ${MIN_BATCHNORM_VALUES} values per channel with fewer than ${min} images per worker`;
    if (batchSize < min) throw new TrainSettingsError('batchSize', `--batch-size ${batchSize}: ${why}; use --batch-size ${min} or more (or a larger --image-size)`);
    if (share < min) {
      throw new TrainSettingsError('dataset', `each of the ${worldSize} workers gets ${share} of the ${this.data.train.count} training images per epoch: ${why}; use at most ${Math.floor(this.data.train.count / min)} workers`);
    }
  }

  get globalBatch(): number {
    return this.stepImages * this.collective.worldSize;
  }

  /**
   * Trains from epoch 1, or from `resumeFrom` (rank 0's checkpoint, at an epoch boundary or
   * mid-epoch; other ranks pass nothing and receive the state by broadcast), up to
   * `settings.epochs`. With an ElasticCollective it survives membership changes (see the header).
   */
  async run(resumeFrom?: Checkpoint): Promise<TrainResult> {
    this.t0 = now();
    this.epochs = [];
    this.lastCheckpoint = resumeFrom?.file ?? null;
    let outcome = await this.begin(resumeFrom);
    try {
      outcome = await this.trainEpochs(outcome);
    } catch (err) {
      // `runs` and `report` then say 'diverged' with the reason, not 'incomplete'.
      if (err instanceof TrainingDivergedError) await this.saveSummary(this.summaryOf('diverged', err.message, resumeFrom !== undefined));
      throw err;
    }
    return this.end(outcome, resumeFrom);
  }

  /**
   * The state every rank starts from (a checkpoint, an --init file or a fresh model, then synced
   * from the root), config.json, and the start hook. The sync's regroup, if one happened during it.
   */
  private async begin(resumeFrom: Checkpoint | undefined): Promise<RegroupResult | null> {
    const c = this.collective;
    const s = this.settings;
    if (resumeFrom) this.restore(resumeFrom);
    else if (s.initFile !== null && c.rank === (this.elastic ? this.elastic.initialRoot : 0)) await this.initFrom(s.initFile);
    await this.commit();
    // A worker admitted into a run in progress adopts everything and rewrites no run file.
    const joining = this.elastic !== null && this.elastic.initialRoot !== c.rank;
    const outcome = await this.recover(() => this.sync(this.elastic ? this.elastic.initialRoot : 0));
    this.elapsedBefore = this.state.history.elapsedSec;

    const runDir = this.runDir;
    if (runDir && !joining) {
      await writeConfig(runDir, this.configFields(), resumeFrom && this.resumeRecord(resumeFrom));
      if (resumeFrom) await trimMetrics(runDir, resumeFrom.header.epoch, resumeFrom.header.position ? resumeFrom.header.step : null);
    }
    this.hooks.onStart?.({
      startEpoch: this.state.progress.epoch + 1,
      epochs: s.epochs,
      stepsPerEpoch: this.stepsPerEpoch,
      trainImages: this.data.train.count,
      testImages: this.data.test.count,
      resumedFromEpoch: resumeFrom ? this.state.progress.epoch : null,
      runDir,
      lr: s.lr,
      backend: s.backend,
      versions: this.engine.versions,
    });
    return outcome;
  }

  /** Epoch after epoch up to the last, through any regroups; the last regroup's outcome (its `stop`). */
  private async trainEpochs(outcome: RegroupResult | null): Promise<RegroupResult | null> {
    while (!outcome?.stop && this.state.progress.epoch < this.settings.epochs) {
      this.voluntaryRegroup = false;
      outcome = await this.recover(async () => {
        if (await this.trainRest()) this.voluntaryRegroup = true;
        else await this.endEpoch();
      });
      // Voluntary: the step that carried the flag was applied and committed; nothing to roll back.
      if (!outcome && this.voluntaryRegroup) outcome = await this.regroupAndSync();
    }
    return outcome;
  }

  /** The end: a checkpoint of a stopped run's position, and summary.json. */
  private async end(outcome: RegroupResult | null, resumeFrom: Checkpoint | undefined): Promise<TrainResult> {
    let stopReason: string | undefined;
    if (outcome?.stop) {
      stopReason = outcome.reason;
      const dir = this.runDir;
      if (dir) {
        this.lastCheckpoint = await this.saveCheckpoint(dir, this.state);
        this.hooks.onCheckpoint?.(this.lastCheckpoint);
      }
    }
    const resumedFinal = this.epochs.length === 0 ? await this.resumedFinalMetrics(this.runDir) : undefined;
    const summary = this.summaryOf(stopReason === undefined ? 'completed' : 'stopped', stopReason, resumeFrom !== undefined, resumedFinal);
    await this.saveSummary(summary);
    return { summary, epochs: this.epochs };
  }

  /** --init: the sync's root starts from the file's weights and BatchNorm statistics; the sync hands them to every rank. */
  private async initFrom(file: string): Promise<void> {
    const init = await readInitFile(file, this.model.config).catch((err: unknown) => {
      throw err instanceof SafetensorsError ? new TrainSettingsError('initFile', `initFile ${err.message}`) : err;
    });
    this.model.setWeights(init.weights);
    this.model.setBatchNormStats(init.bnStats);
  }

  /** summary.json in the run folder (rank 0 only: others have none). */
  private async saveSummary(summary: Summary): Promise<void> {
    if (summary.runDir) await writeSummary(summary.runDir, summary);
  }

  /** The run's summary as it stands; `resumedFinal`: the last epoch's line when this process trained none. */
  private summaryOf(status: Summary['status'], stopReason: string | undefined, resumed: boolean, resumedFinal?: EpochMetrics): Summary {
    const s = this.settings;
    const c = this.collective;
    const st = this.state;
    const dir = this.runDir;
    const history = st.history;
    const last = this.epochs[this.epochs.length - 1];
    const lastTrain = last ?? resumedFinal;
    return {
      status,
      ...(stopReason === undefined ? {} : { stopReason }),
      dataset: s.dataset,
      epochs: s.epochs,
      steps: st.progress.step,
      finalTrainLoss: lastTrain?.loss ?? NaN,
      finalTrainAcc: lastTrain?.trainAcc ?? NaN,
      finalTestLoss: lastTrain?.testLoss ?? NaN,
      finalTestAcc: lastTrain?.testAcc ?? history.testAcc[history.testAcc.length - 1] ?? NaN,
      bestTestAcc: round(history.bestTestAcc),
      bestEpoch: history.bestEpoch,
      testImages: this.data.test.count,
      totalSec: round(history.elapsedSec, 3),
      trainSec: round(history.trainSec, 3),
      imagesPerSec: history.trainSec > 0 ? round(history.images / history.trainSec, 2) : 0,
      worldSize: c.worldSize,
      globalBatch: this.globalBatch,
      runDir: dir,
      lastCheckpoint: this.lastCheckpoint,
      bestCheckpoint: dir && existsSync(path.join(dir, BEST_CHECKPOINT)) ? path.join(dir, BEST_CHECKPOINT) : null,
      resumed,
    };
  }

  dispose(): void {
    this.model.dispose();
  }

  // ---- elastic recovery ------------------------------------------------------------------

  /**
   * Runs `fn`; on GroupChangedError of an elastic collective, rolls back to the last commit,
   * regroups and adopts the new root's state. Anything else (and everything when not elastic)
   * propagates.
   */
  private async recover(fn: () => Promise<void>): Promise<RegroupResult | null> {
    try {
      await fn();
      return null;
    } catch (err) {
      if (!this.elastic || !(err instanceof GroupChangedError)) throw err;
      this.rollback();
      return this.regroupAndSync();
    }
  }

  /** regroup(committed progress), then the start-of-run sync from the new root; again while the group keeps changing. */
  private async regroupAndSync(): Promise<RegroupResult> {
    const ec = this.elastic!;
    for (;;) {
      try {
        const r = await ec.regroup({ ...this.committed!.state.progress });
        await this.sync(r.root);
        this.hooks.onRegroup?.({ ...r, rank: ec.rank, worldSize: ec.worldSize, progress: { ...this.state.progress } });
        return r;
      } catch (err) {
        if (!(err instanceof GroupChangedError)) throw err;
        this.rollback();
      }
    }
  }

  /**
   * The state at a step boundary. Weights and momentum need no copy: they change only in
   * applyGradients, after the step's all-reduce succeeded (and sync applies what it received only
   * after its last broadcast). BatchNorm running statistics change in every forward pass and in
   * the epoch end's averaging, so they are copied (a few thousand floats).
   */
  private async commit(): Promise<void> {
    if (!this.elastic) return;
    this.committed = { state: structuredClone(this.state), bn: await this.model.getBatchNormStats() };
  }

  private rollback(): void {
    const k = this.committed!;
    this.state = structuredClone(k.state);
    this.model.setBatchNormStats(k.bn);
  }

  /**
   * Every rank adopts rank `root`'s state, as at the start of a run: fingerprint check (from the
   * root), then broadcasts from the root of [length of the state JSON], the state JSON (progress,
   * epoch totals, history, optimiser steps and lr; one byte per float), weights, BatchNorm
   * statistics, momentum buffers. Received values are applied only after the last broadcast, so a
   * sync that fails half-way leaves this rank at its commit.
   */
  private async sync(root: number): Promise<void> {
    const c = this.collective;
    const m = this.model;
    await this.checkReplicasAgree(root);
    const isRoot = c.rank === root;
    const mine = isRoot
      ? Float32Array.from(new TextEncoder().encode(JSON.stringify({ ...this.state, optSteps: m.optimizer.steps, lr: m.optimizer.lr } satisfies SyncedState)))
      : new Float32Array(0);
    const len = Float32Array.of(mine.length);
    await c.broadcast(len, root);
    const meta = isRoot ? mine : new Float32Array(len[0]);
    await c.broadcast(meta, root);
    const weights = await m.getWeights();
    await c.broadcast(weights, root);
    const bn = await m.getBatchNormStats();
    await c.broadcast(bn, root);
    const opt = await m.optimizer.getState();
    await c.broadcast(opt.buffers, root);
    if (!isRoot) {
      const got = JSON.parse(new TextDecoder().decode(Uint8Array.from(meta))) as SyncedState;
      this.state = { progress: got.progress, totals: got.totals, history: got.history, ...(got.lastEpoch ? { lastEpoch: got.lastEpoch } : {}) };
      m.setWeights(weights);
      m.setBatchNormStats(bn);
      m.optimizer.setState({ steps: got.optSteps, buffers: opt.buffers });
      m.optimizer.lr = got.lr;
    }
    await this.commit();
    // After a regroup the new rank 0 may be on a machine that never wrote this run's files.
    if (this.elastic && this.runDir) {
      await fs.mkdir(this.runDir, { recursive: true });
      await this.writeMissingEpoch(this.runDir);
    }
  }

  /**
   * The epoch end's evaluation is the last collective of an epoch. With 3+ ranks a ring can break
   * in its last pieces, so some ranks complete the epoch while rank 0, which writes its checkpoint
   * and line, fails; the group then continues from the state of those ahead. The new rank 0 writes
   * what is missing: the state it holds is exactly that epoch end's.
   */
  private async writeMissingEpoch(runDir: string): Promise<void> {
    const st = this.state;
    const m = st.lastEpoch;
    if (!m || st.progress.done !== 0 || m.epoch !== st.progress.epoch) return;
    if ((await readMetrics(runDir)).some((l) => l.kind === 'epoch' && l.epoch === m.epoch)) return;
    this.lastCheckpoint = await this.saveCheckpoint(runDir, st);
    this.hooks.onCheckpoint?.(this.lastCheckpoint);
    if (st.history.bestEpoch === m.epoch) await keepAsBest(runDir, this.lastCheckpoint);
    await appendMetrics(runDir, m);
    // Its hooks saw the epoch as another rank: now as the rank that reports it.
    this.hooks.onEpochEnd?.(m);
  }

  // ---- one epoch -------------------------------------------------------------------------

  /** The epoch's unpadded sample order (the same on every rank and for every world size). */
  private epochOrder(e: number): Int32Array {
    if (this.order?.epoch !== e) this.order = { epoch: e, order: this.sampler.permutation(e) };
    return this.order.order;
  }

  /**
   * Trains the rest of the current epoch from `progress.done`, re-sharded over the current group
   * (shardFrom). Commits after every applied step. Returns true when a step's summed regroup flag
   * asked for a voluntary regroup (that step is applied and committed).
   */
  private async trainRest(): Promise<boolean> {
    const segment = this.segment();
    const totals = this.state.totals;
    const trainBase = totals.trainSec;
    const segStart = now();
    let window = emptyWindow(now());
    for (let j = 0; j < segment.steps; j++) {
      const { sums, step } = await this.trainStep(segment, j, window);
      if (this.runDir && step % this.settings.logEverySteps === 0) {
        // Windows tile the training time: the next one starts where this one ends, so the time of
        // writing this line (and of the commit after a step) counts in some window, as in trainSec.
        const end = now();
        await appendMetrics(this.runDir, stepLine(window, segment.epoch + 1, step, end));
        window = emptyWindow(end);
      }
      totals.trainSec = trainBase + (now() - segStart);
      await this.commit();
      if (sums.regroup) return true;
    }
    if (segment.steps === 0) {
      this.state.progress.done = this.data.train.count;
      await this.commit();
    }
    return false;
  }

  /** This rank's part of the rest of the epoch from the committed position: its images in order, its steps, its augmentation stream. */
  private segment(): Segment {
    const { settings, collective } = this;
    const { epoch, done: start } = this.state.progress;
    const worldSize = collective.worldSize;
    const mine = shardFrom(this.epochOrder(epoch), start, worldSize, collective.rank);
    if (start === 0) this.checkBatchNormRoom(settings.batchSize, mine.length, worldSize);
    // 0 only for the rest of an epoch after a regroup, shorter than one healthy batch per rank:
    // those few images sit this epoch out (DataLoader's drop_last, for this one case).
    const steps = stepsOfShare(mine.length, this.stepImages, this.minBatch);
    const stepsInEpoch = this.state.totals.steps + steps;
    if (this.startedEpoch !== epoch) {
      this.startedEpoch = epoch;
      this.hooks.onEpochStart?.(epoch + 1, stepsInEpoch);
    }
    // At an epoch start (seed, epoch, rank), as before elastic training existed; a re-sharded rest
    // gets a stream of its own, which every rank derives from the same position.
    const rng = !augmentationOf(settings) ? undefined
      : start === 0 ? new Rng(settings.seed, AUGMENT_STREAM, epoch, collective.rank)
      : new Rng(settings.seed, AUGMENT_STREAM, epoch, collective.rank, start);
    return { epoch, start, mine, steps, stepsInEpoch, rng };
  }

  /** Step j of the segment: its learning rate, its gradient all-reduced and applied, the position, totals and hook. */
  private async trainStep(segment: Segment, j: number, window: StepWindow): Promise<{ sums: StepSums; step: number }> {
    const { epoch, start, mine, steps, rng } = segment;
    const images = this.data.train.count;
    const worldSize = this.collective.worldSize;
    const perRank = this.stepImages;
    // Without a regroup in this epoch: a function of (settings, world size, epoch, step), so a
    // resume at an epoch boundary recomputes exactly the rates of the uninterrupted run. After
    // one: of the progress through the epoch, which every rank of the new group shares.
    const lr = start === 0 ? lrAt(this.settings, worldSize, epoch, j, steps) : lrAt(this.settings, worldSize, epoch, start + j * perRank * worldSize, images);
    this.model.optimizer.lr = lr;
    const batchIdx = mine.subarray(...stepBounds(j, steps, mine.length, perRank));
    const ta = now();
    // The step's gradient, all-reduced, and its sums over the group.
    const { r, tb, tc, td } = this.accumulation ? await this.accumulatedStep(batchIdx, rng) : await this.step(batchIdx, rng);
    const sums = this.reducer.groupSums();
    this.checkLossFinite(sums.lossSum, r.loss);
    if (!this.fusedStep) this.model.applyGradients(this.reducer.gradient);
    const te = now();
    const progress = this.state.progress;
    progress.step++;
    // The last step completes the epoch (it may hold the folded-in remainder: steps.ts).
    progress.done = j === steps - 1 ? images : start + (j + 1) * perRank * worldSize;
    const phases: PhaseTimes = { data: tb - ta, compute: tc - tb, allReduce: td - tc, optimizer: te - td };
    addStep(this.state.totals, window, sums, phases, lr);
    this.hooks.onStep?.({
      epoch: epoch + 1, stepInEpoch: this.state.totals.steps, stepsInEpoch: segment.stepsInEpoch, step: progress.step, n: batchIdx.length, lr, loss: r.loss, correct: r.correct,
      phases, indices: Int32Array.from(batchIdx), done: progress.done, worldSize, allReduceBytes: this.fusedStep ? 0 : this.reducer.buffer.byteLength,
    });
    return { sums, step: progress.step };
  }

  /** Stops every rank at the first step whose summed loss is not finite (all see the same sum), naming the rank where it began if this is it. */
  private checkLossFinite(groupLoss: number, myLoss: number): void {
    if (Number.isFinite(groupLoss)) return;
    const c = this.collective;
    const { step, epoch } = this.state.progress;
    const where = Number.isFinite(myLoss) ? `on another rank than ${c.rank}` : `on rank ${c.rank}`;
    throw new TrainingDivergedError(step + 1, epoch + 1, `the loss became ${Number.isFinite(myLoss) ? groupLoss : myLoss} at step ${step + 1} (epoch ${epoch + 1}) ${where}; training diverged, try a smaller --lr`);
  }

  /**
   * One batch: forward, backward and the all-reduce of its gradient. With buckets, each one's
   * all-reduce starts inside the backward pass as soon as its gradients are final (the head's
   * first), except the stem's: it also carries the step's sums, written after the pass. 'compute'
   * (tb..tc) is then forward + backward with the all-reduce running beside it, 'allReduce' (tc..td)
   * only the part left once the backward pass is over. Alone, the engine applies its own gradient
   * ('compute' then includes the optimiser step). Times are now()'s, from the data's end (tb) on.
   */
  private async step(batchIdx: Int32Array, rng: Rng | undefined): Promise<{ r: StepResult; tb: number; tc: number; td: number }> {
    const bt = this.assembler.assemble(this.data.train, batchIdx, rng, this.batchBuf);
    const tb = now();
    const batch = { images: bt.x, labels: bt.y, n: bt.n };
    if (this.fusedStep) {
      const r = await this.model.trainStep!(batch);
      this.reducer.writeSums({ lossSum: r.loss * bt.n, correct: r.correct, images: bt.n, regroup: false });
      const t = now();
      return { r, tb, tc: t, td: t };
    }
    const reduce = this.reducer.begin();
    const r = await this.model.computeGradients(batch, this.reducer.gradient, reduce.readiness);
    const tc = now();
    await reduce.finish({ lossSum: r.loss * bt.n, correct: r.correct, images: bt.n, regroup: this.elastic?.regroupRequested ?? false });
    return { r, tb, tc, td: now() };
  }

  /** --accumulate: the step's micro-batches sum locally (DDP's no_sync), then one all-reduce of their mean. */
  private async accumulatedStep(batchIdx: Int32Array, rng: Rng | undefined): Promise<{ r: StepResult; tb: number; tc: number; td: number }> {
    const t0 = now();
    const { r, dataSec, sums } = await this.accumulate(batchIdx, rng);
    const tc = now();
    await this.reducer.reduce({ ...sums, regroup: this.elastic?.regroupRequested ?? false });
    return { r, tb: t0 + dataSec, tc, td: now() };
  }

  /**
   * One step's gradient from its micro-batches (--accumulate): each of `batchSize` images (a
   * too-small last one folded in, as steps are), summed weighted by its images in float64, then
   * divided by the step's images into the all-reduce buffer: the gradient of the mean loss over
   * the whole step, as one batch of them would give (BatchNorm aside: it normalises each
   * micro-batch by its own statistics). Returns the step's sums with it.
   */
  private async accumulate(batchIdx: Int32Array, rng: Rng | undefined): Promise<{ r: StepResult; dataSec: number; sums: Omit<StepSums, 'regroup'> }> {
    const { sum, micro } = this.accumulation!;
    const parts = stepsOfShare(batchIdx.length, this.settings.batchSize, this.minBatch);
    sum.fill(0);
    let [lossSum, correct, n, dataSec] = [0, 0, 0, 0];
    for (let i = 0; i < parts; i++) {
      const t0 = now();
      const bt = this.assembler.assemble(this.data.train, batchIdx.subarray(...stepBounds(i, parts, batchIdx.length, this.settings.batchSize)), rng, this.batchBuf);
      dataSec += now() - t0;
      const r = await this.model.computeGradients({ images: bt.x, labels: bt.y, n: bt.n }, micro);
      for (let k = 0; k < micro.length; k++) sum[k] += micro[k] * bt.n;
      lossSum += r.loss * bt.n;
      correct += r.correct;
      n += bt.n;
    }
    const g = this.reducer.gradient;
    for (let k = 0; k < g.length; k++) g[k] = sum[k] / n;
    return { r: { loss: lossSum / n, correct }, dataSec, sums: { lossSum, correct, images: n } };
  }

  /** BatchNorm averaging, evaluation, history; rank 0: checkpoint and epoch line. Commits the next epoch's start. */
  private async endEpoch(): Promise<void> {
    const st = this.state;
    const e = st.progress.epoch;
    const t = st.totals;
    const evalStart = now();
    await this.averageBatchNormStats();
    this.hooks.onEvalStart?.(e + 1, this.data.test.count);
    const ev = await this.evaluate();
    // The loss check of each step sees the weights before its update: weights that the last
    // update made non-finite show here first (every rank has the same summed loss, so all stop).
    if (!Number.isFinite(ev.loss)) {
      throw new TrainingDivergedError(st.progress.step, e + 1, `the test loss became ${ev.loss} after epoch ${e + 1} (step ${st.progress.step}): the weights are no longer finite; training diverged, no checkpoint was written, try a smaller --lr`);
    }
    // No collective after this point. A group change can still catch the evaluation half-way
    // (some ranks have its sum, rank 0 does not): `lastEpoch` lets the new rank 0 write this epoch.
    const evalSec = now() - evalStart;
    const elapsedSec = t.trainSec + evalSec;
    const history = st.history;
    history.testAcc.push(ev.acc);
    if (ev.acc > history.bestTestAcc || history.bestEpoch === 0) {
      history.bestTestAcc = ev.acc;
      history.bestEpoch = e + 1;
    }
    history.elapsedSec += elapsedSec;
    history.trainSec += t.trainSec;
    history.images += t.count;
    const m = this.epochLine(ev, evalSec);
    st.progress = { epoch: e + 1, done: 0, step: st.progress.step };
    st.totals = zeroTotals();
    st.lastEpoch = m;
    const runDir = this.runDir;
    if (runDir) {
      // Checkpoint first: a metrics line never describes an epoch that a resume would redo.
      this.lastCheckpoint = await this.saveCheckpoint(runDir, st);
      this.hooks.onCheckpoint?.(this.lastCheckpoint);
      if (history.bestEpoch === m.epoch) await keepAsBest(runDir, this.lastCheckpoint);
      await appendMetrics(runDir, m);
    }
    this.epochs.push(m);
    this.hooks.onEpochEnd?.(m);
    await this.commit();
  }

  /** The epoch's `kind: 'epoch'` line, from its totals and evaluation (before the position moves on). */
  private epochLine(ev: { loss: number; acc: number; count: number }, evalSec: number): EpochMetrics {
    const { progress, totals: t } = this.state;
    const elapsedSec = t.trainSec + evalSec;
    const share = (x: number) => (t.trainSec > 0 ? round(x / t.trainSec, 4) : 0);
    const ph = t.phases;
    const other = Math.max(0, t.trainSec - ph.data - ph.compute - ph.allReduce - ph.optimizer);
    return {
      kind: 'epoch',
      epoch: progress.epoch + 1,
      epochs: this.settings.epochs,
      step: progress.step,
      loss: round(t.lossSum / t.count),
      trainAcc: round(t.correct / t.count),
      testLoss: round(ev.loss),
      testAcc: round(ev.acc),
      testImages: ev.count,
      elapsedSec: round(elapsedSec, 3),
      trainSec: round(t.trainSec, 3),
      evalSec: round(evalSec, 3),
      images: t.count,
      imagesPerSec: round(t.count / t.trainSec, 2),
      phaseSec: { data: round(ph.data, 3), compute: round(ph.compute, 3), allReduce: round(ph.allReduce, 3), optimizer: round(ph.optimizer, 3), other: round(other, 3) },
      phaseShare: { data: share(ph.data), compute: share(ph.compute), allReduce: share(ph.allReduce), optimizer: share(ph.optimizer), other: share(other) },
      worldSize: this.collective.worldSize,
      globalBatch: this.globalBatch,
      lr: t.lrLast ?? this.model.optimizer.lr,
      lrFirst: t.lrFirst ?? this.model.optimizer.lr,
      totalElapsedSec: round(this.elapsedBefore + (now() - this.t0), 3),
      time: new Date().toISOString(),
    };
  }

  /** Loss and accuracy over the whole test split: each rank its shard, counts summed. */
  async evaluate(): Promise<{ loss: number; acc: number; count: number }> {
    const c = this.collective;
    const test = this.data.test;
    const shard = evaluationShard(test.count, c.worldSize, c.rank);
    const idx = new Int32Array(shard.count);
    for (let i = 0; i < shard.count; i++) idx[i] = shard.start + i;
    let lossSum = 0;
    let correct = 0;
    for (const batchIdx of batchesOf(idx, this.settings.evalBatchSize)) {
      const b = this.assembler.assemble(test, batchIdx, undefined, this.evalBuf);
      const r = await this.model.evaluate({ images: b.x, labels: b.y, n: b.n });
      lossSum += r.loss * b.n;
      correct += r.correct;
    }
    const totals = Float32Array.from([lossSum, correct, shard.count]);
    await c.allReduceSum(totals);
    const count = Math.round(totals[2]);
    if (count !== test.count) throw new ReplicaMismatchError(c.rank, `evaluation counted ${count} test images, the test split has ${test.count}`);
    return { loss: totals[0] / count, acc: Math.round(totals[1]) / count, count };
  }

  /** Every replica's running mean and variance replaced by their average over replicas. */
  async averageBatchNormStats(): Promise<void> {
    const bn = await this.model.getBatchNormStats();
    await this.collective.allReduceMean(bn);
    this.model.setBatchNormStats(bn);
  }

  // ---- state -----------------------------------------------------------------------------

  private restore(ck: Checkpoint): void {
    const h = ck.header;
    if (h.model.layoutHash !== this.layout || h.model.paramCount !== this.model.paramCount) {
      throw new CheckpointError(ck.file, `it is for another model (${h.model.paramCount} parameters, layout ${h.model.layoutHash}; this one has ${this.model.paramCount}, layout ${this.layout})`, 'resume with the settings of that run');
    }
    const saved = withScheduleDefaults(h.settings);
    for (const k of TRAJECTORY_SETTINGS) {
      if (!sameSetting(saved[k], this.settings[k])) {
        throw new CheckpointError(ck.file, `it was written with ${k} = ${JSON.stringify(saved[k])}, this run has ${JSON.stringify(this.settings[k])}`, 'resume with the settings of that run');
      }
    }
    if (h.position && !(Number.isInteger(h.position.done) && h.position.done > 0 && h.position.done <= this.data.train.count)) {
      throw new CheckpointError(ck.file, `its position (${h.position.done} samples done) does not fit the training split of ${this.data.train.count} images`, 'resume with the data of that run');
    }
    this.model.setWeights(ck.weights);
    this.model.setBatchNormStats(ck.bnStats);
    this.model.optimizer.setState({ steps: h.optimizer.steps, buffers: ck.momentum });
    this.model.optimizer.lr = h.optimizer.lr;
    this.state = {
      progress: { epoch: h.epoch, done: h.position?.done ?? 0, step: h.step },
      totals: h.position ? structuredClone(h.position.totals) : zeroTotals(),
      history: structuredClone(h.history),
    };
  }

  /**
   * The root's fingerprint of everything that must agree (trajectory settings, model layout, data
   * sizes, world size) goes to every rank, and each compares it with its own.
   */
  private async checkReplicasAgree(root: number): Promise<void> {
    const c = this.collective;
    const s = this.settings;
    const fields = {
      ...Object.fromEntries(TRAJECTORY_SETTINGS.map((k) => [k, s[k]])),
      epochs: s.epochs,
      layout: this.layout,
      // The gradient's per-tensor layout is the engine's: one engine per run.
      engine: s.engine,
      gradientLayout: this.model.gradientLayout,
      train: this.data.train.count,
      test: this.data.test.count,
      worldSize: c.worldSize,
    };
    const digest = createHash('sha256').update(JSON.stringify(fields)).digest();
    // 16-bit pieces: exact in float32, which is what the collectives carry.
    const mine = Float32Array.from({ length: 8 }, (_, i) => digest.readUInt16LE(2 * i));
    const theirs = Float32Array.from(mine);
    await c.broadcast(theirs, root);
    const differs = theirs.some((v, i) => v !== mine[i]);
    // Every rank learns how many differ, so all stop here instead of some waiting forever.
    const count = Float32Array.of(differs ? 1 : 0);
    await c.allReduceSum(count);
    if (differs) {
      throw new ReplicaMismatchError(c.rank, `its settings, model, data sizes or world size differ from rank ${root}'s (this rank has ${JSON.stringify(fields)})`);
    }
    if (count[0] > 0) {
      throw new ReplicaMismatchError(c.rank, `${count[0]} of ${c.worldSize} ranks have settings, model, data sizes or world size that differ from rank ${root}'s (see their errors)`);
    }
  }

  /** At an epoch boundary (done 0), or mid-epoch with the position and the epoch's totals. */
  private async saveCheckpoint(runDir: string, st: RunState): Promise<string> {
    const s = this.settings;
    const m = this.model;
    const opt = await m.optimizer.getState();
    const { epoch, step, done } = st.progress;
    const header: Omit<CheckpointHeader, 'format' | 'version' | 'sections' | 'createdAt'> = {
      epoch,
      step,
      settings: s,
      worldSize: this.collective.worldSize,
      model: { config: { ...m.config }, paramCount: m.paramCount, bnStatCount: m.arch.bnStatCount, layoutHash: this.layout },
      optimizer: { kind: 'sgd', steps: opt.steps, lr: m.optimizer.lr, momentum: m.optimizer.momentum, weightDecay: m.optimizer.weightDecay, nesterov: m.optimizer.nesterov, skipNormBiasDecay: m.optimizer.skipNormBiasDecay },
      sampler: { kind: 'distributed', seed: s.seed, nextEpoch: epoch, shuffle: true, dropLast: false },
      rng: { algorithm: 'xoshiro128**', augmentStream: AUGMENT_STREAM, seededBy: '(seed, augmentStream, epoch, rank)' },
      history: st.history,
      ...(done > 0 ? { position: { done, totals: st.totals } } : {}),
    };
    const weights = await m.getWeights();
    // A checkpoint of non-finite weights is worth nothing and would replace a good one (one pass).
    const bad = firstNonFinite(weights);
    if (bad >= 0) throw new TrainingDivergedError(step, epoch + (done > 0 ? 1 : 0), `weight ${bad} of ${m.paramCount} is ${weights[bad]} at step ${step}: training diverged, no checkpoint was written, try a smaller --lr`);
    return writeCheckpoint(runDir, { ...header, weights, bnStats: await m.getBatchNormStats(), momentum: opt.buffers }, s.keepCheckpoints, this.checkpointWrite);
  }

  /** config.json's entry for a resume from `ck`. */
  private resumeRecord(ck: Checkpoint): ResumeRecord {
    return { at: new Date().toISOString(), fromCheckpoint: path.basename(ck.file), fromEpoch: ck.header.epoch, ...(ck.header.position ? { fromDone: ck.header.position.done } : {}), worldSize: this.collective.worldSize, epochs: this.settings.epochs };
  }

  /** What config.json records of the run (writeConfig adds when it was created and its resumes). */
  private configFields(): Record<string, unknown> {
    const s = this.settings;
    const { train, test } = this.data;
    return {
      settings: s,
      seed: s.seed,
      worldSize: this.collective.worldSize,
      globalBatch: this.globalBatch,
      model: { ...this.model.config, params: this.model.paramCount, bnStats: this.model.arch.bnStatCount, layoutHash: this.layout, init: s.init },
      optimizer: {
        kind: 'sgd',
        lr: s.lr,
        momentum: s.momentum,
        nesterov: s.nesterov,
        weightDecay: s.weightDecay,
        weightDecayApplies: s.skipNormBiasDecay ? 'tensors of 2+ dimensions (not biases, not BatchNorm scale and shift)' : 'every parameter',
        labelSmoothing: s.labelSmoothing,
        semantics: `torch.optim.SGD (dampening 0${s.nesterov ? ', Nesterov' : ''})`,
        // The rate actually used: lr, or lr x worldSize after a linear warmup of warmupEpochs (per step).
        lrSchedule: {
          scaling: s.lrScaling, warmupEpochs: s.warmupEpochs, baseLr: s.lr, peakLr: peakLr(s, this.collective.worldSize),
          rule: s.lrScaling === 'linear' ? 'Goyal et al. 2017: lr x worldSize, linear warmup from lr' : 'lr as given',
          shape: s.lrSchedule, ...(s.lrSchedule === 'cosine' ? { finalLr: s.lrFinal } : {}), ...(s.lrSchedule === 'step' ? { milestones: s.lrMilestones, gamma: s.lrGamma } : {}),
        },
      },
      data: {
        train: { name: train.name, images: train.count, shape: [train.height, train.width, train.channels] },
        test: { name: test.name, images: test.count, shape: [test.height, test.width, test.channels] },
        classes: train.classNames,
        preprocessing: { resize: `bilinear ${train.height}x${train.width} -> ${s.imageSize}x${s.imageSize}`, normalize: '(x/255 - 0.5) / 0.5' },
        augment: augmentationOf(s) ?? false,
        sampler: { kind: 'distributed', shuffle: true, dropLast: false, lastBatch: 'kept (may be short)' },
      },
      versions: this.engine.versions,
      host: { hostname: os.hostname(), platform: process.platform, arch: process.arch, cpus: os.cpus().length },
      ...this.configExtra,
    };
  }

  /** When a resume finds nothing left to train, the summary repeats the last epoch's line. */
  private async resumedFinalMetrics(runDir: string | null): Promise<EpochMetrics | undefined> {
    if (!runDir) return undefined;
    const lines = await readMetrics(runDir);
    return lines.filter((l): l is EpochMetrics => l.kind === 'epoch').pop();
  }
}
