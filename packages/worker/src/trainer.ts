// The training loop, written once for every world size. All communication goes through a
// Collective (identity in one process, a ring all-reduce across workers), in the same order on
// every rank:
//
//   start:       fingerprint check; broadcast from rank 0: [start epoch, step, optimiser steps],
//                weights, BatchNorm statistics, momentum buffers (so replicas start identical,
//                also after a resume, also when only rank 0 could read the checkpoint)
//   every step:  all-reduce-mean of the flat gradient
//   every epoch: all-reduce-mean of BatchNorm running statistics (before evaluation and the
//                checkpoint), all-reduce-sum of [eval loss sum, correct, count] (each rank
//                evaluates its own contiguous shard, so every test image counts exactly once),
//                all-reduce-sum of [train loss sum, correct, count]
//
// Only rank 0 writes files. One gradient buffer and one batch buffer are reused by every step.

import { createHash } from 'node:crypto';
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { loadBackend, type LoadedBackend } from '@dtrain/backend';
import { ResNet, type ResNetConfig } from '@dtrain/core';
import { BatchAssembler, DistributedSampler, Rng, batchesOf, evaluationShard, type Dataset } from '@dtrain/data';
import { writeCheckpoint, type Checkpoint, type CheckpointHeader, type CheckpointHistory } from './checkpoint.js';
import { SingleProcess, type Collective } from './collective.js';
import { CheckpointError, ReplicaMismatchError, TrainSettingsError } from './errors.js';
import { writeFileAtomic, type AtomicWriteOptions } from './files.js';
import { lrAt, peakLr } from './schedule.js';
import { TRAJECTORY_SETTINGS, withScheduleDefaults, type TrainSettings } from './settings.js';

/** Stream id mixed into the augmentation generator's seed, so it never repeats the sampler's stream. */
export const AUGMENT_STREAM = 0xa06e;
/** Random crop padding when `augment` is on (torchvision's usual CIFAR choice). */
export const AUGMENT_CROP_PADDING = 4;

export interface TrainData {
  train: Dataset;
  test: Dataset;
}

/** Seconds spent in each phase of a training step. */
export interface PhaseTimes {
  /** Batch assembly (index lookup, resize, normalisation). */
  data: number;
  /** Forward and backward pass, gradients copied into the flat buffer. */
  compute: number;
  /** Gradient all-reduce (zero in one process). */
  allReduce: number;
  /** Optimiser update. */
  optimizer: number;
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
}

/** A `kind: 'step'` line of metrics.jsonl: this rank's figures over the last `steps` steps. */
export interface StepMetrics {
  kind: 'step';
  epoch: number;
  step: number;
  steps: number;
  loss: number;
  trainAcc: number;
  images: number;
  imagesPerSec: number;
  phaseSec: PhaseTimes;
  time: string;
}

/** A `kind: 'epoch'` line of metrics.jsonl (all ranks together). */
export interface EpochMetrics {
  kind: 'epoch';
  epoch: number;
  epochs: number;
  step: number;
  loss: number;
  trainAcc: number;
  testLoss: number;
  testAcc: number;
  testImages: number;
  /** This epoch's wall time, training and evaluation. */
  elapsedSec: number;
  trainSec: number;
  evalSec: number;
  /** Training images (all ranks) per second of training time. */
  images: number;
  imagesPerSec: number;
  /** Rank 0's step phases in seconds; `other` is the rest of the training time (bookkeeping, hooks). */
  phaseSec: PhaseTimes & { other: number };
  /** The same as fractions of the training time. */
  phaseShare: PhaseTimes & { other: number };
  worldSize: number;
  globalBatch: number;
  /** The learning rate of the epoch's last step (during warmup it grew over the epoch from lrFirst). */
  lr: number;
  /** The learning rate of the epoch's first step (absent in lines written before the schedule existed). */
  lrFirst?: number;
  /** Wall time of the whole run so far, resumes included. */
  totalElapsedSec: number;
  time: string;
}

export interface Summary {
  status: 'completed';
  dataset: string;
  epochs: number;
  steps: number;
  finalTrainLoss: number;
  finalTrainAcc: number;
  finalTestLoss: number;
  finalTestAcc: number;
  bestTestAcc: number;
  bestEpoch: number;
  testImages: number;
  totalSec: number;
  trainSec: number;
  /** Training images per second of training time, over the whole run. */
  imagesPerSec: number;
  worldSize: number;
  globalBatch: number;
  runDir: string | null;
  lastCheckpoint: string | null;
  resumed: boolean;
}

export interface StartInfo {
  startEpoch: number;
  epochs: number;
  stepsPerEpoch: number;
  trainImages: number;
  testImages: number;
  resumedFromEpoch: number | null;
  runDir: string | null;
}

export interface TrainerHooks {
  onStart?(info: StartInfo): void;
  onEpochStart?(epoch: number, stepsInEpoch: number): void;
  onStep?(info: StepInfo): void;
  onEvalStart?(epoch: number, testImages: number): void;
  onEpochEnd?(metrics: EpochMetrics): void;
  onCheckpoint?(file: string): void;
}

export interface TrainerOptions {
  settings: TrainSettings;
  data: TrainData;
  collective?: Collective;
  /** Rank 0 writes config.json, metrics.jsonl, checkpoints and summary.json here; none when omitted. */
  runDir?: string;
  hooks?: TrainerHooks;
  /** Test seam for checkpoint writes. */
  checkpointWrite?: AtomicWriteOptions;
  /** Extra fields for config.json (e.g. the data set's origin). */
  configExtra?: Record<string, unknown>;
}

export interface TrainResult {
  summary: Summary;
  epochs: EpochMetrics[];
}

const now = () => performance.now() / 1000;

function zeroPhases(): PhaseTimes {
  return { data: 0, compute: 0, allReduce: 0, optimizer: 0 };
}

function round(x: number, digits = 6): number {
  const f = 10 ** digits;
  return Math.round(x * f) / f;
}

/** Names and shapes of every tensor, hashed: two models with the same hash share a flat layout. */
export function layoutHash(model: ResNet): string {
  const h = createHash('sha256');
  for (const p of model.arch.params) h.update(`${p.name}:${p.shape.join('x')};`);
  for (const b of model.arch.batchNorms) h.update(`${b.name}:${b.channels};`);
  return h.digest('hex').slice(0, 16);
}

export function readVersions(backend: LoadedBackend): Record<string, string> {
  return { dtrain: DTRAIN_VERSION, tfjs: backend.versions.tfjs, tensorflow: backend.versions.tensorflow, node: process.versions.node, backendPackage: backend.packageName };
}

const DTRAIN_VERSION = '0.1.0';

export class Trainer {
  readonly model: ResNet;
  readonly settings: TrainSettings;
  readonly collective: Collective;
  readonly data: TrainData;
  readonly runDir: string | null;
  private readonly hooks: TrainerHooks;
  private readonly assembler: BatchAssembler;
  private readonly grads: Float32Array;
  private readonly batchBuf: { x: Float32Array; y: Int32Array };
  private readonly evalBuf: { x: Float32Array; y: Int32Array };
  private readonly sampler: DistributedSampler;
  private readonly layout: string;

  private constructor(
    o: TrainerOptions,
    private readonly backend: LoadedBackend,
  ) {
    this.settings = o.settings;
    this.collective = o.collective ?? new SingleProcess();
    this.data = o.data;
    this.runDir = this.collective.rank === 0 && o.runDir ? o.runDir : null;
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
    this.model = new ResNet(config, { seed: s.seed, sgd: { lr: s.lr, momentum: s.momentum, weightDecay: s.weightDecay } });
    this.layout = layoutHash(this.model);
    this.assembler = new BatchAssembler(train, {
      height: s.imageSize,
      width: s.imageSize,
      augment: s.augment ? { cropPadding: AUGMENT_CROP_PADDING, horizontalFlip: true } : undefined,
    });
    this.grads = new Float32Array(this.model.paramCount);
    const len = this.assembler.imageLength;
    this.batchBuf = { x: new Float32Array(s.batchSize * len), y: new Int32Array(s.batchSize) };
    this.evalBuf = { x: new Float32Array(s.evalBatchSize * len), y: new Int32Array(s.evalBatchSize) };
    this.sampler = new DistributedSampler({
      size: train.count,
      worldSize: this.collective.worldSize,
      rank: this.collective.rank,
      seed: s.seed,
      shuffle: true,
      dropLast: false,
    });
  }

  private readonly checkpointWrite: AtomicWriteOptions | undefined;
  private readonly configExtra: Record<string, unknown>;

  /** Loads the backend (once per process) and builds the model with the settings' seed. */
  static async create(o: TrainerOptions): Promise<Trainer> {
    const backend = await loadBackend(o.settings.backend);
    return new Trainer(o, backend);
  }

  get stepsPerEpoch(): number {
    return Math.ceil(this.sampler.numSamples / this.settings.batchSize);
  }

  get globalBatch(): number {
    return this.settings.batchSize * this.collective.worldSize;
  }

  /**
   * Trains from epoch 1, or from `resumeFrom` (rank 0's checkpoint; other ranks pass nothing and
   * receive the state by broadcast), up to `settings.epochs`.
   */
  async run(resumeFrom?: Checkpoint): Promise<TrainResult> {
    const c = this.collective;
    const s = this.settings;
    const t0 = now();
    await this.checkReplicasAgree();

    let history: CheckpointHistory = { testAcc: [], bestTestAcc: 0, bestEpoch: 0, elapsedSec: 0, trainSec: 0, images: 0 };
    const meta = new Float32Array(3);
    if (c.rank === 0 && resumeFrom) {
      this.restore(resumeFrom);
      history = structuredClone(resumeFrom.header.history);
      meta.set([resumeFrom.header.epoch, resumeFrom.header.step, resumeFrom.header.optimizer.steps]);
    }
    await c.broadcast(meta, 0);
    const [startEpoch, startStep, optSteps] = meta;
    await this.broadcastState(optSteps);

    const runDir = this.runDir;
    if (runDir) {
      await this.writeConfig(runDir, resumeFrom);
      if (resumeFrom) await trimMetrics(runDir, resumeFrom.header.epoch);
    }
    this.hooks.onStart?.({
      startEpoch: startEpoch + 1,
      epochs: s.epochs,
      stepsPerEpoch: this.stepsPerEpoch,
      trainImages: this.data.train.count,
      testImages: this.data.test.count,
      resumedFromEpoch: resumeFrom ? startEpoch : null,
      runDir,
    });

    const epochs: EpochMetrics[] = [];
    let step = startStep;
    let lastCheckpoint: string | null = resumeFrom?.file ?? null;
    const elapsedBefore = history.elapsedSec;
    for (let e = startEpoch; e < s.epochs; e++) {
      const r = await this.trainEpoch(e, step, runDir);
      step = r.step;
      const evalStart = now();
      await this.averageBatchNormStats();
      this.hooks.onEvalStart?.(e + 1, this.data.test.count);
      const ev = await this.evaluate();
      const evalSec = now() - evalStart;
      const elapsedSec = r.trainSec + evalSec;
      history.testAcc.push(ev.acc);
      if (ev.acc > history.bestTestAcc || history.bestEpoch === 0) {
        history.bestTestAcc = ev.acc;
        history.bestEpoch = e + 1;
      }
      history.elapsedSec += elapsedSec;
      history.trainSec += r.trainSec;
      history.images += r.images;
      const share = (x: number) => (r.trainSec > 0 ? round(x / r.trainSec, 4) : 0);
      const other = Math.max(0, r.trainSec - r.phases.data - r.phases.compute - r.phases.allReduce - r.phases.optimizer);
      const m: EpochMetrics = {
        kind: 'epoch',
        epoch: e + 1,
        epochs: s.epochs,
        step,
        loss: round(r.loss),
        trainAcc: round(r.acc),
        testLoss: round(ev.loss),
        testAcc: round(ev.acc),
        testImages: ev.count,
        elapsedSec: round(elapsedSec, 3),
        trainSec: round(r.trainSec, 3),
        evalSec: round(evalSec, 3),
        images: r.images,
        imagesPerSec: round(r.images / r.trainSec, 2),
        phaseSec: {
          data: round(r.phases.data, 3),
          compute: round(r.phases.compute, 3),
          allReduce: round(r.phases.allReduce, 3),
          optimizer: round(r.phases.optimizer, 3),
          other: round(other, 3),
        },
        phaseShare: {
          data: share(r.phases.data),
          compute: share(r.phases.compute),
          allReduce: share(r.phases.allReduce),
          optimizer: share(r.phases.optimizer),
          other: share(other),
        },
        worldSize: c.worldSize,
        globalBatch: this.globalBatch,
        lr: r.lrLast,
        lrFirst: r.lrFirst,
        totalElapsedSec: round(elapsedBefore + (now() - t0), 3),
        time: new Date().toISOString(),
      };
      if (runDir) {
        // Checkpoint first: a metrics line never describes an epoch that a resume would redo.
        lastCheckpoint = await this.saveCheckpoint(runDir, e + 1, step, history);
        this.hooks.onCheckpoint?.(lastCheckpoint);
        await fs.appendFile(path.join(runDir, 'metrics.jsonl'), `${JSON.stringify(m)}\n`);
      }
      epochs.push(m);
      this.hooks.onEpochEnd?.(m);
    }

    const last = epochs[epochs.length - 1];
    const lastTrain = last ?? (await this.resumedFinalMetrics(runDir));
    const summary: Summary = {
      status: 'completed',
      dataset: s.dataset,
      epochs: s.epochs,
      steps: step,
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
      runDir,
      lastCheckpoint,
      resumed: resumeFrom !== undefined,
    };
    if (runDir) await writeFileAtomic(path.join(runDir, 'summary.json'), `${JSON.stringify(summary, null, 2)}\n`);
    return { summary, epochs };
  }

  dispose(): void {
    this.model.dispose();
  }

  // ---- one epoch -------------------------------------------------------------------------

  private async trainEpoch(e: number, step: number, runDir: string | null) {
    const s = this.settings;
    const c = this.collective;
    this.sampler.setEpoch(e);
    const indices = this.sampler.indices();
    const rng = s.augment ? new Rng(s.seed, AUGMENT_STREAM, e, c.rank) : undefined;
    const stepsInEpoch = Math.ceil(indices.length / s.batchSize);
    this.hooks.onEpochStart?.(e + 1, stepsInEpoch);
    const phases = zeroPhases();
    let lossSum = 0;
    let correct = 0;
    let count = 0;
    // The window of the next `kind: 'step'` line.
    let win = { steps: 0, lossSum: 0, correct: 0, n: 0, start: now(), phases: zeroPhases() };
    const start = now();
    let k = 0;
    let lrFirst = NaN;
    let lrLast = NaN;
    for (const batchIdx of batchesOf(indices, s.batchSize)) {
      // A function of (settings, world size, epoch, step): identical on every rank, and a resume
      // at an epoch boundary recomputes exactly the rates the uninterrupted run used.
      const lr = lrAt(s, c.worldSize, e, k, stepsInEpoch);
      this.model.optimizer.lr = lr;
      if (k === 0) lrFirst = lr;
      lrLast = lr;
      const ta = now();
      const b = this.assembler.assemble(this.data.train, batchIdx, rng, this.batchBuf);
      const tb = now();
      const r = this.model.computeGradients({ images: b.x, labels: b.y, n: b.n }, this.grads);
      const tc = now();
      await c.allReduceMean(this.grads);
      const td = now();
      this.model.applyGradients(this.grads);
      const te = now();
      step++;
      k++;
      const p: PhaseTimes = { data: tb - ta, compute: tc - tb, allReduce: td - tc, optimizer: te - td };
      for (const key of Object.keys(p) as (keyof PhaseTimes)[]) {
        phases[key] += p[key];
        win.phases[key] += p[key];
      }
      if (!Number.isFinite(r.loss)) {
        throw new TrainSettingsError('lr', `the loss became ${r.loss} at step ${step} (epoch ${e + 1}) on rank ${c.rank}; training diverged, try a smaller --lr`);
      }
      lossSum += r.loss * b.n;
      correct += r.correct;
      count += b.n;
      win.steps++;
      win.lossSum += r.loss * b.n;
      win.correct += r.correct;
      win.n += b.n;
      this.hooks.onStep?.({ epoch: e + 1, stepInEpoch: k, stepsInEpoch, step, n: b.n, lr, loss: r.loss, correct: r.correct, phases: p });
      if (runDir && step % s.logEverySteps === 0) {
        const secs = now() - win.start;
        const line: StepMetrics = {
          kind: 'step',
          epoch: e + 1,
          step,
          steps: win.steps,
          loss: round(win.lossSum / win.n),
          trainAcc: round(win.correct / win.n),
          images: win.n,
          imagesPerSec: round(win.n / secs, 2),
          phaseSec: { data: round(win.phases.data, 4), compute: round(win.phases.compute, 4), allReduce: round(win.phases.allReduce, 4), optimizer: round(win.phases.optimizer, 4) },
          time: new Date().toISOString(),
        };
        await fs.appendFile(path.join(runDir, 'metrics.jsonl'), `${JSON.stringify(line)}\n`);
        win = { steps: 0, lossSum: 0, correct: 0, n: 0, start: now(), phases: zeroPhases() };
      }
    }
    const trainSec = now() - start;
    const totals = Float32Array.from([lossSum, correct, count]);
    await c.allReduceSum(totals);
    return { step, trainSec, phases, lrFirst, lrLast, loss: totals[0] / totals[2], acc: totals[1] / totals[2], images: Math.round(totals[2]) };
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
      const r = this.model.evaluate({ images: b.x, labels: b.y, n: b.n });
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
    const bn = this.model.getBatchNormStats();
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
      if (saved[k] !== this.settings[k]) {
        throw new CheckpointError(ck.file, `it was written with ${k} = ${JSON.stringify(saved[k])}, this run has ${JSON.stringify(this.settings[k])}`, 'resume with the settings of that run');
      }
    }
    this.model.setWeights(ck.weights);
    this.model.setBatchNormStats(ck.bnStats);
    this.model.optimizer.setState({ steps: h.optimizer.steps, buffers: ck.momentum });
  }

  private async broadcastState(optSteps: number): Promise<void> {
    const c = this.collective;
    const m = this.model;
    const weights = m.getWeights();
    await c.broadcast(weights, 0);
    const bn = m.getBatchNormStats();
    await c.broadcast(bn, 0);
    const opt = m.optimizer.getState();
    await c.broadcast(opt.buffers, 0);
    if (c.rank !== 0) {
      m.setWeights(weights);
      m.setBatchNormStats(bn);
      m.optimizer.setState({ steps: optSteps, buffers: opt.buffers });
    }
  }

  /**
   * Rank 0's fingerprint of everything that must agree (trajectory settings, model layout, data
   * sizes, world size) goes to every rank, and each compares it with its own.
   */
  private async checkReplicasAgree(): Promise<void> {
    const c = this.collective;
    const s = this.settings;
    const fields = {
      ...Object.fromEntries(TRAJECTORY_SETTINGS.map((k) => [k, s[k]])),
      epochs: s.epochs,
      layout: this.layout,
      train: this.data.train.count,
      test: this.data.test.count,
      worldSize: c.worldSize,
    };
    const digest = createHash('sha256').update(JSON.stringify(fields)).digest();
    // 16-bit pieces: exact in float32, which is what the collectives carry.
    const mine = Float32Array.from({ length: 8 }, (_, i) => digest.readUInt16LE(2 * i));
    const root = Float32Array.from(mine);
    await c.broadcast(root, 0);
    const differs = root.some((v, i) => v !== mine[i]);
    // Every rank learns how many differ, so all stop here instead of some waiting forever.
    const count = Float32Array.of(differs ? 1 : 0);
    await c.allReduceSum(count);
    if (differs) {
      throw new ReplicaMismatchError(c.rank, `its settings, model, data sizes or world size differ from rank 0's (this rank has ${JSON.stringify(fields)})`);
    }
    if (count[0] > 0) {
      throw new ReplicaMismatchError(c.rank, `${count[0]} of ${c.worldSize} ranks have settings, model, data sizes or world size that differ from rank 0's (see their errors)`);
    }
  }

  private async saveCheckpoint(runDir: string, epoch: number, step: number, history: CheckpointHistory): Promise<string> {
    const s = this.settings;
    const m = this.model;
    const opt = m.optimizer.getState();
    const header: Omit<CheckpointHeader, 'format' | 'version' | 'sections' | 'createdAt'> = {
      epoch,
      step,
      settings: s,
      worldSize: this.collective.worldSize,
      model: { config: { ...m.config }, paramCount: m.paramCount, bnStatCount: m.arch.bnStatCount, layoutHash: this.layout },
      optimizer: { kind: 'sgd', steps: opt.steps, lr: m.optimizer.lr, momentum: m.optimizer.momentum, weightDecay: m.optimizer.weightDecay },
      sampler: { kind: 'distributed', seed: s.seed, nextEpoch: epoch, shuffle: true, dropLast: false },
      rng: { algorithm: 'xoshiro128**', augmentStream: AUGMENT_STREAM, seededBy: '(seed, augmentStream, epoch, rank)' },
      history,
    };
    return writeCheckpoint(runDir, { ...header, weights: m.getWeights(), bnStats: m.getBatchNormStats(), momentum: opt.buffers }, s.keepCheckpoints, this.checkpointWrite);
  }

  private async writeConfig(runDir: string, resumeFrom: Checkpoint | undefined): Promise<void> {
    const file = path.join(runDir, 'config.json');
    const s = this.settings;
    const { train, test } = this.data;
    const resume = resumeFrom
      ? { at: new Date().toISOString(), fromCheckpoint: path.basename(resumeFrom.file), fromEpoch: resumeFrom.header.epoch, worldSize: this.collective.worldSize, epochs: s.epochs }
      : undefined;
    let previous: { createdAt?: string; resumes?: unknown[] } = {};
    if (resumeFrom) previous = JSON.parse(await fs.readFile(file, 'utf8').catch(() => '{}')) as typeof previous;
    const config = {
      settings: s,
      seed: s.seed,
      worldSize: this.collective.worldSize,
      globalBatch: this.globalBatch,
      model: { ...this.model.config, params: this.model.paramCount, bnStats: this.model.arch.bnStatCount, layoutHash: this.layout, init: s.init },
      optimizer: {
        kind: 'sgd',
        lr: s.lr,
        momentum: s.momentum,
        weightDecay: s.weightDecay,
        semantics: 'torch.optim.SGD (dampening 0, no Nesterov)',
        // The rate actually used: lr, or lr x worldSize after a linear warmup of warmupEpochs (per step).
        lrSchedule: { scaling: s.lrScaling, warmupEpochs: s.warmupEpochs, baseLr: s.lr, peakLr: peakLr(s, this.collective.worldSize), rule: s.lrScaling === 'linear' ? 'Goyal et al. 2017: lr x worldSize, linear warmup from lr' : 'constant' },
      },
      data: {
        train: { name: train.name, images: train.count, shape: [train.height, train.width, train.channels] },
        test: { name: test.name, images: test.count, shape: [test.height, test.width, test.channels] },
        classes: train.classNames,
        preprocessing: { resize: `bilinear ${train.height}x${train.width} -> ${s.imageSize}x${s.imageSize}`, normalize: '(x/255 - 0.5) / 0.5' },
        augment: s.augment ? { cropPadding: AUGMENT_CROP_PADDING, horizontalFlip: true } : false,
        sampler: { kind: 'distributed', shuffle: true, dropLast: false, lastBatch: 'kept (may be short)' },
      },
      versions: readVersions(this.backend),
      host: { hostname: os.hostname(), platform: process.platform, arch: process.arch, cpus: os.cpus().length },
      ...this.configExtra,
      createdAt: previous.createdAt ?? new Date().toISOString(),
      resumes: [...(previous.resumes ?? []), ...(resume ? [resume] : [])],
    };
    await writeFileAtomic(file, `${JSON.stringify(config, null, 2)}\n`);
  }

  /** When a resume finds nothing left to train, the summary repeats the last epoch's line. */
  private async resumedFinalMetrics(runDir: string | null): Promise<EpochMetrics | undefined> {
    if (!runDir) return undefined;
    const lines = await readMetrics(runDir);
    return lines.filter((l): l is EpochMetrics => l.kind === 'epoch').pop();
  }
}

/**
 * After a resume from epoch E, metrics.jsonl keeps only lines of epochs <= E: the lines of an
 * epoch that was cut short (and any half-written last line) would otherwise appear twice.
 */
async function trimMetrics(runDir: string, epoch: number): Promise<void> {
  const file = path.join(runDir, 'metrics.jsonl');
  let text: string;
  try {
    text = await fs.readFile(file, 'utf8');
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return;
    throw err;
  }
  const keep = text.split('\n').filter((l) => {
    try {
      return (JSON.parse(l) as { epoch?: number }).epoch! <= epoch;
    } catch {
      return false;
    }
  });
  await writeFileAtomic(file, keep.map((l) => `${l}\n`).join(''));
}

/** Parses metrics.jsonl (an absent file is empty). */
export async function readMetrics(runDir: string): Promise<Array<EpochMetrics | StepMetrics>> {
  let text: string;
  try {
    text = await fs.readFile(path.join(runDir, 'metrics.jsonl'), 'utf8');
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return [];
    throw err;
  }
  return text
    .split('\n')
    .filter((l) => l.trim() !== '')
    .map((l) => JSON.parse(l) as EpochMetrics | StepMetrics);
}
