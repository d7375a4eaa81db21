// One training run as the CLI starts it: settings (or a resume), data, run folder, trainer.

import { randomBytes } from 'node:crypto';
import fs from 'node:fs/promises';
import path from 'node:path';
import { loadDataset, takeFirst } from '@dtrain/data';
import { readLatestCheckpoint, type Checkpoint } from './checkpoint.js';
import { SingleProcess, isElastic, type Collective } from './collective.js';
import { RunDirError, TrainSettingsError } from './errors.js';
import { removeStaleTemporaries, type AtomicWriteOptions } from './files.js';
import { CONFIG_FILE, METRICS_FILE } from './run-folder.js';
import { resolveSettings, resumeSettings, type TrainSettings, type TrainSettingsInput } from './settings.js';
import { Trainer, type TrainData, type TrainResult, type TrainerHooks } from './trainer.js';

export interface RunTrainingOptions {
  /** What the user chose; the rest comes from the preset and the defaults (or the checkpoint). */
  settings?: TrainSettingsInput;
  /** Continue the run in this folder from its newest checkpoint. */
  resume?: string;
  /** Run folder (default: a fresh `runs/<date>-<dataset>-<id>` under `cwd`). */
  out?: string;
  /** In-memory data instead of loading `settings.dataset` (tests; data received from a coordinator). */
  data?: TrainData & { name: string };
  collective?: Collective;
  hooks?: TrainerHooks;
  cwd?: string;
  checkpointWrite?: AtomicWriteOptions;
  /** TrainerOptions.bucketBytes: overlap the gradient all-reduce with the backward pass. */
  bucketBytes?: number;
  /** TrainerOptions.localWorkers. */
  localWorkers?: number;
}

export interface RunTrainingResult extends TrainResult {
  /** The run folder if this process ended as rank 0 (the one that writes files), else null. */
  runDir: string | null;
  settings: TrainSettings;
  /** Final replica state, for tests and callers that keep the model. */
  weights: Float32Array;
  bnStats: Float32Array;
  momentum: Float32Array;
}

/** `runs/20250101-120000-fashion-mnist-1a2b3c` style: sortable, and unique without a lock. */
export function defaultRunDir(dataset: string, cwd = process.cwd(), date = new Date()): string {
  const stamp = date.toISOString().replace(/[-:]/g, '').replace('T', '-').slice(0, 15);
  const safe = dataset.replace(/[^A-Za-z0-9_-]+/g, '_').slice(0, 40);
  return path.join(cwd, 'runs', `${stamp}-${safe}-${randomBytes(3).toString('hex')}`);
}

/** Loads the named data set's splits and applies --limit-train / --limit-test. */
export async function loadTrainData(s: TrainSettings): Promise<TrainData> {
  const [train, test] = await Promise.all([
    loadDataset(s.dataset, 'train', { dataDir: s.dataDir ?? undefined }),
    loadDataset(s.dataset, 'test', { dataDir: s.dataDir ?? undefined }),
  ]);
  return { train: s.limitTrain ? takeFirst(train, s.limitTrain) : train, test: s.limitTest ? takeFirst(test, s.limitTest) : test };
}

async function prepareNewRunDir(dir: string): Promise<void> {
  try {
    await fs.mkdir(dir, { recursive: true });
    const existing = (await fs.readdir(dir)).filter((n) => n === CONFIG_FILE || n === METRICS_FILE || n.endsWith('.ckpt'));
    if (existing.length > 0) {
      throw new RunDirError(dir, `it already holds a run (${existing.join(', ')}); continue it with --resume ${dir}, or choose another --out`);
    }
    await fs.access(dir, fs.constants.W_OK);
  } catch (err) {
    if (err instanceof RunDirError) throw err;
    throw new RunDirError(dir, `cannot create or write it (${(err as NodeJS.ErrnoException).code ?? String(err)})`);
  }
}

/** Trains (or resumes) one run to the end and returns its summary and final state. */
export async function runTraining(o: RunTrainingOptions): Promise<RunTrainingResult> {
  const collective = o.collective ?? new SingleProcess();
  // A worker admitted into an elastic run in progress finds the folder prepared (by the rank 0 of
  // the launch) and takes everything from the group, never from a file.
  const joining = isElastic(collective) && collective.initialRoot !== collective.rank;
  const rank0 = collective.rank === 0 && !joining;
  const input = o.settings ?? {};
  const inMemory = o.data ? { name: o.data.name, imageSize: o.data.train.height } : undefined;
  if (o.data && o.data.train.height !== o.data.train.width) throw new TrainSettingsError('dataset', `${o.data.name}: images must be square`);

  let settings: TrainSettings;
  let checkpoint: Checkpoint | undefined;
  let runDir: string;
  if (o.resume) {
    const dir = path.resolve(o.cwd ?? process.cwd(), o.resume);
    if (o.out && path.resolve(o.cwd ?? process.cwd(), o.out) !== dir) {
      throw new TrainSettingsError('out', `--out ${o.out} and --resume ${o.resume} differ: a resumed run continues in its own folder`);
    }
    checkpoint = await readLatestCheckpoint(dir);
    settings = resumeSettings(checkpoint.header.settings, input, checkpoint.file);
    runDir = dir;
    if (rank0) await removeStaleTemporaries(dir);
    if (!rank0) checkpoint = undefined;
  } else {
    settings = resolveSettings(input, inMemory);
    runDir = o.out ? path.resolve(o.cwd ?? process.cwd(), o.out) : defaultRunDir(settings.dataset, o.cwd);
    if (rank0) await prepareNewRunDir(runDir);
  }

  const data = o.data ?? (await loadTrainData(settings));
  const trainer = await Trainer.create({
    settings,
    data,
    collective,
    // Every rank knows the folder; the trainer writes there only while it is rank 0.
    runDir,
    hooks: o.hooks,
    checkpointWrite: o.checkpointWrite,
    bucketBytes: o.bucketBytes,
    localWorkers: o.localWorkers,
  });
  try {
    const result = await trainer.run(checkpoint);
    return {
      ...result,
      runDir: trainer.runDir,
      settings,
      weights: await trainer.model.getWeights(),
      bnStats: await trainer.model.getBatchNormStats(),
      momentum: (await trainer.model.optimizer.getState()).buffers,
    };
  } finally {
    trainer.dispose();
  }
}

