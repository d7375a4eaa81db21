// `report` and `runs` on run folders the real trainer wrote (report.test.ts uses hand-written
// ones): a 2-epoch Fashion-MNIST run through the `train` command, a 2-worker run of the trainer
// (both ranks in this process) on synthetic data, and a run whose learning rate makes it diverge.
// About 20 s of training on 2 cores.
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { Command } from '@commander-js/extra-typings';
import { makeSyntheticTestDataset } from '@dtrain/data';
import { createInProcessGroup, readRun, runTraining, TrainingDivergedError, type Summary } from '@dtrain/worker';
import { afterAll, beforeAll, describe, expect, it, vi } from 'vitest';
import { registerReport } from './commands/report.js';
import { registerRuns } from './commands/runs.js';
import { registerExport } from './commands/export.js';
import { registerTrain } from './commands/train.js';
import { buildCharts, runFacts, throughputPoints } from './report.js';

/** Runs `dtrain ARGS` in this process and returns what it printed with console.log. */
async function dtrain(...args: string[]): Promise<string[]> {
  const program = new Command().name('dtrain').exitOverride();
  registerTrain(program);
  registerReport(program);
  registerRuns(program);
  registerExport(program);
  const lines: string[] = [];
  const log = vi.spyOn(console, 'log').mockImplementation((...a: unknown[]) => void lines.push(a.join(' ')));
  const err = vi.spyOn(process.stderr, 'write').mockImplementation(() => true);
  try {
    await program.parseAsync(['node', 'dtrain', ...args]);
  } finally {
    log.mockRestore();
    err.mockRestore();
  }
  return lines;
}

const readSummary = (dir: string) => JSON.parse(fs.readFileSync(path.join(dir, 'summary.json'), 'utf8')) as Summary;

let root = '';
let fashion = '';
let twoWorkers = '';
let diverged = '';
let divergedError: unknown;
beforeAll(async () => {
  root = fs.mkdtempSync(path.join(os.tmpdir(), 'dtrain-real-runs-'));
  fashion = path.join(root, 'runs', 'a-fashion-mnist');
  twoWorkers = path.join(root, 'runs', 'b-synthetic-2-workers');
  diverged = path.join(root, 'runs', 'c-diverged');
  // 48 images, batch 16: 3 steps per epoch, no --log-every.
  await dtrain('train', '--dataset', 'fashion-mnist', '--epochs', '2', '--limit-train', '48', '--limit-test', '32', '--image-size', '16', '--batch-size', '16', '--out', fashion);
  const data = {
    name: 'synthetic-test',
    train: makeSyntheticTestDataset({ count: 40, height: 16, width: 16, channels: 3, seed: 11 }),
    test: makeSyntheticTestDataset({ count: 20, height: 16, width: 16, channels: 3, seed: 12 }),
  };
  // 20 images per rank, batch 8: 3 steps.
  await Promise.all(
    createInProcessGroup(2).map((collective) => runTraining({ data, collective, out: twoWorkers, settings: { epochs: 1, batchSize: 8, lr: 0.01, logEverySteps: 1 } })),
  );
  // lr 1e30: the first update makes the weights ~1e29, the next loss overflows float32.
  const [one] = createInProcessGroup(1);
  divergedError = await runTraining({ data, collective: one, out: diverged, settings: { epochs: 2, batchSize: 8, lr: 1e30, logEverySteps: 1 } }).catch((e: unknown) => e);
});
afterAll(() => fs.rmSync(root, { recursive: true, force: true }));

describe('train: step lines of a short run', () => {
  it('without --log-every, a 3-step epoch gets a step line every step (the default, 50, would give none)', async () => {
    const run = await readRun(fashion);
    expect(run.config.settings.logEverySteps).toBe(1);
    expect(run.steps.map((s) => s.step)).toEqual([1, 2, 3, 4, 5, 6]);
    expect(run.epochs.map((e) => e.step)).toEqual([3, 6]);
  });
});

describe('report on a real run', () => {
  it('prints the run and writes the charts with the step lines, named by their interval', async () => {
    const png = path.join(root, 'a.png');
    const html = path.join(root, 'a.html');
    const out = await dtrain('report', fashion, '--png', png, '--html', html);
    const summary = readSummary(fashion);
    expect(out[0]).toBe('a-fashion-mnist: fashion-mnist, 1 worker (completed)');
    expect(out[1]).toMatch(/^ {2}epochs 2, global batch 16, lr 0\.01, image 16px, backend cpu, started \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC$/);
    expect(out[2]).toContain(`test accuracy ${(summary.finalTestAcc * 100).toFixed(2)}% (best ${(summary.bestTestAcc * 100).toFixed(2)}% at epoch ${summary.bestEpoch})`);
    expect(out.slice(3)).toEqual([`wrote ${png}`, `wrote ${html}`]);
    const page = fs.readFileSync(html, 'utf8');
    expect(page.match(/train \(every step\)/g)).toHaveLength(2); // loss and accuracy charts
    expect(page).toContain('>every step<'); // throughput chart
    expect(page).not.toContain('?');
    expect(page.match(/<tr><td>/g)).toHaveLength(2);
    expect(fs.statSync(png).size).toBeGreaterThan(30_000);
  });

  it('a run that wrote no step line says why and what to do, and draws no step series', async () => {
    // What the README's first command (47 steps, a line every 50) wrote before `train` chose the interval.
    const dir = path.join(root, 'no-step-lines');
    fs.cpSync(fashion, dir, { recursive: true });
    const config = JSON.parse(fs.readFileSync(path.join(dir, 'config.json'), 'utf8'));
    config.settings.logEverySteps = 50;
    fs.writeFileSync(path.join(dir, 'config.json'), JSON.stringify(config));
    const metrics = fs.readFileSync(path.join(dir, 'metrics.jsonl'), 'utf8').split('\n');
    fs.writeFileSync(path.join(dir, 'metrics.jsonl'), metrics.filter((l) => !l.includes('"kind":"step"')).join('\n'));
    const run = await readRun(dir);
    expect(run.steps).toEqual([]);
    expect(runFacts(run).lines[2]).toBe(
      'no step lines in metrics.jsonl (one every 50 steps, and the run made 6): the charts show epochs only; train with a smaller --log-every to see the course within an epoch',
    );
    for (const c of buildCharts(run)) {
      expect(c.svg, c.id).not.toContain('?');
      expect(c.svg, c.id).not.toContain('every');
    }
  });

  it('plots every rank’s images per second once: a step line already counts all ranks', async () => {
    const run = await readRun(twoWorkers);
    expect(run.config.worldSize).toBe(2);
    const [epoch] = run.epochs;
    expect(run.steps.map((s) => s.images)).toEqual([16, 16, 8]);
    expect(run.steps.reduce((a, s) => a + s.images, 0)).toBe(epoch.images);
    // The step points, weighted by their images, average to the epoch's figure (times 2 before).
    const { steps } = throughputPoints(run);
    const seconds = steps.reduce((a, [, ips], i) => a + run.steps[i].images / ips, 0);
    expect(epoch.images / seconds / epoch.imagesPerSec).toBeGreaterThan(0.75);
    expect(epoch.images / seconds / epoch.imagesPerSec).toBeLessThan(1.25);
    const facts = runFacts(run);
    expect(facts.title).toBe('b-synthetic-2-workers: synthetic-test, 2 workers (completed)');
    expect(facts.lines).toHaveLength(2);
  });
});

describe('runs on real runs', () => {
  it('lists both with what their summary.json says', async () => {
    const table = (await dtrain('runs', '--dir', path.join(root, 'runs'))).join('\n').split('\n');
    const a = readSummary(fashion);
    const b = readSummary(twoWorkers);
    expect(table[0]).toMatch(/^run\s+date\s+dataset\s+world\s+epochs\s+test acc\s+duration\s+status$/);
    expect(table[1]).toMatch(new RegExp(`^a-fashion-mnist\\s+\\d{4}-\\d\\d-\\d\\d \\d\\d:\\d\\d\\s+fashion-mnist\\s+1\\s+2/2\\s+${(a.finalTestAcc * 100).toFixed(2)}%\\s+\\S+\\s+completed$`));
    expect(table[2]).toMatch(new RegExp(`^b-synthetic-2-workers\\s+.*synthetic-test\\s+2\\s+1/1\\s+${(b.finalTestAcc * 100).toFixed(2)}%\\s+.*completed$`));
    expect(table[3]).toMatch(/^c-diverged\s+.*synthetic-test\s+1\s+0\/2\s+.*diverged$/);
    expect(table).toHaveLength(4);
    const rows = JSON.parse((await dtrain('runs', '--dir', path.join(root, 'runs'), '--json')).join('\n'));
    expect(rows[0]).toEqual({
      run: 'a-fashion-mnist',
      date: JSON.parse(fs.readFileSync(path.join(fashion, 'config.json'), 'utf8')).createdAt,
      dataset: 'fashion-mnist',
      worldSize: 1,
      epochsDone: 2,
      epochs: 2,
      finalTestAcc: a.finalTestAcc,
      durationSec: a.totalSec,
      status: 'completed',
    });
  });
});

describe('a run that diverged', () => {
  it('ends with TrainingDivergedError, and its summary.json says diverged, why, and how far it got', async () => {
    expect(divergedError).toBeInstanceOf(TrainingDivergedError);
    const e = divergedError as TrainingDivergedError;
    expect(e.message).toMatch(/^the loss became (NaN|-?Infinity) at step \d+ \(epoch 1\) on rank 0; training diverged, try a smaller --lr$/);
    const summary = readSummary(diverged);
    expect(summary).toMatchObject({ status: 'diverged', stopReason: e.message, steps: e.step - 1, epochs: 2, worldSize: 1 });
    const facts = runFacts(await readRun(diverged));
    expect(facts.title).toBe('c-diverged: synthetic-test, 1 worker (diverged after 0 of 2 epochs)');
  });
});

describe('export, and a run started from its file', () => {
  it('writes the best checkpoint as the tutorial’s state_dict; train --init takes it', async () => {
    const lines = await dtrain('export', fashion, '--checkpoint', 'best');
    const file = path.join(fashion, 'best.safetensors');
    // 60 parameters and 3 buffers for each of the 17 BatchNorms.
    expect(lines[0]).toBe(`wrote ${file}: ${60 + 3 * 17} tensors, ${(fs.statSync(file).size / 1e6).toFixed(1)} MB, from best.ckpt (epoch ${readSummary(fashion).bestEpoch}, step ${3 * readSummary(fashion).bestEpoch})`);
    const out = path.join(root, 'runs', 'd-from-file');
    await dtrain('train', '--dataset', 'fashion-mnist', '--epochs', '1', '--limit-train', '48', '--limit-test', '32', '--image-size', '16', '--batch-size', '16', '--init', file, '--out', out);
    expect(readSummary(out).status).toBe('completed');
    expect(JSON.parse(fs.readFileSync(path.join(out, 'config.json'), 'utf8')).settings.initFile).toBe(file);
  });
});
