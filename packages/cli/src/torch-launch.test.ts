// `--engine torch` end to end: real worker processes over real sockets with the libtorch engine
// in each, checkpoints that resume on the other engine, and the refusal of --gpus without CUDA.
// Without a built engine the cases that train are skipped, except under CI (pnpm install builds it).
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { engineStatus, needsEngine } from '@dtrain/torch-engine/testing';
import { readMetrics, type EpochMetrics } from '@dtrain/worker';
import { runCli, testTimeoutFor } from './testing/processes.js';

const tmp = () => fs.mkdtempSync(path.join(os.tmpdir(), 'dtrain-torch-'));
const small = ['--dataset', 'fashion-mnist', '--limit-train', '256', '--limit-test', '128', '--image-size', '16', '--batch-size', '32'];

async function epochs(dir: string): Promise<EpochMetrics[]> {
  return (await readMetrics(dir)).filter((m): m is EpochMetrics => m.kind === 'epoch');
}

describe('pnpm cli launch --engine torch', () => {
  it('trains Fashion-MNIST on 2 CPU workers with gradient buckets overlapping the backward pass, replicas bitwise identical (Nesterov, decay of weights only, label smoothing)', async (ctx) => {
    needsEngine(ctx);
    const out = path.join(tmp(), 'run');
    const r = await runCli(ctx, ['launch', '--workers', '2', '--engine', 'torch', '--dataset', 'fashion-mnist', '--epochs', '1', '--limit-train', '512', '--limit-test', '256', '--momentum', '0.9', '--nesterov', '--weight-decay', '5e-4', '--skip-norm-bias-decay', '--label-smoothing', '0.1', '--bucket-mb', '1', '--metrics-port', '0', '--out', out]);
    expect(r.code, r.stderr).toBe(0);
    expect(r.stdout).toMatch(/^fashion-mnist: 1 epochs, 2 torch CPU workers x batch 64/m);
    expect(r.stdout).toMatch(/^epoch 1\/1 .* test \d+\.\d% \(256 images\)/m);
    expect(r.stdout).toMatch(/replicas identical: state sha256 [0-9a-f]{16} on all 2 workers/);
    const config = JSON.parse(fs.readFileSync(path.join(out, 'config.json'), 'utf8')) as { settings: { engine: string }; versions: { engine: string; libtorch: string } };
    expect(config.settings.engine).toBe('torch');
    expect(config.versions.engine).toBe('torch');
    expect(config.versions.libtorch).toMatch(/^libtorch \d+\.\d+\.\d+/);
  }, testTimeoutFor(1));

  it('refuses --gpus where libtorch sees no CUDA GPU, in one line, before any worker starts', async (ctx) => {
    needsEngine(ctx);
    ctx.skip(engineStatus.cudaDevices > 0, 'this machine has a CUDA GPU');
    const out = path.join(tmp(), 'run');
    const r = await runCli(ctx, ['launch', '--gpus', '2', '--engine', 'torch', '--dataset', 'fashion-mnist', '--out', out]);
    expect(r.code).toBe(2);
    expect(r.stderr.trim()).toMatch(/^error: --gpus 2 --engine torch: the libtorch in use sees no CUDA GPU \(libtorch .*\); install a CUDA build of torch for python3 and run pnpm install again, or use --workers 2$/);
    expect(fs.existsSync(out)).toBe(false);
  });
});

describe('a checkpoint of one engine resumes on the other', () => {
  // Two epochs of 8 steps on one engine vs the first epoch on one and the second on the other.
  // The engines sum in different orders (float32 rounding, about 1e-4 relative per step at this
  // size: core's forwardTolerance), which 8 more steps grow but do not turn into O(1): a weight
  // read in the wrong layout or a lost momentum buffer changes the second epoch's loss by tens of
  // percent. Measured here: 0 and 1e-4 relative (metrics round the loss to 6 digits); 1e-3.
  for (const [first, second] of [
    ['tfjs', 'torch'],
    ['torch', 'tfjs'],
  ] as const) {
    it(`${first} -> ${second}: the second epoch continues the first engine's run`, async (ctx) => {
      needsEngine(ctx);
      const base = tmp();
      const whole = path.join(base, 'whole');
      const split = path.join(base, 'split');
      const train = (args: string[]) => runCli(ctx, ['train', ...args, '--momentum', '0.9'], { limitMs: 120_000 });
      expect((await train([...small, '--engine', first, '--epochs', '2', '--out', whole])).code).toBe(0);
      expect((await train([...small, '--engine', first, '--epochs', '1', '--out', split])).code).toBe(0);
      const resumed = await train(['--resume', split, '--engine', second, '--epochs', '2']);
      expect(resumed.code, resumed.stderr).toBe(0);
      const [a, b] = [await epochs(whole), await epochs(split)];
      expect(b.map((e) => e.epoch)).toEqual([1, 2]);
      expect(b[0].loss).toBe(a[0].loss); // the same engine, the same first epoch
      expect(Math.abs(b[1].loss - a[1].loss) / a[1].loss).toBeLessThan(1e-3);
      const config = JSON.parse(fs.readFileSync(path.join(split, 'config.json'), 'utf8')) as { settings: { engine: string } };
      expect(config.settings.engine).toBe(second);
    }, testTimeoutFor(3));
  }
});
