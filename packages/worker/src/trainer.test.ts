// Training tests on synthetic data (NOT REAL DATA: learnable stripe patterns from @dtrain/data).
// Each step of this 11M-parameter model costs ~0.4 s here even at 16x16, so runs are a few dozen
// steps at most.

import fs from 'node:fs/promises';
import path from 'node:path';
import { beforeAll, describe, expect, it } from 'vitest';
import { loadBackend } from '@dtrain/backend';
import { ResNet } from '@dtrain/core';
import { firstDifference } from '@dtrain/core/testing';
import { BatchAssembler } from '@dtrain/data';
import { needsEngine } from '@dtrain/torch-engine/testing';
import { listCheckpoints, readCheckpoint } from './checkpoint.js';
import { createInProcessGroup } from './collective.js';
import { RunDirError, TrainingDivergedError, TrainSettingsError } from './errors.js';
import { runTraining } from './run.js';
import { lrAt } from './schedule.js';
import { syntheticData, tempDir } from './testing/helpers.js';
import { readMetrics, type EpochMetrics, type StepMetrics, type Summary } from './run-folder.js';

beforeAll(async () => {
  await loadBackend('cpu');
});

describe('training on synthetic data', () => {
  it('learns to high test accuracy within a few epochs, and writes config, metrics and summary', async () => {
    const data = syntheticData(320, 200);
    const out = path.join(await tempDir(), 'run');
    const steps: number[] = [];
    const r = await runTraining({
      data,
      out,
      settings: { epochs: 4, batchSize: 32, evalBatchSize: 64, lr: 0.005, momentum: 0.9, seed: 1, logEverySteps: 4 },
      hooks: { onStep: (s) => steps.push(s.step) },
    });
    expect(steps).toEqual(Array.from({ length: 40 }, (_, i) => i + 1));
    const { summary, epochs } = r;
    expect(epochs.map((e) => e.epoch)).toEqual([1, 2, 3, 4]);
    // Chance is 10%; the patterns are learnable to ~100%.
    expect(summary.finalTestAcc).toBeGreaterThanOrEqual(0.9);
    expect(epochs[3].loss).toBeLessThan(epochs[0].loss);
    expect(summary.bestTestAcc).toBe(Math.max(...epochs.map((e) => e.testAcc)));

    const config = JSON.parse(await fs.readFile(path.join(out, 'config.json'), 'utf8'));
    expect(config.settings).toMatchObject({ dataset: 'synthetic-test', epochs: 4, batchSize: 32, lr: 0.005, momentum: 0.9, imageSize: 16, seed: 1, init: 'xavier-uniform' });
    expect(config.seed).toBe(1);
    expect(config.worldSize).toBe(1);
    expect(config.versions.tfjs).toMatch(/^\d+\.\d+\.\d+$/);
    expect(config.versions.tensorflow).toMatch(/^\d+\.\d+/);
    expect(config.versions.node).toBe(process.versions.node);
    expect(config.data.train).toMatchObject({ images: 320, shape: [16, 16, 3] });
    expect(config.model.params).toBe(11_180_810);

    const lines = await readMetrics(out);
    const epochLines = lines.filter((l): l is EpochMetrics => l.kind === 'epoch');
    const stepLines = lines.filter((l): l is StepMetrics => l.kind === 'step');
    expect(epochLines).toEqual(epochs);
    expect(stepLines.map((l) => l.step)).toEqual([4, 8, 12, 16, 20, 24, 28, 32, 36, 40]);
    // The window of a step line restarts with each epoch (10 steps each here).
    expect(stepLines.map((l) => l.steps)).toEqual([4, 4, 2, 4, 4, 4, 4, 2, 4, 4]);
    for (const l of stepLines) expect(l.images).toBe(l.steps * 32);
    for (const e of epochLines) {
      expect(e).toMatchObject({ images: 320, testImages: 200, worldSize: 1, globalBatch: 32 });
      expect(e.imagesPerSec).toBeCloseTo(320 / e.trainSec, 0);
      const shares = e.phaseShare;
      expect(shares.data + shares.compute + shares.allReduce + shares.optimizer + shares.other).toBeCloseTo(1, 2);
      expect(shares.compute).toBeGreaterThan(0.3);
    }
    const summaryFile = JSON.parse(await fs.readFile(path.join(out, 'summary.json'), 'utf8')) as Summary;
    expect(summaryFile).toEqual(summary);
    expect(summaryFile).toMatchObject({ status: 'completed', epochs: 4, steps: 40, finalTestAcc: epochs[3].testAcc, finalTrainAcc: epochs[3].trainAcc, runDir: out, resumed: false });
    expect(summaryFile.totalSec).toBeGreaterThanOrEqual(summaryFile.trainSec);
    // Keep the newest 2 checkpoints (the default).
    expect((await listCheckpoints(out)).map((c) => c.epoch)).toEqual([3, 4]);
    const ck = await readCheckpoint(path.join(out, 'checkpoint-e0004.ckpt'));
    expect(firstDifference(ck.weights, r.weights)).toBe(-1);
    expect(firstDifference(ck.momentum, r.momentum)).toBe(-1);
    expect(ck.header).toMatchObject({ epoch: 4, step: 40, optimizer: { steps: 40, momentum: 0.9 }, sampler: { nextEpoch: 4, seed: 1 } });
    expect(ck.header.history.testAcc).toEqual(epochs.map((e) => e.testAcc));
    // The best epoch's checkpoint stays as best.ckpt whatever the rotation did.
    const best = await readCheckpoint(path.join(out, 'best.ckpt'));
    expect(summary.bestCheckpoint).toBe(path.join(out, 'best.ckpt'));
    expect(best.header.epoch).toBe(summary.bestEpoch);
    expect(best.header.history.testAcc.at(-1)).toBe(summary.bestTestAcc);
  });

  it('same seed and settings give identical weights; another seed does not', async () => {
    const data = syntheticData(64, 20);
    const settings = { epochs: 1, batchSize: 16, lr: 0.01, momentum: 0.9, augment: true };
    const dir = await tempDir();
    const a = await runTraining({ data, out: path.join(dir, 'a'), settings: { ...settings, seed: 7 } });
    const b = await runTraining({ data, out: path.join(dir, 'b'), settings: { ...settings, seed: 7 } });
    const c = await runTraining({ data, out: path.join(dir, 'c'), settings: { ...settings, seed: 8 } });
    expect(firstDifference(a.weights, b.weights)).toBe(-1);
    expect(firstDifference(a.bnStats, b.bnStats)).toBe(-1);
    expect(firstDifference(a.momentum, b.momentum)).toBe(-1);
    expect(a.epochs[0].loss).toBe(b.epochs[0].loss);
    expect(firstDifference(a.weights, c.weights)).not.toBe(-1);
  });

  it('resuming after epoch 1 reproduces the uninterrupted run bitwise (momentum, augmentation)', async () => {
    const data = syntheticData(48, 20);
    const settings = { epochs: 2, batchSize: 16, lr: 0.01, momentum: 0.9, weightDecay: 1e-4, augment: true, seed: 3, logEverySteps: 2 };
    const dir = await tempDir();
    const full = await runTraining({ data, out: path.join(dir, 'full'), settings });

    const cut = path.join(dir, 'cut');
    const first = await runTraining({ data, out: cut, settings: { ...settings, epochs: 1 } });
    expect(firstDifference(first.weights, full.weights)).not.toBe(-1);
    // A crash mid-epoch 2 leaves a step line and a temporary behind; the resume cleans both up.
    await fs.appendFile(path.join(cut, 'metrics.jsonl'), '{"kind":"step","epoch":2,"step":4}\n{"kind":"ep');
    await fs.writeFile(path.join(cut, 'checkpoint-e0002.ckpt.tmp-1-dead'), 'partial');
    const started: number[] = [];
    const resumed = await runTraining({ data, resume: cut, settings: { epochs: 2 }, hooks: { onEpochStart: (e) => started.push(e) } });
    expect(started).toEqual([2]);

    expect(firstDifference(resumed.weights, full.weights)).toBe(-1);
    expect(firstDifference(resumed.bnStats, full.bnStats)).toBe(-1);
    expect(firstDifference(resumed.momentum, full.momentum)).toBe(-1);
    expect(resumed.epochs[0]).toMatchObject({ epoch: 2, step: 6, loss: full.epochs[1].loss, testAcc: full.epochs[1].testAcc });
    expect(resumed.summary).toMatchObject({ resumed: true, steps: 6, bestTestAcc: full.summary.bestTestAcc, finalTestAcc: full.summary.finalTestAcc });

    const lines = await readMetrics(cut);
    const strip = (l: { kind: string; epoch: number; step: number }) => `${l.kind}:${l.epoch}:${l.step}`;
    expect(lines.map(strip)).toEqual((await readMetrics(path.join(dir, 'full'))).map(strip));
    expect((await fs.readdir(cut)).filter((n) => n.includes('.tmp-'))).toEqual([]);
    const config = JSON.parse(await fs.readFile(path.join(cut, 'config.json'), 'utf8'));
    expect(config.resumes).toHaveLength(1);
    expect(config.resumes[0]).toMatchObject({ fromEpoch: 1, fromCheckpoint: 'checkpoint-e0001.ckpt' });

    // Resuming is not a way to change the run's trajectory.
    await expect(runTraining({ data, resume: cut, settings: { epochs: 3, lr: 0.1 } })).rejects.toThrow(TrainSettingsError);
  });

  it('--accumulate 2: each step is the images-weighted mean of its micro-batch gradients, against the model driven by hand', async () => {
    // 40 images, batch 8 x 2 micro-batches: steps of 16, 16 and 8 images (the last has one).
    const data = syntheticData(40, 8);
    const settings = { epochs: 1, batchSize: 8, accumulate: 2, lr: 0.02, momentum: 0.9, seed: 4 };
    const steps: Int32Array[] = [];
    const run = await runTraining({ data, settings, hooks: { onStep: (st) => steps.push(st.indices) } });
    expect(steps.map((x) => x.length)).toEqual([16, 16, 8]);
    expect(run.summary).toMatchObject({ globalBatch: 16, steps: 3 });
    // The naive reference: the same model, micro-batch by micro-batch, summed in float64.
    const config = { inChannels: data.train.channels, classes: data.train.classNames.length, imageSize: 16 };
    const model = new ResNet(config, { seed: 4, sgd: { lr: 0.02, momentum: 0.9 } });
    const assembler = new BatchAssembler(data.train, { height: 16, width: 16 });
    for (const idx of steps) {
      const sum = new Float64Array(model.paramCount);
      for (let from = 0; from < idx.length; from += 8) {
        const b = assembler.assemble(data.train, idx.subarray(from, from + 8));
        const { grads } = await model.computeGradients({ images: b.x, labels: b.y, n: b.n });
        for (let k = 0; k < sum.length; k++) sum[k] += grads[k] * b.n;
      }
      model.applyGradients(Float32Array.from(sum, (v) => v / idx.length));
    }
    // Same operations in the same order: the same floats.
    expect(firstDifference(run.weights, await model.getWeights())).toBe(-1);
    expect(firstDifference(run.bnStats, await model.getBatchNormStats())).toBe(-1);
    model.dispose();
    // Not the run of one micro-batch per step: accumulation changed the trajectory.
    const plain = await runTraining({ data, settings: { ...settings, accumulate: 1 } });
    expect(firstDifference(plain.weights, run.weights)).not.toBe(-1);
  });

  it('refuses to start a new run in a folder that already holds one', async () => {
    const dir = await tempDir();
    await fs.writeFile(path.join(dir, 'config.json'), '{}');
    await expect(runTraining({ data: syntheticData(16, 4), out: dir, settings: { epochs: 1 } })).rejects.toThrow(RunDirError);
    await expect(runTraining({ data: syntheticData(16, 4), out: dir, settings: { epochs: 1 } })).rejects.toThrow(/--resume/);
  });
});

describe('two replicas in one process (the seam of the distributed workers)', () => {
  // 40 train images, 20 per rank: batch 8 gives steps of 8, 8, 4; 2 micro-batches of 8, steps of 16 and 4.
  for (const [accumulate, steps] of [[1, 3], [2, 2]]) {
    it(`stay bitwise identical, count every test image once, and only rank 0 writes files (${accumulate} micro-batch${accumulate > 1 ? 'es' : ''} a step)`, async () => {
      const data = syntheticData(40, 25);
      const dir = await tempDir();
      const group = createInProcessGroup(2);
      const outs = [path.join(dir, 'r0'), path.join(dir, 'r1')];
      const evals: number[][] = [[], []];
      const results = await Promise.all(
        group.map((collective, rank) =>
          runTraining({
            data,
            collective,
            out: outs[rank],
            settings: { epochs: 1, batchSize: 8, accumulate, lr: 0.01, momentum: 0.9, augment: true, seed: 4 },
            hooks: { onEpochEnd: (m) => evals[rank].push(m.testImages, m.images) },
          }),
        ),
      );
      expect(firstDifference(results[0].weights, results[1].weights)).toBe(-1);
      expect(firstDifference(results[0].bnStats, results[1].bnStats)).toBe(-1);
      expect(firstDifference(results[0].momentum, results[1].momentum)).toBe(-1);
      // 25 test images over 2 ranks (13 + 12): all of them, once; 40 train images, 20 per rank.
      expect(evals).toEqual([[25, 40], [25, 40]]);
      expect(results[0].summary).toMatchObject({ worldSize: 2, globalBatch: 16 * accumulate, steps, testImages: 25 });
      expect(results[0].epochs[0].testAcc).toBe(results[1].epochs[0].testAcc);
      expect(results[1].runDir).toBeNull();
      await expect(fs.access(outs[1])).rejects.toThrow();
      const config = JSON.parse(await fs.readFile(path.join(outs[0], 'config.json'), 'utf8'));
      expect(config).toMatchObject({ worldSize: 2, globalBatch: 16 * accumulate });
    });
  }

  it('all-reducing the gradient in buckets during the backward pass reaches the same weights as one all-reduce after it', async () => {
    const data = syntheticData(32, 8);
    const dir = await tempDir();
    const run = (bucketBytes: number | undefined, name: string) => {
      const readied: number[][] = [[], []];
      const runs = createInProcessGroup(2).map((collective, rank) => {
        // Count the buckets handed over, to see that the staged path ran and offered every one.
        const staged = collective.allReduceMeanStaged!.bind(collective);
        collective.allReduceMeanStaged = (buf, buckets) => {
          const s = staged(buf, buckets);
          return { ready: (i) => (readied[rank].push(i), s.ready(i)), done: s.done };
        };
        return runTraining({ data, collective, out: path.join(dir, `${name}${rank}`), bucketBytes, settings: { epochs: 1, batchSize: 8, lr: 0.05, momentum: 0.9, seed: 6 } });
      });
      return Promise.all(runs).then((results) => ({ results, readied }));
    };
    const one = await run(undefined, 'one');
    const buckets = await run(2 ** 20, 'buckets');
    expect(one.readied).toEqual([[], []]);
    // 2 steps; 11.2M floats in buckets of >= 1 MiB: at least 10 buckets per step, each once.
    const perStep = buckets.readied[0].length / 2;
    expect(perStep).toBeGreaterThanOrEqual(10);
    expect([...buckets.readied[0]].sort((a, b) => a - b)).toEqual([...Array(perStep).keys(), ...Array(perStep).keys()].sort((a, b) => a - b));
    for (const r of [0, 1]) {
      expect(firstDifference(buckets.results[r].weights, one.results[0].weights)).toBe(-1);
      expect(firstDifference(buckets.results[r].momentum, one.results[0].momentum)).toBe(-1);
    }
    expect(buckets.results[0].epochs[0].loss).toBe(one.results[0].epochs[0].loss);
  });

  it('stops with a clear error when replicas are started with different settings', async () => {
    const data = syntheticData(16, 4);
    const dir = await tempDir();
    const group = createInProcessGroup(2);
    const results = await Promise.allSettled(
      group.map((collective, rank) =>
        runTraining({ data, collective, out: path.join(dir, `r${rank}`), settings: { epochs: 1, batchSize: 8, seed: rank } }),
      ),
    );
    expect(results.map((r) => r.status)).toEqual(['rejected', 'rejected']);
    expect(String((results[0] as PromiseRejectedResult).reason)).toMatch(/rank 0: 1 of 2 ranks have settings, model, data sizes or world size that differ from rank 0's/);
    expect(String((results[1] as PromiseRejectedResult).reason)).toMatch(/rank 1: its settings, model, data sizes or world size differ from rank 0's .*"seed":1/);
  });
});

describe('learning-rate scaling with warmup (two replicas in one process)', () => {
  it('every rank applies the same per-step lr; a resume continues the schedule bitwise', async () => {
    // 32 images, 2 ranks x batch 8: 2 steps per epoch. lr 0.01 -> 0.02 over 2 epochs:
    // 0.01 + 0.01 * (epoch + k/2) / 2 = 0.01, 0.0125 | 0.015, 0.0175.
    const data = syntheticData(32, 8);
    const settings = { epochs: 2, batchSize: 8, lr: 0.01, lrScaling: 'linear' as const, warmupEpochs: 2, momentum: 0.9, seed: 5 };
    const want = [0.01, 0.0125, 0.015, 0.0175];
    const dir = await tempDir();
    const pair = async (out: string, extra: { resume?: string; epochs?: number }, lrs: number[][]) =>
      Promise.all(
        createInProcessGroup(2).map((collective, rank) =>
          runTraining({
            data,
            collective,
            ...(extra.resume ? { resume: extra.resume, settings: { epochs: extra.epochs } } : { out, settings: { ...settings, epochs: extra.epochs ?? 2 } }),
            hooks: { onStep: (s) => lrs[rank].push(s.lr) },
          }),
        ),
      );
    const fullLrs: number[][] = [[], []];
    const full = await pair(path.join(dir, 'full'), {}, fullLrs);
    for (const l of fullLrs) l.forEach((v, i) => expect(v, `step ${i + 1}`).toBeCloseTo(want[i], 12));
    expect(fullLrs[1]).toEqual(fullLrs[0]);
    expect(firstDifference(full[0].weights, full[1].weights)).toBe(-1);
    expect(full[0].epochs.map((e) => [e.lrFirst, e.lr])).toEqual([fullLrs[0].slice(0, 2), fullLrs[0].slice(2, 4)]);
    // The optimiser itself ran with the scheduled rate (Sgd.lr, as the checkpoint records it).
    const ck = await readCheckpoint(path.join(dir, 'full', 'checkpoint-e0002.ckpt'));
    expect(ck.header.optimizer.lr).toBe(fullLrs[0][3]);
    const config = JSON.parse(await fs.readFile(path.join(dir, 'full', 'config.json'), 'utf8'));
    expect(config.settings).toMatchObject({ lrScaling: 'linear', warmupEpochs: 2 });
    expect(config.optimizer.lrSchedule).toMatchObject({ scaling: 'linear', warmupEpochs: 2, baseLr: 0.01, peakLr: 0.02 });

    const cut = path.join(dir, 'cut');
    const cutLrs: number[][] = [[], []];
    await pair(cut, { epochs: 1 }, cutLrs);
    await pair(cut, { resume: cut, epochs: 2 }, cutLrs);
    expect(cutLrs[0]).toEqual(fullLrs[0]);
    const resumed = (await readMetrics(cut)).filter((l): l is EpochMetrics => l.kind === 'epoch');
    expect(resumed.map((e) => e.lr)).toEqual(full[0].epochs.map((e) => e.lr));
    const last = await readCheckpoint(path.join(cut, 'checkpoint-e0002.ckpt'));
    expect(firstDifference(last.weights, full[0].weights)).toBe(-1);
    expect(firstDifference(last.momentum, full[0].momentum)).toBe(-1);
  });
});

describe('learning-rate schedules in the trainer', () => {
  it('cosine: each step runs at lrAt of its position; a resume from the epoch-1 checkpoint continues it bitwise (with Nesterov, decay of weights only, label smoothing, 2 micro-batches a step)', async () => {
    // 32 images, batch 8 x 2 micro-batches: 2 steps per epoch, 2 epochs; cosine from 0.02 to 0.002.
    const data = syntheticData(32, 8);
    const recipe = { accumulate: 2, nesterov: true, weightDecay: 5e-4, skipNormBiasDecay: true, labelSmoothing: 0.1 };
    const settings = { epochs: 2, batchSize: 8, lr: 0.02, lrSchedule: 'cosine' as const, lrFinal: 0.002, momentum: 0.9, seed: 3, ...recipe };
    const dir = await tempDir();
    const lrs: number[] = [];
    const full = await runTraining({ data, out: path.join(dir, 'full'), settings, hooks: { onStep: (s) => lrs.push(s.lr) } });
    const resolved = { ...settings, lrScaling: 'none' as const, warmupEpochs: 0, lrMilestones: [], lrGamma: 0.1 };
    expect(lrs).toEqual([0, 1].flatMap((e) => [0, 1].map((k) => lrAt(resolved, 1, e, k, 2))));
    expect(lrs[0]).toBe(0.02);
    expect(lrs[2]).toBeCloseTo(0.011, 15); // half-way: (0.02 + 0.002) / 2
    // The run folder as it was after epoch 1 (its checkpoints kept both epochs).
    const cut = path.join(dir, 'cut');
    await fs.mkdir(cut);
    for (const f of ['config.json', 'checkpoint-e0001.ckpt']) await fs.copyFile(path.join(dir, 'full', f), path.join(cut, f));
    const again: number[] = [];
    const resumed = await runTraining({ data, resume: cut, hooks: { onStep: (s) => again.push(s.lr) } });
    expect(again).toEqual(lrs.slice(2));
    expect(firstDifference(resumed.weights, full.weights)).toBe(-1);
    expect(firstDifference(resumed.momentum, full.momentum)).toBe(-1);
    const config = JSON.parse(await fs.readFile(path.join(dir, 'full', 'config.json'), 'utf8'));
    expect(config.optimizer.lrSchedule).toMatchObject({ shape: 'cosine', finalLr: 0.002, baseLr: 0.02 });
    expect(config.optimizer).toMatchObject({ nesterov: true, labelSmoothing: 0.1, semantics: 'torch.optim.SGD (dampening 0, Nesterov)' });
    expect(config.settings).toMatchObject(recipe);
  });
});

describe('batches too small for BatchNorm (steps.ts)', () => {
  it('refuses a batch size, or a share per worker, that leaves a BatchNorm under 3 values per channel, naming the fix', async () => {
    const data = syntheticData(12, 4, 8);
    await expect(runTraining({ data, out: path.join(await tempDir(), 'a'), settings: { epochs: 1, batchSize: 2, imageSize: 8 } })).rejects.toThrow(/--batch-size 2: .* use --batch-size 3 or more/);
    const group = createInProcessGroup(6);
    const runs = group.map((collective) => runTraining({ data: syntheticData(12, 4, 8), collective, settings: { epochs: 1, batchSize: 4, imageSize: 8 } }));
    const results = await Promise.allSettled(runs);
    for (const r of results) expect(r.status === 'rejected' && String(r.reason)).toMatch(/each of the 6 workers gets 2 of the 12 training images .* use at most 4 workers/);
  });
});

describe('a run that diverges', () => {
  it('weights made non-finite by the last step of an epoch: the evaluation stops the run, no checkpoint is written, summary.json says diverged', async () => {
    // lr 1e30: the one step's loss is finite (initial weights), its update is not survivable.
    const out = path.join(await tempDir(), 'run');
    const err = await runTraining({ data: syntheticData(8, 8), out, settings: { epochs: 1, batchSize: 8, lr: 1e30, seed: 1 } }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(TrainingDivergedError);
    const e = err as TrainingDivergedError;
    expect(e.message).toMatch(/^the test loss became (NaN|-?Infinity) after epoch 1 \(step 1\): the weights are no longer finite; training diverged, no checkpoint was written, try a smaller --lr$/);
    expect([e.step, e.epoch]).toEqual([1, 1]);
    expect(await listCheckpoints(out)).toEqual([]);
    const summary = JSON.parse(await fs.readFile(path.join(out, 'summary.json'), 'utf8')) as Summary;
    expect(summary).toMatchObject({ status: 'diverged', stopReason: e.message, steps: 1, epochs: 1 });
    expect((await readMetrics(out)).filter((l) => l.kind === 'epoch')).toEqual([]);
  });
});

describe('the torch engine behind the same seam', () => {
  it('two replicas stay bitwise identical, BatchNorm statistics averaged over ranks that saw different images', async (ctx) => {
    needsEngine(ctx);
    const data = syntheticData(40, 16);
    const settings = { epochs: 1, batchSize: 8, lr: 0.01, momentum: 0.9, seed: 4, engine: 'torch' as const };
    const results = await Promise.all(createInProcessGroup(2).map((collective) => runTraining({ data, collective, settings })));
    expect(firstDifference(results[0].weights, results[1].weights)).toBe(-1);
    expect(firstDifference(results[0].momentum, results[1].momentum)).toBe(-1);
    // Each rank's running statistics come from its own shard: only the end-of-epoch average makes them equal.
    expect(firstDifference(results[0].bnStats, results[1].bnStats)).toBe(-1);
    const single = await runTraining({ data, settings: { ...settings, epochs: 1 } });
    expect(firstDifference(single.bnStats, results[0].bnStats)).not.toBe(-1);
  });

  it('refuses a group whose ranks run different engines (their gradient layouts differ)', async (ctx) => {
    needsEngine(ctx);
    const data = syntheticData(16, 8);
    const runs = createInProcessGroup(2).map((collective, rank) =>
      runTraining({ data, collective, settings: { epochs: 1, batchSize: 8, engine: rank === 0 ? 'tfjs' : 'torch' } }),
    );
    const errors = await Promise.allSettled(runs);
    for (const e of errors) expect(e.status).toBe('rejected');
    expect(String((errors[1] as PromiseRejectedResult).reason)).toMatch(/differ from rank 0's.*"engine":"torch"/);
  });
});
