// A run folder in the trainer's real format (config.json, metrics.jsonl, summary.json), with
// plausible numbers: a 2-worker Fashion-MNIST run whose loss falls and accuracy rises.
import fs from 'node:fs';
import path from 'node:path';
import type { EpochMetrics, StepMetrics, Summary } from '@dtrain/worker';

export interface FixtureOptions {
  epochs: number;
  /** Epochs actually finished (fewer than `epochs`: an interrupted run, no summary.json). */
  finished?: number;
  worldSize?: number;
  trainImages?: number;
  batchSize?: number;
  logEverySteps?: number;
  createdAt?: string;
  dataset?: string;
}

export function writeRunFixture(dir: string, o: FixtureOptions): { epochs: EpochMetrics[]; steps: StepMetrics[]; summary: Summary | null } {
  const world = o.worldSize ?? 2;
  const batch = o.batchSize ?? 64;
  const trainImages = o.trainImages ?? 3000;
  const every = o.logEverySteps ?? 5;
  const finished = o.finished ?? o.epochs;
  const spe = Math.ceil(Math.ceil(trainImages / world) / batch);
  const created = Date.parse(o.createdAt ?? '2025-03-04T05:06:07.000Z');
  const dataset = o.dataset ?? 'fashion-mnist';
  fs.mkdirSync(dir, { recursive: true });
  fs.writeFileSync(
    path.join(dir, 'config.json'),
    `${JSON.stringify(
      {
        settings: { preset: null, epochs: o.epochs, batchSize: batch, evalBatchSize: 128, lr: 0.01, momentum: 0.9, weightDecay: 0, seed: 0, limitTrain: trainImages, limitTest: 1000, augment: false, backend: 'cpu', init: 'xavier-uniform', logEverySteps: every, keepCheckpoints: 2, dataDir: null, dataset, imageSize: 28 },
        seed: 0,
        worldSize: world,
        globalBatch: batch * world,
        data: { train: { name: `${dataset}-train`, images: trainImages, shape: [28, 28, 1] }, test: { name: `${dataset}-test`, images: 1000, shape: [28, 28, 1] } },
        versions: { dtrain: '0.1.0', tfjs: '4.22.0', tensorflow: '2.9.1', node: '20.20.2', backendPackage: '@tensorflow/tfjs-node' },
        createdAt: new Date(created).toISOString(),
        resumes: [],
      },
      null,
      2,
    )}\n`,
  );
  const lines: string[] = [];
  const epochs: EpochMetrics[] = [];
  const steps: StepMetrics[] = [];
  let t = created + 2000;
  let step = 0;
  let total = 0;
  for (let e = 1; e <= finished; e++) {
    const phases = { data: 0, compute: 0, allReduce: 0, optimizer: 0 };
    let win = { steps: 0, n: 0, sec: 0, phases: { data: 0, compute: 0, allReduce: 0, optimizer: 0 } };
    let trainSec = 0;
    for (let k = 1; k <= spe; k++) {
      step++;
      const n = k < spe ? batch : Math.ceil(trainImages / world) - (spe - 1) * batch;
      const p = { data: 0.02, compute: 0.9 - 0.01 * e, allReduce: 0.25 + 0.05 * (k % 2), optimizer: 0.03 };
      const sec = p.data + p.compute + p.allReduce + p.optimizer + 0.01;
      trainSec += sec;
      t += sec * 1000;
      for (const key of Object.keys(p) as (keyof typeof p)[]) {
        phases[key] += p[key];
        win.phases[key] += p[key];
      }
      win.steps++;
      win.n += n;
      win.sec += sec;
      if (step % every === 0) {
        const frac = step / spe;
        const s: StepMetrics = {
          kind: 'step',
          epoch: e,
          step,
          steps: win.steps,
          loss: +(2.3 * Math.exp(-0.9 * frac) + 0.25).toFixed(6),
          trainAcc: +(0.9 - 0.75 * Math.exp(-1.5 * frac)).toFixed(6),
          images: win.n,
          imagesPerSec: +(win.n / win.sec).toFixed(2),
          phaseSec: { data: +win.phases.data.toFixed(4), compute: +win.phases.compute.toFixed(4), allReduce: +win.phases.allReduce.toFixed(4), optimizer: +win.phases.optimizer.toFixed(4) },
          time: new Date(t).toISOString(),
        };
        steps.push(s);
        lines.push(JSON.stringify(s));
        win = { steps: 0, n: 0, sec: 0, phases: { data: 0, compute: 0, allReduce: 0, optimizer: 0 } };
      }
    }
    const evalSec = 3.5;
    t += evalSec * 1000;
    total += trainSec + evalSec;
    const other = trainSec - phases.data - phases.compute - phases.allReduce - phases.optimizer;
    const share = (x: number) => +(x / trainSec).toFixed(4);
    const m: EpochMetrics = {
      kind: 'epoch',
      epoch: e,
      epochs: o.epochs,
      step,
      loss: +(2.3 * Math.exp(-0.9 * (e - 0.5)) + 0.25).toFixed(6),
      trainAcc: +(0.9 - 0.75 * Math.exp(-1.5 * (e - 0.5))).toFixed(6),
      testLoss: +(2.3 * Math.exp(-0.8 * e) + 0.3).toFixed(6),
      testAcc: +(0.88 - 0.7 * Math.exp(-1.4 * e)).toFixed(6),
      testImages: 1000,
      elapsedSec: +(trainSec + evalSec).toFixed(3),
      trainSec: +trainSec.toFixed(3),
      evalSec,
      images: trainImages,
      imagesPerSec: +(trainImages / trainSec).toFixed(2),
      phaseSec: { data: +phases.data.toFixed(3), compute: +phases.compute.toFixed(3), allReduce: +phases.allReduce.toFixed(3), optimizer: +phases.optimizer.toFixed(3), other: +other.toFixed(3) },
      phaseShare: { data: share(phases.data), compute: share(phases.compute), allReduce: share(phases.allReduce), optimizer: share(phases.optimizer), other: share(other) },
      worldSize: world,
      globalBatch: batch * world,
      lr: 0.01,
      totalElapsedSec: +total.toFixed(3),
      time: new Date(t).toISOString(),
    };
    epochs.push(m);
    lines.push(JSON.stringify(m));
  }
  fs.writeFileSync(path.join(dir, 'metrics.jsonl'), lines.map((l) => `${l}\n`).join(''));
  let summary: Summary | null = null;
  if (finished === o.epochs && finished > 0) {
    const last = epochs[epochs.length - 1];
    const best = epochs.reduce((b, e) => (e.testAcc > b.testAcc ? e : b));
    summary = {
      status: 'completed',
      dataset,
      epochs: o.epochs,
      steps: step,
      finalTrainLoss: last.loss,
      finalTrainAcc: last.trainAcc,
      finalTestLoss: last.testLoss,
      finalTestAcc: last.testAcc,
      bestTestAcc: best.testAcc,
      bestEpoch: best.epoch,
      testImages: 1000,
      totalSec: +total.toFixed(3),
      trainSec: +epochs.reduce((a, e) => a + e.trainSec, 0).toFixed(3),
      imagesPerSec: +((trainImages * o.epochs) / epochs.reduce((a, e) => a + e.trainSec, 0)).toFixed(2),
      worldSize: world,
      globalBatch: batch * world,
      runDir: dir,
      lastCheckpoint: path.join(dir, `epoch-${o.epochs}.ckpt`),
      resumed: false,
    };
    fs.writeFileSync(path.join(dir, 'summary.json'), `${JSON.stringify(summary, null, 2)}\n`);
  }
  return { epochs, steps, summary };
}
