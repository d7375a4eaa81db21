// Distributed training end to end: real worker processes, real sockets on 127.0.0.1, the native
// TensorFlow backend, synthetic 12x12 images (an 11M-parameter step still costs ~0.3 s here).
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { describe, expect, it, type TestContext } from 'vitest';
import { listGpus, loadBackend } from '@dtrain/backend';
import { launch } from '@dtrain/coordinator';
import { ResNet } from '@dtrain/core';
import { BatchAssembler, batchesOf, DistributedSampler, makeSyntheticTestDataset } from '@dtrain/data';
import { readLatestCheckpoint, WORKER_ENTRY, type DistributedConfig } from '@dtrain/worker';
import { killWorkersAtEnd, runCli, testTimeoutFor } from './testing/processes.js';

const tmp = () => fs.mkdtempSync(path.join(os.tmpdir(), 'dtrain-launch-'));

const cli = (ctx: TestContext, ...args: string[]) => runCli(ctx, args);

// Same flags for the uninterrupted run and the stopped-and-resumed one.
// With gradient buckets overlapping the backward pass (the default, spelled out).
const RUN = ['--workers', '2', '--synthetic-test-data', '96:64:12', '--batch-size', '8', '--lr', '0.02', '--seed', '3', '--metrics-port', '0', '--bucket-mb', '8'];
const stateOf = (stdout: string) => /replicas identical: state sha256 ([0-9a-f]{16}) on all 2 workers/.exec(stdout)?.[1];

// Each launch is killed with its workers when its test ends, at the latest KILL_MARGIN_MS before the
// test's timeout (testing/processes.ts); tests that train get RUN_LIMIT_MS per launch run in turn.
describe('pnpm cli launch --workers 2', () => {
  let uninterrupted: string | undefined;

  it('trains: one line per epoch with world size and all-reduce share, a summary, identical replicas, per-rank logs', async (ctx) => {
    const out = path.join(tmp(), 'run');
    const r = await cli(ctx, 'launch', ...RUN, '--epochs', '2', '--out', out);
    expect(r.stderr).toBe('');
    expect(r.code).toBe(0);
    const epochs = r.stdout.split('\n').filter((l) => l.startsWith('epoch '));
    expect(epochs).toHaveLength(2);
    for (const l of epochs) expect(l).toMatch(/world 2 \(global batch 16\)\s+all-reduce \d+\.\d% of train time/);
    // It learns: the training loss falls and training accuracy is well above chance (10%).
    const loss = epochs.map((l) => Number(/loss (\S+)/.exec(l)![1]));
    expect(loss[1]).toBeLessThan(loss[0]);
    expect(Number(/train (\S+)%/.exec(epochs[1])![1])).toBeGreaterThan(40);
    expect(r.stdout).toMatch(/done: 2 epochs, 12 steps, test accuracy .* on 64 images/);
    // Neither --keys nor --insecure on loopback: CURVE with keys made for the run (issue 19, 1.1).
    expect(r.stdout).toMatch(/^security: CURVE on the control socket and the rings \(tcp:\/\/127\.0\.0\.1:\d+\) with a key pair made for this run/m);
    expect(fs.readFileSync(path.join(out, 'logs', 'rank-1.log'), 'utf8')).toMatch(/ring socket bound on 127\.0\.0\.1:\d+ \(CURVE\)/);
    uninterrupted = stateOf(r.stdout);
    expect(uninterrupted).toBeDefined();
    for (const rank of [0, 1]) {
      const log = fs.readFileSync(path.join(out, 'logs', `rank-${rank}.log`), 'utf8');
      expect(log).toMatch(new RegExp(`^\\[rank ${rank}\\] rank ${rank} on host \\S+: done, state sha256`, 'm'));
    }
    // The run is this user's alone (umask 077): config.json and the logs name the run id, which
    // would let another local user join a loopback run; checkpoints hold the weights.
    const others = (p: string) => fs.statSync(path.join(out, p)).mode & 0o077;
    const ckpt = fs.readdirSync(out).find((f) => f.endsWith('.ckpt'))!;
    for (const p of ['.', 'config.json', 'metrics.jsonl', 'summary.json', 'logs', 'logs/rank-0.log', ckpt]) expect(others(p), p).toBe(0);
  }, testTimeoutFor(1));

  it('a run stopped after epoch 1 and resumed with --resume ends in the same state as the uninterrupted run', async (ctx) => {
    expect(uninterrupted, 'needs the previous test').toBeDefined();
    const out = path.join(tmp(), 'run');
    const first = await cli(ctx, 'launch', ...RUN, '--epochs', '1', '--out', out);
    expect(first.code).toBe(0);
    // In-memory test data is not in the checkpoint: name it again, as a user names the data dir.
    const second = await cli(ctx, 'launch', '--workers', '2', '--synthetic-test-data', '96:64:12', '--resume', out, '--epochs', '2', '--metrics-port', '0', '--bucket-mb', '8');
    expect(second.stderr).toBe('');
    expect(second.code).toBe(0);
    expect(second.stdout).toMatch(/^resuming .* \(epoch 1, written by 2 workers\) with 2$/m);
    expect(second.stdout.split('\n').filter((l) => l.startsWith('epoch '))).toEqual([expect.stringMatching(/^epoch 2\/2 /)]);
    expect(stateOf(second.stdout)).toBe(uninterrupted);
  }, testTimeoutFor(2));

  it('a --metrics-port in use is one line naming the port and the flag, before any worker starts', async (ctx) => {
    const busy = net.createServer();
    await new Promise<void>((resolve) => busy.listen(0, '0.0.0.0', resolve));
    const port = (busy.address() as net.AddressInfo).port;
    try {
      const out = path.join(tmp(), 'never');
      const r = await cli(ctx, 'launch', '--workers', '2', '--synthetic-test-data', '16:8:12', '--out', out, '--metrics-port', String(port));
      expect(r.code).toBe(2);
      expect(r.stderr).toBe(`error: cannot serve metrics on 127.0.0.1:${port} (the port is in use); choose another --metrics-port, or --metrics-port 0 to serve none\n`);
      expect(fs.existsSync(path.join(out, 'logs'))).toBe(false);
    } finally {
      busy.close();
    }
  });

  it('--gpus on a machine without enough GPUs fails before anything starts', async (ctx) => {
    const r = await cli(ctx, 'launch', '--gpus', '64', '--dataset', 'fashion-mnist', '--out', path.join(tmp(), 'never'));
    expect(r.code).toBe(2);
    // One line naming why: without an NVIDIA GPU no GPU backend works (the software GPU is refused without --allow-software-gpu).
    expect(r.stderr.trim().split('\n')).toHaveLength(1);
    expect(r.stderr).toMatch(/^error: --gpus 64: /);
    if (listGpus().length === 0) expect(r.stderr.trim()).toMatch(/^error: --gpus 64: no GPU backend works on this machine: gpu \(tfjs-node-gpu, CUDA 11\.2\): no NVIDIA driver; webgpu \(Dawn\): .*[^.]\. Use --workers 64 to train on the CPU\.$/);
    expect(fs.existsSync(path.join(tmp(), 'never'))).toBe(false);
  });
});

describe('equivalence', () => {
  // 2 workers with batch b against one process that takes the same 2b images as two micro-batches
  // of b and averages their gradients. (One batch of 2b would differ: BatchNorm in training mode
  // normalises with its batch's statistics, and each worker only sees its own b images, as in
  // PyTorch DDP without SyncBatchNorm. This is that per-micro-batch semantics, made exact.)
  it('2 workers x batch 8 == 1 process, batch 16 as 2 micro-batches of 8, over 3 steps', async (ctx) => {
    const runDir = path.join(tmp(), 'run');
    const synthetic = { train: 48, test: 16, size: 12 };
    const settings = { epochs: 1, batchSize: 8, lr: 0.05, momentum: 0.9, seed: 5 };
    // Buckets of >= 1 MiB handed over during the backward pass: same math, other summation order.
    const config: DistributedConfig = { settings, out: runDir, synthetic, bucketBytes: 2 ** 20 };
    await launch({ workers: 2, entry: WORKER_ENTRY, runDir, config, onEvent: killWorkersAtEnd(ctx) });
    const ck = await readLatestCheckpoint(runDir);
    expect(ck.header.step).toBe(3);

    await loadBackend('cpu');
    const opts = { height: 12, width: 12, channels: 1, numClasses: 10 };
    const train = makeSyntheticTestDataset({ ...opts, count: synthetic.train, seed: 1 });
    const model = new ResNet({ inChannels: 1, classes: 10, imageSize: 12 }, { seed: settings.seed, sgd: { lr: settings.lr, momentum: settings.momentum, weightDecay: 0 } });
    const assembler = new BatchAssembler(train, { height: 12, width: 12 });
    const shards = [0, 1].map((rank) => {
      const s = new DistributedSampler({ size: train.count, worldSize: 2, rank, seed: settings.seed, shuffle: true, dropLast: false });
      s.setEpoch(0);
      return [...batchesOf(s.indices(), settings.batchSize)];
    });
    const g = [new Float32Array(model.paramCount), new Float32Array(model.paramCount)];
    for (let step = 0; step < 3; step++) {
      for (const r of [0, 1]) {
        const b = assembler.assemble(train, shards[r][step]);
        await model.computeGradients({ images: b.x, labels: b.y, n: b.n }, g[r]);
      }
      for (let i = 0; i < g[0].length; i++) g[0][i] = (g[0][i] + g[1][i]) / 2;
      model.applyGradients(g[0]);
    }
    const want = await model.getWeights();
    const got = ck.weights;
    let worst = 0;
    for (let i = 0; i < want.length; i++) worst = Math.max(worst, Math.abs(got[i] - want[i]) / (1e-3 + Math.abs(want[i])));
    model.dispose();
    // Float tolerance; in practice the two agree bit for bit (a + b is commutative for 2 ranks).
    expect(worst).toBeLessThan(1e-5);
  }, testTimeoutFor(1));
});
