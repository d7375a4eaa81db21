// The run folder's format, written down once: what the current rank 0 of a run writes there
// (config.json, metrics.jsonl, summary.json; the checkpoints are checkpoint.ts's) and how it is
// read back, by the trainer on a resume, by the CLI's `runs` and `report`, by the benchmarks.
//
//   config.json    the run's settings, model, data and host (the trainer decides the fields);
//                  createdAt of the first start and one `resumes` entry per --resume, kept here
//   metrics.jsonl  one JSON object a line, appended as training goes: `kind: 'step'` lines every
//                  --log-every steps, `kind: 'epoch'` lines after each epoch's evaluation
//   summary.json   written atomically once the run ended: completed, stopped or diverged
//
// metrics.jsonl is appended to, not rewritten: a crash can leave a half-written last line.
// Readers that show a run skip such lines and count them; a resume removes them (trimMetrics).
import fs from 'node:fs/promises';
import path from 'node:path';
import { RunFolderError } from './errors.js';
import { writeFileAtomic } from './files.js';

export const CONFIG_FILE = 'config.json';
export const METRICS_FILE = 'metrics.jsonl';
export const SUMMARY_FILE = 'summary.json';

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

/** A `kind: 'step'` line of metrics.jsonl: the group's loss, accuracy and images over the last `steps` steps, rank 0's phase seconds. */
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

export type MetricsLine = StepMetrics | EpochMetrics;

/** summary.json. */
export interface Summary {
  /**
   * 'stopped': an elastic run fell below --min-workers; it wrote a checkpoint of its position.
   * 'diverged': the loss stopped being finite (the run ended with TrainingDivergedError).
   */
  status: 'completed' | 'stopped' | 'diverged';
  /** Why a stopped or diverged run ended (the regroup's reason, the divergence's message). */
  stopReason?: string;
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
  /** The checkpoint of `bestEpoch` (best.ckpt in the run folder), if this run folder has one. */
  bestCheckpoint?: string | null;
  resumed: boolean;
}

/** The parts of config.json the report and the run list use. */
export interface RunConfig {
  /** `logEverySteps`: steps per `kind: 'step'` line of metrics.jsonl (absent in configs of older runs). */
  settings: { dataset: string; epochs: number; batchSize: number; lr: number; imageSize: number; backend?: string; engine?: string; labelSmoothing?: number; accumulate?: number; logEverySteps?: number };
  worldSize: number;
  globalBatch: number;
  createdAt?: string;
  versions?: Record<string, string>;
  host?: { hostname?: string };
}

/** One entry of config.json's `resumes`: when a --resume started, from which checkpoint, with what. */
export interface ResumeRecord {
  at: string;
  fromCheckpoint: string;
  fromEpoch: number;
  /** A mid-epoch checkpoint's positions of the epoch's order done. */
  fromDone?: number;
  worldSize: number;
  epochs: number;
}

/**
 * What became of a run: summary.json's status; without summary.json it is still running, or was
 * killed or crashed before the end ('incomplete').
 */
export type RunStatus = Summary['status'] | 'incomplete';

/** A run folder as read back. */
export interface RunFiles {
  dir: string;
  name: string;
  config: RunConfig;
  epochs: EpochMetrics[];
  steps: StepMetrics[];
  /** Null until the run ended. A NaN the trainer wrote (finalTestAcc of a run without a finished epoch) reads back as null. */
  summary: Summary | null;
  /** metrics.jsonl lines that did not parse (a half-written last line after a crash). */
  badLines: number;
}

// ---- writing (the current rank 0 only) -----------------------------------------------------

/**
 * config.json: `fields` (what the trainer records of the run), then when the run was first
 * created and every resume so far. A resume keeps the previous createdAt and adds `resume`.
 */
export async function writeConfig(runDir: string, fields: Record<string, unknown>, resume: ResumeRecord | undefined): Promise<void> {
  const file = path.join(runDir, CONFIG_FILE);
  let previous: { createdAt?: string; resumes?: unknown[] } = {};
  if (resume) previous = JSON.parse(await fs.readFile(file, 'utf8').catch(() => '{}')) as typeof previous;
  const config = {
    ...fields,
    createdAt: previous.createdAt ?? new Date().toISOString(),
    resumes: [...(previous.resumes ?? []), ...(resume ? [resume] : [])],
  };
  await writeFileAtomic(file, `${JSON.stringify(config, null, 2)}\n`);
}

/** One line at the end of metrics.jsonl (appended, not atomic: see the header). */
export async function appendMetrics(runDir: string, line: MetricsLine): Promise<void> {
  await fs.appendFile(path.join(runDir, METRICS_FILE), `${JSON.stringify(line)}\n`);
}

export async function writeSummary(runDir: string, summary: Summary): Promise<void> {
  await writeFileAtomic(path.join(runDir, SUMMARY_FILE), `${JSON.stringify(summary, null, 2)}\n`);
}

/**
 * After a resume from epoch E, metrics.jsonl keeps only lines of epochs <= E: the lines of an
 * epoch that was cut short (and any half-written last line) would otherwise appear twice. From a
 * mid-epoch checkpoint at step S, the step lines of epoch E+1 up to S stay too.
 */
export async function trimMetrics(runDir: string, epoch: number, midEpochStep: number | null): Promise<void> {
  const file = path.join(runDir, METRICS_FILE);
  const text = await readIfPresent(file);
  if (text === null) return;
  const keep = text.split('\n').filter((l) => {
    try {
      const x = JSON.parse(l) as { kind?: string; epoch?: number; step?: number };
      if (x.epoch! <= epoch) return true;
      return midEpochStep !== null && x.kind === 'step' && x.epoch === epoch + 1 && x.step! <= midEpochStep;
    } catch {
      return false;
    }
  });
  await writeFileAtomic(file, keep.map((l) => `${l}\n`).join(''));
}

// ---- reading -------------------------------------------------------------------------------

/** The file's text, or null if it does not exist. */
async function readIfPresent(file: string): Promise<string | null> {
  try {
    return await fs.readFile(file, 'utf8');
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return null;
    throw err;
  }
}

/** metrics.jsonl's non-empty lines, parsed; `bad` holds the errors of those that are not JSON. */
function parseMetrics(text: string): { lines: MetricsLine[]; bad: unknown[] } {
  const lines: MetricsLine[] = [];
  const bad: unknown[] = [];
  for (const l of text.split('\n')) {
    if (l.trim() === '') continue;
    try {
      lines.push(JSON.parse(l) as MetricsLine);
    } catch (err) {
      bad.push(err);
    }
  }
  return { lines, bad };
}

/**
 * Parses metrics.jsonl (an absent file is empty). Strict: a line that is not JSON throws (readRun
 * is the tolerant reader, for showing runs that may have crashed).
 */
export async function readMetrics(runDir: string): Promise<MetricsLine[]> {
  const { lines, bad } = parseMetrics((await readIfPresent(path.join(runDir, METRICS_FILE))) ?? '');
  if (bad.length > 0) throw bad[0];
  return lines;
}

/** config.json, checked to be a run's: the CLI shows runs by their settings. */
async function readRunConfig(dir: string, abs: string): Promise<RunConfig> {
  const configText = await readIfPresent(path.join(abs, CONFIG_FILE));
  if (configText === null) throw new RunFolderError(dir, 'has no config.json, so it is not a run folder (pnpm cli runs lists them)');
  let config: RunConfig;
  try {
    config = JSON.parse(configText) as RunConfig;
  } catch (err) {
    throw new RunFolderError(dir, `config.json is not JSON (${(err as Error).message})`);
  }
  if (typeof config?.settings?.dataset !== 'string') throw new RunFolderError(dir, 'config.json has no settings.dataset; was it written by dtrain train?');
  return config;
}

/** A finished or interrupted run folder, as much as there is of it (see RunFiles). */
export async function readRun(dir: string): Promise<RunFiles> {
  const abs = path.resolve(dir);
  const st = await fs.stat(abs).catch(() => null);
  if (!st?.isDirectory()) throw new RunFolderError(dir, 'no such folder; give a run folder such as runs/<name> (pnpm cli runs lists them)');
  const config = await readRunConfig(dir, abs);
  const { lines, bad } = parseMetrics((await readIfPresent(path.join(abs, METRICS_FILE))) ?? '');
  const epochs = lines.filter((l): l is EpochMetrics => l.kind === 'epoch');
  const steps = lines.filter((l): l is StepMetrics => l.kind === 'step');
  const summaryText = await readIfPresent(path.join(abs, SUMMARY_FILE));
  let summary: Summary | null = null;
  if (summaryText !== null) {
    try {
      summary = JSON.parse(summaryText) as Summary;
    } catch {
      summary = null;
    }
  }
  return { dir: abs, name: path.basename(abs), config, epochs, steps, summary, badLines: bad.length };
}

export function runStatus(r: RunFiles): RunStatus {
  return r.summary?.status ?? 'incomplete';
}

/** Every run folder (one with a config.json) directly under `root`, oldest first. */
export async function listRunDirs(root: string): Promise<string[]> {
  let names: string[];
  try {
    names = await fs.readdir(root);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return [];
    throw err;
  }
  const dirs: string[] = [];
  for (const n of names.sort()) {
    const d = path.join(root, n);
    if ((await fs.stat(path.join(d, CONFIG_FILE)).catch(() => null))?.isFile()) dirs.push(d);
  }
  return dirs;
}
