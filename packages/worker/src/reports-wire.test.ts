// The worker's reports travel as protobuf messages whose fields have the names of the worker's
// types (run-folder.ts's EpochMetrics and Summary, the trainer's StartInfo, DoneReport). Each
// record below sets every field its type has (`satisfies Required<...>`: a field added to a type
// must be added here), goes through the real encoder and decoder, and must come back whole, read
// the way the coordinator reads it (toObject with defaults: proto3 leaves zeros off the wire).
import { decodeMessage, dtrain, encodeMessage } from '@dtrain/transport';
import { describe, expect, it } from 'vitest';
import { reportField, type DoneReport, type WorkerReport } from './distributed.js';
import type { EpochMetrics, Summary } from './run-folder.js';
import type { StartInfo } from './trainer.js';

const phases = { data: 0.5, compute: 10.25, allReduce: 0, optimizer: 1.5, other: 0.125 };
const epoch = {
  kind: 'epoch', epoch: 3, epochs: 20, step: 2_345, loss: 0.5, trainAcc: 0.8, testLoss: 0.625, testAcc: 0.75, testImages: 10_000,
  elapsedSec: 120.5, trainSec: 110.25, evalSec: 10.25, images: 50_000, imagesPerSec: 453.5, phaseSec: phases, phaseShare: { ...phases, compute: 0.875 },
  worldSize: 2, globalBatch: 128, lr: 0.05, lrFirst: 0.025, totalElapsedSec: 361.5, time: '2026-12-07T21:00:00.000Z',
} satisfies Required<EpochMetrics>;
const summary = {
  status: 'stopped', stopReason: 'fewer than 2 workers are left', dataset: 'fashion-mnist', epochs: 20, steps: 9_380, finalTrainLoss: 0.25,
  finalTrainAcc: 0.9, finalTestLoss: 0.3, finalTestAcc: 0.93, bestTestAcc: 0.9341, bestEpoch: 0, testImages: 10_000, totalSec: 5389.5,
  trainSec: 5000.25, imagesPerSec: 341.5, worldSize: 2, globalBatch: 128, runDir: '/runs/a', lastCheckpoint: '/runs/a/checkpoint-e0019.ckpt',
  bestCheckpoint: '/runs/a/best.ckpt', resumed: false,
} satisfies Required<Summary>;
const info = {
  startEpoch: 1, epochs: 20, stepsPerEpoch: 469, trainImages: 60_000, testImages: 10_000, resumedFromEpoch: 0, runDir: '/runs/a', lr: 0.05,
  backend: 'tensorflow', versions: { dtrain: '0.1.0', node: 'v20.20.2', tfjs: '4.22.0' },
} satisfies Required<StartInfo>;
const done = { kind: 'done', rank: 0, host: 'a', stateSha256: '9c97bb6151eea19a', collectiveSec: 0, collectiveCalls: 12, summary } satisfies Required<DoneReport>;

/** What arrives at the coordinator: the StepReport decoded, its report read back with defaults. */
function sent(r: WorkerReport): { [k: string]: unknown } {
  const d = decodeMessage(encodeMessage('stepReport', { rank: 1, ...reportField(r) }, 'run'));
  if (!d.ok || d.message.kind !== 'stepReport') throw new Error(`not a step report: ${d.ok ? d.message.kind : d.reason}`);
  const back = dtrain.StepReport.toObject(dtrain.StepReport.fromObject(d.message.body), { defaults: true, longs: Number });
  return back[r.kind === 'epoch' ? 'epochMetrics' : r.kind === 'done' ? 'final' : r.kind];
}

describe('reports on the wire', () => {
  it('an epoch line, a final report with its summary, a start report and a checkpoint come back field for field, zeros included', () => {
    const { kind: _e, ...metrics } = epoch;
    expect(sent({ kind: 'epoch', metrics: epoch })).toEqual(metrics);
    const { kind: _d, ...final } = done;
    expect(sent(done)).toEqual(final);
    expect(sent({ kind: 'start', info, worldSize: 2 })).toEqual({ info, worldSize: 2 });
    expect(sent({ kind: 'checkpoint', file: '/runs/a/checkpoint-e0003.ckpt', unixMs: 1_765_141_200_123 })).toEqual({ file: '/runs/a/checkpoint-e0003.ckpt', unixMs: 1_765_141_200_123 });
    expect(sent({ kind: 'rejected', total: 7 })).toEqual({ total: 7 });
  });

  it("fields the types allow to be absent stay absent (the coordinator reads them as null or undefined), not ''", () => {
    const bare = sent({ ...done, summary: { ...summary, stopReason: undefined, runDir: null, lastCheckpoint: null, bestCheckpoint: undefined } }) as { summary: Record<string, unknown> };
    for (const k of ['stopReason', 'runDir', 'lastCheckpoint', 'bestCheckpoint']) expect(bare.summary[k], k).toBeUndefined();
    const first = sent({ kind: 'start', info: { ...info, resumedFromEpoch: null, runDir: null }, worldSize: 2 }) as { info: Record<string, unknown> };
    expect(first.info.resumedFromEpoch).toBeUndefined();
    expect(first.info.runDir).toBeUndefined();
  });
});
