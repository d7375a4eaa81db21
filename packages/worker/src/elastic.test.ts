// Elastic training with an in-process test double of the coordinator's group (testing/elastic-group.ts):
// replicas lost mid-epoch and during evaluation, a voluntary regroup that admits a fresh replica,
// a stop below --min-workers and its resume with another world size. Synthetic data (NOT REAL
// DATA) at 8x8: every step of the 11M-parameter model still costs a few tenths of a second.

import { createHash } from 'node:crypto';
import fs from 'node:fs/promises';
import path from 'node:path';
import { beforeAll, describe, expect, it } from 'vitest';
import { loadBackend } from '@dtrain/backend';
import { firstDifference } from '@dtrain/core/testing';
import { DistributedSampler } from '@dtrain/data';
import { listCheckpoints, readCheckpoint } from './checkpoint.js';
import { createInProcessGroup, type Collective } from './collective.js';
import { runTraining, type RunTrainingResult } from './run.js';
import { ElasticInProcessGroup, ReplicaKilledError, type ElasticMember } from './testing/elastic-group.js';
import { syntheticData, tempDir } from './testing/helpers.js';
import { readMetrics, type EpochMetrics } from './run-folder.js';
import type { StepInfo, TrainerHooks } from './trainer.js';
import type { TrainSettingsInput } from './settings.js';

beforeAll(async () => {
  await loadBackend('cpu');
});

/** Start-of-run sync: fingerprint (2 calls), state length, state, weights, BN, momentum. */
const SYNC_CALLS = 7;

function stateHash(r: RunTrainingResult): string {
  const h = createHash('sha256');
  for (const a of [r.weights, r.bnStats, r.momentum]) h.update(new Uint8Array(a.buffer, a.byteOffset, a.byteLength));
  return h.digest('hex');
}

/** Applied steps' sample indices of one epoch (1-based), all replicas together. */
class Usage {
  readonly steps: Array<{ replica: number; info: StepInfo }> = [];
  hooks(replica: number, extra: TrainerHooks = {}): TrainerHooks {
    return { ...extra, onStep: (s) => (this.steps.push({ replica, info: s }), extra.onStep?.(s)) };
  }
  counts(epoch: number): Map<number, number> {
    const m = new Map<number, number>();
    for (const { info } of this.steps) if (info.epoch === epoch) for (const i of info.indices) m.set(i, (m.get(i) ?? 0) + 1);
    return m;
  }
}

/** Every sample of the epoch once, plus the padding repeats: the first `pad` positions of the rest from `restStart`. */
function expectEpochCoverage(counts: Map<number, number>, order: Int32Array, restStart: number, pad: number): void {
  const want = new Map<number, number>();
  for (const i of order) want.set(i, 1);
  for (let k = 0; k < pad; k++) want.set(order[restStart + k], want.get(order[restStart + k])! + 1);
  expect(new Map([...counts].sort((a, b) => a[0] - b[0]))).toEqual(new Map([...want].sort((a, b) => a[0] - b[0])));
}

const base: TrainSettingsInput = { batchSize: 4, evalBatchSize: 16, lr: 0.001, momentum: 0.9, seed: 2, logEverySteps: 1000 };

async function launch(group: ElasticInProcessGroup, o: { out: string; data: ReturnType<typeof syntheticData>; settings: TrainSettingsInput; usage: Usage; hooks?: (m: ElasticMember) => TrainerHooks }) {
  return Promise.allSettled(
    group.members.map((collective) => runTraining({ data: o.data, collective, out: o.out, settings: o.settings, hooks: o.usage.hooks(collective.id, o.hooks?.(collective)) })),
  );
}

function fulfilled<T>(r: PromiseSettledResult<T>): T {
  if (r.status === 'rejected') throw r.reason;
  return r.value;
}

describe('elastic training (in-process group)', () => {
  it('a replica lost mid-epoch: the survivors redo the failed step, re-shard the rest, finish identical', async () => {
    // 31 images, 3 x batch 4: step 0 takes positions 0..11. Rank 0 (the writer) dies in step 1;
    // the 2 survivors redo it and share the 19 left: 10 each, one padding repeat (position 12),
    // as 4 + 6: at 8x8 a last batch of 2 would leave every BatchNorm 2 values per channel
    // (steps.ts; before, that step's gradients reached 2e8 and the loss NaN two steps later).
    const data = syntheticData(31, 10, 8);
    const out = path.join(await tempDir(), 'run');
    const group = new ElasticInProcessGroup(3);
    group.lose(0, SYNC_CALLS + 1);
    const usage = new Usage();
    const regroups: Array<{ replica: number; rank: number; worldSize: number; root: number; done: number }> = [];
    const res = await launch(group, {
      out,
      data,
      settings: { ...base, epochs: 2 },
      usage,
      hooks: (m) => ({ onRegroup: (r) => regroups.push({ replica: m.id, rank: r.rank, worldSize: r.worldSize, root: r.root, done: r.progress.done }) }),
    });
    expect(res[0].status).toBe('rejected');
    expect((res[0] as PromiseRejectedResult).reason).toBeInstanceOf(ReplicaKilledError);
    const [a, b] = [fulfilled(res[1]), fulfilled(res[2])];
    expect(stateHash(a)).toBe(stateHash(b));
    expect(regroups.sort((x, y) => x.replica - y.replica)).toEqual([
      { replica: 1, rank: 0, worldSize: 2, root: 0, done: 12 },
      { replica: 2, rank: 1, worldSize: 2, root: 0, done: 12 },
    ]);
    expect(group.generations[0]).toMatchObject({ members: [1, 2], stop: false, committed: { 1: { epoch: 0, done: 12, step: 1 }, 2: { epoch: 0, done: 12, step: 1 } } });

    const order = new DistributedSampler({ size: 31, seed: 2 }).permutation(0);
    expectEpochCoverage(usage.counts(1), order, 12, 1);
    // Epoch 2 entirely with 2 workers: 31 -> 16 each, one repeat of the order's first image.
    expectEpochCoverage(usage.counts(2), new DistributedSampler({ size: 31, seed: 2 }).permutation(1), 0, 1);
    // Steps: 1 with 3 workers, then 2 + 4 with 2 (the failed one redone, never counted twice).
    expect(a.summary).toMatchObject({ status: 'completed', steps: 7, worldSize: 2, globalBatch: 8, runDir: out });
    expect(usage.steps.filter((s) => s.replica === 1 && s.info.epoch === 1).map((s) => s.info.n)).toEqual([4, 4, 6]);
    expect(b.runDir).toBeNull();
    expect(a.epochs.map((e) => [e.epoch, e.images, e.worldSize, e.testImages])).toEqual([
      [1, 32, 2, 10],
      [2, 32, 2, 10],
    ]);
    // The new rank 0 (launch rank 1) took over the run folder the dead one created.
    // (At 8x8 the test loss of this tiny run may be NaN, which JSON writes as null: compare the rest.)
    const pick = (e: EpochMetrics) => [e.epoch, e.step, e.images, e.worldSize, e.testAcc, e.loss];
    const lines = (await readMetrics(out)).filter((l): l is EpochMetrics => l.kind === 'epoch');
    expect(lines.map(pick)).toEqual(a.epochs.map(pick));
    expect((await listCheckpoints(out)).map((c) => [c.epoch, c.done])).toEqual([
      [1, 0],
      [2, 0],
    ]);
    expect(JSON.parse(await fs.readFile(path.join(out, 'summary.json'), 'utf8'))).toMatchObject({ status: 'completed', worldSize: 2 });
  });

  it('a replica lost during the epoch-end evaluation: the epoch end is redone by the survivors, once', async () => {
    // 24 images, 3 x batch 4: 2 steps; then BN averaging (call 9) and the evaluation sum (call 10).
    const data = syntheticData(24, 11, 8);
    const out = path.join(await tempDir(), 'run');
    const group = new ElasticInProcessGroup(3);
    group.lose(2, SYNC_CALLS + 2 + 1);
    const usage = new Usage();
    const evalStarts: number[] = [];
    const res = await launch(group, { out, data, settings: { ...base, epochs: 1 }, usage, hooks: (m) => ({ onEvalStart: () => evalStarts.push(m.id) }) });
    expect((res[2] as PromiseRejectedResult).reason).toBeInstanceOf(ReplicaKilledError);
    const [a, b] = [fulfilled(res[0]), fulfilled(res[1])];
    expect(stateHash(a)).toBe(stateHash(b));
    // Evaluation started by all three, then again by the two survivors.
    expect(evalStarts.sort()).toEqual([0, 0, 1, 1, 2]);
    expectEpochCoverage(usage.counts(1), new DistributedSampler({ size: 24, seed: 2 }).permutation(0), 0, 0);
    expect(group.generations[0]).toMatchObject({ members: [0, 1], committed: { 0: { epoch: 0, done: 24, step: 2 } } });
    // One epoch line, from the 2-worker evaluation (11 test images over 6 + 5), training from the 3.
    expect(a.epochs).toHaveLength(1);
    expect(a.epochs[0]).toMatchObject({ epoch: 1, step: 2, images: 24, testImages: 11, worldSize: 2 });
    expect(b.epochs[0].testAcc).toBe(a.epochs[0].testAcc);
    expect((await readMetrics(out)).filter((l) => l.kind === 'epoch')).toHaveLength(1);
  });

  it("rank 0 lost in the epoch-end evaluation after the others completed it: the new rank 0 writes that epoch's checkpoint and line", async () => {
    // 24 images, 3 x batch 4: 2 steps; BN averaging (call 9), the evaluation sum (call 10), which
    // ranks 1 and 2 complete and rank 0 (the writer) never does. They go on into epoch 2, whose
    // first all-reduce fails; the group regroups from their state (epoch 1 done).
    const data = syntheticData(24, 11, 8);
    const out = path.join(await tempDir(), 'run');
    const group = new ElasticInProcessGroup(3);
    group.loseAfterOthersComplete(0, SYNC_CALLS + 2 + 1);
    const usage = new Usage();
    const reported: Array<[number, number]> = [];
    const res = await launch(group, { out, data, settings: { ...base, epochs: 2 }, usage, hooks: (m) => ({ onEpochEnd: (e) => reported.push([m.id, e.epoch]) }) });
    expect((res[0] as PromiseRejectedResult).reason).toBeInstanceOf(ReplicaKilledError);
    const [a, b] = [fulfilled(res[1]), fulfilled(res[2])];
    expect(stateHash(a)).toBe(stateHash(b));
    expect(group.generations[0]).toMatchObject({ members: [1, 2], root: 0, committed: { 1: { epoch: 1, done: 0, step: 2 } } });
    // Epoch 1 trained and evaluated once, by 3 workers; its line written by the new rank 0.
    const lines = (await readMetrics(out)).filter((l): l is EpochMetrics => l.kind === 'epoch');
    expect(lines.map((l) => [l.epoch, l.worldSize, l.testImages])).toEqual([
      [1, 3, 11],
      [2, 2, 11],
    ]);
    expect(lines[0]).toEqual(a.epochs[0]);
    expect((await listCheckpoints(out)).map((c) => [c.epoch, c.done])).toEqual([
      [1, 0],
      [2, 0],
    ]);
    // Replica 1 saw epoch 1 end as rank 1, then reported it again as the new rank 0.
    expect(reported.filter(([id]) => id === 1)).toEqual([[1, 1], [1, 1], [1, 2]]);
  });

  it('a regroup that changes nothing keeps weights and momentum bitwise those of the uninterrupted run', async () => {
    // 24 images, 2 x batch 4, no padding, constant lr, no augmentation: re-sharding from done (16)
    // gives the same batches and the progress-based lr is the same lr. Only the BatchNorm running
    // statistics differ: mid-epoch they are per replica, and the sync gives every rank the root's.
    const data = syntheticData(24, 6, 8);
    const dir = await tempDir();
    const settings = { ...base, epochs: 1, weightDecay: 1e-4 };
    const plain = (await Promise.allSettled(createInProcessGroup(2).map((collective) => runTraining({ data, collective, out: path.join(dir, 'plain'), settings })))).map(fulfilled);
    const group = new ElasticInProcessGroup(2);
    const usage = new Usage();
    const res = (
      await launch(group, { out: path.join(dir, 'elastic'), data, settings, usage, hooks: (m) => ({ onStep: (s) => void (m.id === 1 && s.step === 1 && group.requestRegroup()) }) })
    ).map(fulfilled);
    expect(group.generations).toHaveLength(1);
    expect(group.generations[0].committed).toEqual({ 0: { epoch: 0, done: 16, step: 2 }, 1: { epoch: 0, done: 16, step: 2 } });
    for (const r of res) {
      expect(firstDifference(r.weights, plain[0].weights)).toBe(-1);
      expect(firstDifference(r.momentum, plain[0].momentum)).toBe(-1);
    }
    expect(stateHash(res[0])).toBe(stateHash(res[1]));
    expect(firstDifference(res[0].bnStats, plain[0].bnStats)).not.toBe(-1);
    expect(res[0].epochs[0].loss).toBe(plain[0].epochs[0].loss);
  });

  it('a voluntary regroup admits a 4th replica with no state, which ends identical', async () => {
    // 48 images, 3 x batch 4. A join is requested after step 2; step 3 carries the flag, is
    // applied, then the group regroups (36 done) and 4 workers take the last 12 images, 3 each.
    const data = syntheticData(48, 9, 8);
    const out = path.join(await tempDir(), 'run');
    const group = new ElasticInProcessGroup(3);
    const usage = new Usage();
    let joined: Promise<RunTrainingResult> | undefined;
    const settings = { ...base, epochs: 1, augment: true };
    const res = launch(group, {
      out,
      data,
      settings,
      usage,
      hooks: (m) => ({
        onStep: (s) => {
          if (m.id === 0 && s.step === 2 && !joined) {
            joined = group.join().then((collective) => runTraining({ data, collective, out, settings, hooks: usage.hooks(collective.id) }));
          }
        },
      }),
    });
    const results = (await res).map(fulfilled);
    const newcomer = await joined!;
    expect(group.generations).toHaveLength(1);
    expect(group.generations[0]).toMatchObject({ members: [0, 1, 2, 3], root: 0, stop: false });
    const hashes = [...results, newcomer].map(stateHash);
    expect(new Set(hashes).size).toBe(1);
    expectEpochCoverage(usage.counts(1), new DistributedSampler({ size: 48, seed: 2 }).permutation(0), 36, 0);
    expect(usage.steps.filter((s) => s.info.epoch === 1).map((s) => `${s.replica}:${s.info.step}:${s.info.worldSize}`)).toEqual(
      expect.arrayContaining(['0:3:3', '3:4:4']),
    );
    expect(newcomer.summary).toMatchObject({ steps: 4, worldSize: 4 });
    // The newcomer joined in epoch 1 and reports it with the group's numbers (totals adopted from the root).
    expect(newcomer.epochs.map((e) => e.epoch)).toEqual([1]);
    expect(newcomer.epochs[0]).toMatchObject({ images: 48, worldSize: 4, step: 4 });
    expect(newcomer.epochs[0].loss).toBe(results[0].epochs[0].loss);
    expect(newcomer.epochs[0].testAcc).toBe(results[0].epochs[0].testAcc);
    expect(newcomer.runDir).toBeNull();
  });

  it('a regroup that leaves fewer images than one healthy batch per rank: they sit the epoch out, the run goes on identical', async () => {
    // Only a group that grows can get there (a shrinking one spreads a rest of at least one healthy
    // step over fewer ranks). 1 worker, 12 images, batch 4: a join requested after step 1 rides on
    // step 2; the group regroups with 8 done; the 4 left would be batches of 2 on 2 ranks, below
    // the 3 the 1x1 maps at 8x8 need (steps.ts). They sit epoch 1 out; epoch 2: 6 each, one step.
    const data = syntheticData(12, 6, 8);
    const out = path.join(await tempDir(), 'run');
    const group = new ElasticInProcessGroup(1);
    const usage = new Usage();
    let joined: Promise<RunTrainingResult> | undefined;
    const settings = { ...base, epochs: 2 };
    const res = launch(group, {
      out,
      data,
      settings,
      usage,
      hooks: () => ({
        onStep: (s) => {
          if (s.step === 1 && !joined) joined = group.join().then((collective) => runTraining({ data, collective, out, settings, hooks: usage.hooks(collective.id) }));
        },
      }),
    });
    const [first] = (await res).map(fulfilled);
    const newcomer = await joined!;
    expect(stateHash(first)).toBe(stateHash(newcomer));
    const order = new DistributedSampler({ size: 12, seed: 2 }).permutation(0);
    expect(new Map([...usage.counts(1)].sort((x, y) => x[0] - y[0]))).toEqual(new Map([...order.subarray(0, 8)].sort((x, y) => x - y).map((i) => [i, 1])));
    expect(usage.steps.filter((s) => s.info.epoch === 2).map((s) => s.info.n)).toEqual([6, 6]);
    expect(first.epochs.map((e) => [e.epoch, e.images, e.worldSize])).toEqual([
      [1, 8, 2],
      [2, 12, 2],
    ]);
    expect(first.summary).toMatchObject({ status: 'completed', steps: 3, worldSize: 2 });
  });

  it('below --min-workers: a mid-epoch checkpoint and status stopped; a resume with another world size completes the run', async () => {
    // 30 images, 2 x batch 4: step 0 takes 0..7, replica 1 dies in step 1, 1 < 2 workers: stop at done 8.
    const data = syntheticData(30, 8, 8);
    const out = path.join(await tempDir(), 'run');
    const group = new ElasticInProcessGroup(2, 2);
    group.lose(1, SYNC_CALLS + 1);
    const usage = new Usage();
    const settings = { ...base, epochs: 2 };
    const res = await launch(group, { out, data, settings, usage });
    const stopped = fulfilled(res[0]);
    expect(stopped.summary).toMatchObject({ status: 'stopped', steps: 1, worldSize: 1 });
    expect(stopped.summary.stopReason).toMatch(/lost replica 1: 1 workers, fewer than --min-workers 2/);
    expect(stopped.epochs).toEqual([]);
    const ckFile = path.join(out, 'checkpoint-e0000-p00000008.ckpt');
    expect(stopped.summary.lastCheckpoint).toBe(ckFile);
    const ck = await readCheckpoint(ckFile);
    expect(ck.header).toMatchObject({ epoch: 0, step: 1, position: { done: 8, totals: { count: 8, steps: 1 } } });
    expect(JSON.parse(await fs.readFile(path.join(out, 'summary.json'), 'utf8'))).toMatchObject({ status: 'stopped' });

    // Resume with 3 plain (non-elastic) replicas: the 22 left of epoch 1 over 3 (8 each, 2 repeats).
    const group3: Collective[] = createInProcessGroup(3);
    const resumed = (await Promise.allSettled(group3.map((collective, rank) => runTraining({ data, collective, resume: out, hooks: usage.hooks(10 + rank) })))).map(fulfilled);
    expect(stateHash(resumed[0])).toBe(stateHash(resumed[1]));
    expect(stateHash(resumed[0])).toBe(stateHash(resumed[2]));
    expectEpochCoverage(usage.counts(1), new DistributedSampler({ size: 30, seed: 2 }).permutation(0), 8, 2);
    // Epoch 2 with 3: 10 each, as 4 + 6 (a last batch of 2 folded into the step before it).
    expect(resumed[0].summary).toMatchObject({ status: 'completed', resumed: true, worldSize: 3, steps: 1 + 2 + 2 });
    expect(resumed[0].epochs.map((e) => [e.epoch, e.images, e.worldSize])).toEqual([
      [1, 8 + 24, 3],
      [2, 30, 3],
    ]);
    const config = JSON.parse(await fs.readFile(path.join(out, 'config.json'), 'utf8'));
    expect(config.resumes[0]).toMatchObject({ fromEpoch: 0, fromDone: 8, fromCheckpoint: 'checkpoint-e0000-p00000008.ckpt', worldSize: 3 });
    expect((await listCheckpoints(out)).map((c) => [c.epoch, c.done])).toEqual([
      [1, 0],
      [2, 0],
    ]);
  });
});
