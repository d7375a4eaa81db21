// `report` and `runs` on run folders written in the trainer's format.
import { execFile } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { readRun } from '@dtrain/worker';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { buildCharts, phaseBreakdown, runFacts, writeReport } from './report.js';
import { collectRuns, formatRunTable } from './commands/runs.js';
import { writeRunFixture } from './testing/run-fixture.js';

const main = path.join(path.dirname(fileURLToPath(import.meta.url)), 'main.ts');

function cli(...args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    execFile(process.execPath, ['--import', 'tsx', main, ...args], { timeout: 120_000 }, (err, stdout, stderr) => {
      resolve({ code: err ? (typeof err.code === 'number' ? err.code : 1) : 0, stdout, stderr });
    });
  });
}

/** Width and height from a PNG's IHDR, after checking the signature. */
function pngSize(buf: Buffer): { width: number; height: number } {
  expect(buf.subarray(0, 8).equals(Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]))).toBe(true);
  expect(buf.toString('latin1', 12, 16)).toBe('IHDR');
  return { width: buf.readUInt32BE(16), height: buf.readUInt32BE(20) };
}

let root = '';
let fixture: ReturnType<typeof writeRunFixture>;
beforeAll(() => {
  root = fs.mkdtempSync(path.join(os.tmpdir(), 'dtrain-report-'));
  fixture = writeRunFixture(path.join(root, 'runs', '20250304-050607-fashion-mnist-aaaaaa'), { epochs: 4 });
  writeRunFixture(path.join(root, 'runs', '20250305-101010-cifar10-bbbbbb'), { epochs: 20, finished: 2, worldSize: 4, dataset: 'cifar10', createdAt: '2025-03-05T10:10:10.000Z' });
  fs.mkdirSync(path.join(root, 'runs', 'not-a-run'));
  fs.mkdirSync(path.join(root, 'runs', 'zz-broken'));
  fs.writeFileSync(path.join(root, 'runs', 'zz-broken', 'config.json'), '{"settings": ');
});
afterAll(() => fs.rmSync(root, { recursive: true, force: true }));

describe('report', () => {
  it('reads the run folder as the trainer writes it', async () => {
    const run = await readRun(path.join(root, 'runs', '20250304-050607-fashion-mnist-aaaaaa'));
    expect(run.epochs.map((e) => e.epoch)).toEqual([1, 2, 3, 4]);
    expect(run.steps.length).toBe(fixture.steps.length);
    expect(run.steps.length).toBeGreaterThan(10);
    expect(run.summary?.finalTestAcc).toBe(fixture.epochs[3].testAcc);
  });

  it('the phase breakdown is seconds per step of each epoch', async () => {
    const run = await readRun(path.join(root, 'runs', '20250304-050607-fashion-mnist-aaaaaa'));
    const rows = phaseBreakdown(run);
    expect(rows).toHaveLength(4);
    const steps = fixture.epochs[0].step; // 3000 images / 2 workers / batch 64 = 24 steps
    expect(steps).toBe(24);
    expect(rows[0].perStep.compute).toBeCloseTo(0.89, 3);
    expect(rows[1].perStep.allReduce).toBeCloseTo(fixture.epochs[1].phaseSec.allReduce / 24, 6);
    const sum = Object.values(rows[2].perStep).reduce((a, b) => a + b, 0);
    expect(sum).toBeCloseTo(fixture.epochs[2].trainSec / 24, 2);
  });

  it('writes a PNG of the four charts and a self-contained HTML page', async () => {
    const dir = path.join(root, 'runs', '20250304-050607-fashion-mnist-aaaaaa');
    const png = path.join(root, 'r.png');
    const html = path.join(root, 'r.html');
    await writeReport(dir, { png, html });
    const buf = fs.readFileSync(png);
    expect(pngSize(buf)).toEqual({ width: 1400, height: 896 });
    expect(buf.length).toBeGreaterThan(30_000); // four charts with text, not a blank page
    const page = fs.readFileSync(html, 'utf8');
    expect(page.match(/<svg /g)?.length).toBe(4);
    for (const id of ['loss', 'accuracy', 'throughput', 'phases']) expect(page).toContain(`<figure id="${id}"`);
    expect(page).not.toMatch(/<script|<link|<img|src="|href="http|url\(http/i);
    expect(page).toContain(`${(fixture.epochs[3].testAcc * 100).toFixed(2)}%`);
    expect(page.match(/<tr><td>/g)?.length).toBe(4);
    expect(fs.readdirSync(root).filter((n) => n.includes('.tmp-'))).toEqual([]);
  });

  it('plots an interrupted run (no summary, steps only in its last epoch)', async () => {
    const dir = path.join(root, 'partial');
    writeRunFixture(dir, { epochs: 3, finished: 0 });
    fs.rmSync(path.join(dir, 'metrics.jsonl'));
    await expect(readRun(dir).then(buildCharts)).rejects.toThrow(/no step or epoch lines yet/);
    fs.writeFileSync(path.join(dir, 'metrics.jsonl'), `${JSON.stringify({ kind: 'step', epoch: 1, step: 5, steps: 5, loss: 2.2, trainAcc: 0.2, images: 320, imagesPerSec: 50, phaseSec: { data: 0.1, compute: 4, allReduce: 1, optimizer: 0.2 }, time: '2025-03-04T05:07:07.000Z' })}\n{"kind": "ep`);
    const run = await readRun(dir);
    expect(run.badLines).toBe(1);
    expect(buildCharts(run)).toHaveLength(4);
    expect(phaseBreakdown(run)[0].perStep.compute).toBeCloseTo(0.8, 9);
  });

  it('CLI: report writes both files; a folder that is not a run is one clear line, exit 2', async () => {
    const dir = path.join(root, 'runs', '20250305-101010-cifar10-bbbbbb');
    const r = await cli('report', dir);
    expect(r.stderr).toBe('');
    expect(r.code).toBe(0);
    expect(r.stdout).toContain('cifar10, 4 workers (incomplete: 2 of 20 epochs)');
    expect(pngSize(fs.readFileSync(path.join(dir, 'report.png'))).width).toBe(1400);
    expect(fs.readFileSync(path.join(dir, 'report.html'), 'utf8')).toContain('<!doctype html>');
    const bad = await cli('report', path.join(root, 'runs', 'not-a-run'), '--png', path.join(root, 'x.png'));
    expect(bad.code).toBe(2);
    expect(bad.stderr.trim().split('\n')).toHaveLength(1);
    expect(bad.stderr).toMatch(/not-a-run: has no config\.json/);
  });
});

describe('runs', () => {
  it('lists the runs oldest first with date, dataset, world size, epochs, accuracy, duration', async () => {
    const { rows, problems } = await collectRuns(path.join(root, 'runs'));
    expect(rows.map((r) => r.run)).toEqual(['20250304-050607-fashion-mnist-aaaaaa', '20250305-101010-cifar10-bbbbbb']);
    expect(rows[0]).toMatchObject({ dataset: 'fashion-mnist', worldSize: 2, epochsDone: 4, epochs: 4, status: 'completed', date: '2025-03-04T05:06:07.000Z' });
    expect(rows[0].finalTestAcc).toBe(fixture.summary!.finalTestAcc);
    expect(rows[0].durationSec).toBe(fixture.summary!.totalSec);
    expect(rows[1]).toMatchObject({ dataset: 'cifar10', worldSize: 4, epochsDone: 2, epochs: 20, status: 'incomplete' });
    expect(problems).toHaveLength(1);
    expect(problems[0]).toMatch(/zz-broken: config\.json is not JSON/);
    const table = formatRunTable(rows).split('\n');
    expect(table[0]).toMatch(/^run\s+date\s+dataset\s+world\s+epochs\s+test acc\s+duration\s+status$/);
    expect(table[1]).toContain('2025-03-04 05:06');
    expect(table[1]).toContain(`${(fixture.summary!.finalTestAcc * 100).toFixed(2)}%`);
    expect(table[2]).toMatch(/cifar10\s+4\s+2\/20/);
  });

  it('lists a diverged run (summary.json status diverged) as diverged, with its last finished epoch', async () => {
    const dir = path.join(root, 'diverged', '20250306-070809-fashion-mnist-cccccc');
    const { epochs } = writeRunFixture(dir, { epochs: 4, finished: 2 });
    const last = epochs[1];
    const stopReason = 'the loss became NaN at step 30 (epoch 3) on rank 0; training diverged, try a smaller --lr';
    // The finished-epoch figures of the summary the trainer writes; NaN (none finished) reads back as null.
    const summary = { status: 'diverged', stopReason, dataset: 'fashion-mnist', epochs: 4, steps: 30, finalTrainLoss: last.loss, finalTrainAcc: last.trainAcc, finalTestLoss: last.testLoss, finalTestAcc: last.testAcc, bestTestAcc: last.testAcc, bestEpoch: 2, testImages: 1000, totalSec: last.totalElapsedSec, trainSec: null, imagesPerSec: null, worldSize: 2, globalBatch: 128, runDir: dir, lastCheckpoint: null, resumed: false };
    fs.writeFileSync(path.join(dir, 'summary.json'), JSON.stringify(summary));
    const { rows } = await collectRuns(path.join(root, 'diverged'));
    expect(rows[0]).toMatchObject({ epochsDone: 2, epochs: 4, finalTestAcc: last.testAcc, durationSec: last.totalElapsedSec, status: 'diverged' });
    expect(formatRunTable(rows).split('\n')[1]).toMatch(/2\/4\s+\d+\.\d\d%\s+\S+\s+diverged$/);
    const facts = runFacts(await readRun(dir));
    expect(facts.title).toBe('20250306-070809-fashion-mnist-cccccc: fashion-mnist, 2 workers (diverged after 2 of 4 epochs)');
    expect(facts.lines).toContain(`diverged: ${stopReason}`);
    // The summary's nulls (NaN) fall back to the last finished epoch's figures.
    expect(facts.lines[1]).toBe(`test accuracy ${(last.testAcc * 100).toFixed(2)}% (best ${(last.testAcc * 100).toFixed(2)}% at epoch 2), ${last.totalElapsedSec.toFixed(1)} s, ${last.imagesPerSec.toFixed(1)} images/s`);
  });

  it('CLI: runs --dir prints the table, --json the rows; a missing folder has none', async () => {
    const r = await cli('runs', '--dir', path.join(root, 'runs'));
    expect(r.code).toBe(0);
    expect(r.stdout).toContain('20250305-101010-cifar10-bbbbbb');
    expect(r.stderr).toMatch(/skipped .*zz-broken/);
    const j = JSON.parse((await cli('runs', '--dir', path.join(root, 'runs'), '--json')).stdout);
    expect(j).toHaveLength(2);
    expect(await collectRuns(path.join(root, 'nothing-here'))).toEqual({ rows: [], problems: [] });
  });
});
