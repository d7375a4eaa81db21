// Reading a finished (or interrupted) run folder as the trainer writes it: config.json,
// metrics.jsonl (`kind: 'step'` and `kind: 'epoch'` lines), summary.json (only once complete).
import fs from 'node:fs/promises';
import path from 'node:path';
import type { EpochMetrics, StepMetrics, Summary } from '@dtrain/worker';

/** A run folder that cannot be read as one; the message names the folder and the file. */
export class RunFolderError extends Error {
  readonly code = 'E_RUN_FOLDER' as const;
  constructor(
    readonly dir: string,
    message: string,
  ) {
    super(`${dir}: ${message}`);
    this.name = 'RunFolderError';
  }
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

/**
 * summary.json as read back. A NaN the trainer wrote (finalTestAcc of a run without a finished
 * epoch) reads back as null.
 */
export type RunSummary = Summary;

/**
 * What became of a run: summary.json's status; without summary.json it is still running, or was
 * killed or crashed before the end ('incomplete').
 */
export type RunStatus = RunSummary['status'] | 'incomplete';

export interface RunFiles {
  dir: string;
  name: string;
  config: RunConfig;
  epochs: EpochMetrics[];
  steps: StepMetrics[];
  summary: RunSummary | null;
  /** metrics.jsonl lines that did not parse (a half-written last line after a crash). */
  badLines: number;
}

async function readText(file: string): Promise<string | null> {
  try {
    return await fs.readFile(file, 'utf8');
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return null;
    throw err;
  }
}

export async function readRun(dir: string): Promise<RunFiles> {
  const abs = path.resolve(dir);
  const st = await fs.stat(abs).catch(() => null);
  if (!st?.isDirectory()) throw new RunFolderError(dir, 'no such folder; give a run folder such as runs/<name> (pnpm cli runs lists them)');
  const configText = await readText(path.join(abs, 'config.json'));
  if (configText === null) throw new RunFolderError(dir, 'has no config.json, so it is not a run folder (pnpm cli runs lists them)');
  let config: RunConfig;
  try {
    config = JSON.parse(configText) as RunConfig;
  } catch (err) {
    throw new RunFolderError(dir, `config.json is not JSON (${(err as Error).message})`);
  }
  if (typeof config?.settings?.dataset !== 'string') throw new RunFolderError(dir, 'config.json has no settings.dataset; was it written by dtrain train?');

  const epochs: EpochMetrics[] = [];
  const steps: StepMetrics[] = [];
  let badLines = 0;
  for (const line of (await readText(path.join(abs, 'metrics.jsonl')) ?? '').split('\n')) {
    if (line.trim() === '') continue;
    let v: { kind?: unknown };
    try {
      v = JSON.parse(line) as { kind?: unknown };
    } catch {
      badLines++;
      continue;
    }
    if (v.kind === 'epoch') epochs.push(v as EpochMetrics);
    else if (v.kind === 'step') steps.push(v as StepMetrics);
  }
  const summaryText = await readText(path.join(abs, 'summary.json'));
  let summary: RunSummary | null = null;
  if (summaryText !== null) {
    try {
      summary = JSON.parse(summaryText) as RunSummary;
    } catch {
      summary = null;
    }
  }
  return { dir: abs, name: path.basename(abs), config, epochs, steps, summary, badLines };
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
    if ((await fs.stat(path.join(d, 'config.json')).catch(() => null))?.isFile()) dirs.push(d);
  }
  return dirs;
}
