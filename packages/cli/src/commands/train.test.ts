import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { Command } from '@commander-js/extra-typings';
import { afterEach, describe, expect, it, vi } from 'vitest';
import { UsageError } from '../errors.js';
import { defaultLogEvery, formatEpochLine, registerTrain } from './train.js';

function program(): Command {
  const p = new Command().name('dtrain').exitOverride().configureOutput({ writeErr: () => {}, writeOut: () => {} });
  registerTrain(p);
  return p;
}

const run = (...args: string[]) => program().parseAsync(['node', 'dtrain', 'train', ...args]);

afterEach(() => {
  vi.restoreAllMocks();
});

describe('dtrain train: flags', () => {
  it('says in one line what is wrong with a flag, before loading anything', async () => {
    const cases: Array<[string[], RegExp]> = [
      [['--dataset', 'fashion-mnist', '--batch-size', '0'], /^--batch-size must be a positive integer, got '0'$/],
      [['--dataset', 'fashion-mnist', '--lr', '-1'], /^--lr must be a positive number, got '-1'$/],
      [['--dataset', 'fashion-mnist', '--momentum', '1'], /^--momentum must be below 1, got '1'$/],
      [['--dataset', 'fashion-mnist', '--augment', 'crop,rotate'], /^--augment takes crop, flip \(comma-separated\), got 'rotate'$/],
      [['--dataset', 'fashion-mnist', '--accumulate', '0'], /^--accumulate must be a positive integer, got '0'$/],
      [['--dataset', 'fashion-mnist', '--nesterov'], /^--nesterov needs a momentum above 0 \(e\.g\. momentum 0\.9\), as torch\.optim\.SGD$/],
      [['--dataset', 'fashion-mnist', '--label-smoothing', '1'], /^--label-smoothing must be below 1 \(0\.1 is usual\), got '1'$/],
      [['--dataset', 'fashion-mnist', '--label-smoothing', '-0.1'], /^--label-smoothing must be a non-negative number, got '-0\.1'$/],
      [['--dataset', 'fashion-mnist', '--epochs', 'two'], /^--epochs must be a positive integer, got 'two'$/],
      [['--dataset', 'fashion-mnist', '--image-size', '6'], /^--image-size must be at least 7/],
      [['--dataset', 'fashion-mnist', '--warmup-epochs', '-1'], /^--warmup-epochs must be a non-negative number, got '-1'$/],
      [['--dataset', 'fashion-mnist', '--lr-schedule', 'step'], /^--lr-milestones must name the epochs from which the step schedule multiplies the rate by lrGamma, e\.g\. --lr-milestones 30,60$/],
      [['--dataset', 'fashion-mnist', '--lr-schedule', 'onecycle', '--warmup-epochs', '1'], /^--warmup-epochs must be 0 with lrSchedule onecycle, which warms up itself \(its first 30%\)$/],
      [['--dataset', 'fashion-mnist', '--lr-milestones', '3,x'], /^--lr-milestones must be comma-separated epochs of at least 1 \(e\.g\. 30,60\), got '3,x'$/],
      [['--dataset', 'fashion-mnist', '--lr-final', '0.001'], /^--lr-final is the end of the cosine schedule \(--lr-schedule cosine\); lrSchedule is 'constant'$/],
      [[], /^choose a data set: --dataset cifar10\|fashion-mnist/],
      [['--dataset', 'mnist'], /^--dataset must be one of cifar10, fashion-mnist, got 'mnist'$/],
      [['--dataset', 'fashion-mnist', '--backend', 'tpu'], /^--backend must be one of cpu, webgpu, gpu, got 'tpu'$/],
    ];
    for (const [args, re] of cases) {
      const err = await run(...args).then(
        () => undefined,
        (e: unknown) => e,
      );
      expect(err, args.join(' ')).toBeInstanceOf(UsageError);
      expect((err as Error).message, args.join(' ')).toMatch(re);
      expect((err as Error).message).not.toContain('\n');
    }
  });

  it('leaves no run folder when the data set is not there, and says how to get it', async () => {
    const dir = await fs.mkdtemp(path.join(os.tmpdir(), 'dtrain-cli-'));
    const data = path.join(dir, 'data');
    const err = await run('--dataset', 'cifar10', '--epochs', '1', '--data-dir', data, '--out', path.join(dir, 'runs', 'cifar10')).then(
      () => undefined,
      (e: unknown) => e as Error & { code?: string },
    );
    expect(err?.code).toBe('DATA_FILE_MISSING');
    expect(err?.message).toBe(
      `${path.join(data, 'cifar-10-batches-bin', 'batches.meta.txt')} does not exist. Run 'pnpm cli data download cifar10 --dir ${data}', ` +
        `or download cifar-10-binary.tar.gz by hand and unpack it there so that ${path.join(data, 'cifar-10-batches-bin', 'data_batch_1.bin')} exists`,
    );
    expect(await fs.readdir(dir)).toEqual([]);
  });

  it('refuses to resume a folder without a checkpoint, naming it', async () => {
    const dir = await fs.mkdtemp(path.join(os.tmpdir(), 'dtrain-cli-'));
    await expect(run('--resume', dir)).rejects.toThrow(new RegExp(`no checkpoint .* in ${dir}`));
  });
});

describe('dtrain train: a tiny real run', () => {
  it('trains on a slice of Fashion-MNIST and prints the epoch line and the summary', async () => {
    const dir = await fs.mkdtemp(path.join(os.tmpdir(), 'dtrain-cli-'));
    const out = path.join(dir, 'run');
    const lines: string[] = [];
    vi.spyOn(console, 'log').mockImplementation((...a: unknown[]) => void lines.push(a.join(' ')));
    vi.spyOn(process.stderr, 'write').mockImplementation(() => true);
    await run('--dataset', 'fashion-mnist', '--epochs', '1', '--limit-train', '32', '--limit-test', '20', '--image-size', '16', '--batch-size', '16', '--out', out);
    expect(lines[0]).toMatch(/^training on 32 images, testing on 20; epochs 1\.\.1, 2 steps per epoch; run folder /);
    expect(lines[1]).toMatch(/^epoch 1\/1 {2}loss \d+\.\d{4} {2}train acc \d+\.\d\d% {2}test acc \d+\.\d\d% {2}test loss \d+\.\d{4} {2}\d+\.\d s {2}\d+\.\d img\/s$/);
    expect(lines[2]).toMatch(new RegExp(`^done: 1 epochs, final test acc .* run folder ${out}$`));
    const summary = JSON.parse(await fs.readFile(path.join(out, 'summary.json'), 'utf8'));
    expect(summary).toMatchObject({ dataset: 'fashion-mnist', epochs: 1, steps: 2, testImages: 20 });
  });
});

describe('defaultLogEvery', () => {
  it('gives an epoch of under 500 steps ten step lines or more, and keeps 50 for longer ones', () => {
    // 3000 Fashion-MNIST images at batch 64 (the README's first run): 47 steps, a line every 4.
    expect([1, 3, 19, 20, 47, 499, 500, 782, 938].map(defaultLogEvery)).toEqual([1, 1, 1, 2, 4, 49, 50, 50, 50]);
  });
});

describe('formatEpochLine', () => {
  it('prints what the tutorial’s trainer prints', () => {
    const line = formatEpochLine({
      kind: 'epoch', epoch: 3, epochs: 20, step: 300, loss: 0.51234, trainAcc: 0.8123, testLoss: 0.42, testAcc: 0.845, testImages: 10000,
      elapsedSec: 123.45, trainSec: 120, evalSec: 3.45, images: 50000, imagesPerSec: 416.7,
      phaseSec: { data: 1, compute: 100, allReduce: 0, optimizer: 18, other: 1 },
      phaseShare: { data: 0.01, compute: 0.83, allReduce: 0, optimizer: 0.15, other: 0.01 },
      worldSize: 1, globalBatch: 64, lr: 0.01, totalElapsedSec: 370, time: '',
    });
    expect(line).toBe('epoch  3/20  loss 0.5123  train acc 81.23%  test acc 84.50%  test loss 0.4200  123.5 s  416.7 img/s');
  });
});
