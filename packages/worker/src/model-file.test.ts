// The trained network out (exportSafetensors) and back in (readInitFile, --init): the file format
// against a file of known values, the mapping bitwise both ways, each refusal in one line, a run
// started from a file, and, where a python3 with torch is found, PyTorch itself loading the file
// into the tutorial's module and computing the same evaluation.

import { spawnSync } from 'node:child_process';
import fs from 'node:fs/promises';
import path from 'node:path';
import { beforeAll, describe, expect, it } from 'vitest';
import { loadBackend } from '@dtrain/backend';
import { describeResNet, ResNet } from '@dtrain/core';
import { BatchAssembler } from '@dtrain/data';
import { firstDifference, forwardTolerance, randomBatch } from '@dtrain/core/testing';
import { readLatestCheckpoint } from './checkpoint.js';
import { checkInitFile, exportSafetensors, readInitFile } from './model-file.js';
import { runTraining } from './run.js';
import { decodeSafetensors, encodeSafetensors } from './safetensors.js';
import { syntheticData, tempDir } from './testing/helpers.js';

const REPO = path.resolve(import.meta.dirname, '../../..');

beforeAll(async () => {
  await loadBackend('cpu');
});

describe('safetensors', () => {
  it('writes the layout the format defines (header length, JSON header, little-endian data) and reads it back', () => {
    const file = encodeSafetensors(
      new Map([
        ['a', { dtype: 'F32' as const, shape: [2], data: Float32Array.of(1.5, -2) }],
        ['n', { dtype: 'I64' as const, shape: [], data: BigInt64Array.of(7n) }],
      ]),
      { format: 'pt' },
    );
    const headerLength = Number(file.readBigUInt64LE(0));
    expect(headerLength % 8).toBe(0);
    expect(JSON.parse(file.subarray(8, 8 + headerLength).toString())).toEqual({
      __metadata__: { format: 'pt' },
      a: { dtype: 'F32', shape: [2], data_offsets: [0, 8] },
      n: { dtype: 'I64', shape: [], data_offsets: [8, 16] },
    });
    expect([...file.subarray(8 + headerLength)]).toEqual([0, 0, 0xc0, 0x3f, 0, 0, 0, 0xc0, 7, 0, 0, 0, 0, 0, 0, 0]);
    const back = decodeSafetensors(file, 'f');
    expect(back.tensors.get('a')).toEqual({ dtype: 'F32', shape: [2], data: Float32Array.of(1.5, -2) });
    expect(back.tensors.get('n')?.data).toEqual(BigInt64Array.of(7n));
  });

  it('refuses what is not safetensors, or a tensor whose bytes do not fit, naming the file', () => {
    expect(() => decodeSafetensors(Buffer.from('hello'), 'x.bin')).toThrow(/^x\.bin: 5 bytes: not a safetensors file/);
    expect(() => decodeSafetensors(Buffer.alloc(64, 0x41), 'x.bin')).toThrow(/^x\.bin: header length \d+ does not fit the file's 64 bytes/);
    const good = encodeSafetensors(new Map([['a', { dtype: 'F32' as const, shape: [4], data: new Float32Array(4) }]]));
    expect(() => decodeSafetensors(good.subarray(0, good.length - 4), 'cut.safetensors')).toThrow(/^cut\.safetensors: tensor a: bytes \[0, 16\) do not hold its shape \[4\]/);
  });
});

describe('export and --init', () => {
  let dir: string;
  let file: string;
  const data = syntheticData(48, 32, 16, 1);

  beforeAll(async () => {
    dir = await tempDir();
    await runTraining({ data, out: path.join(dir, 'run'), settings: { epochs: 2, batchSize: 16, lr: 0.05, momentum: 0.9, seed: 2 } });
    file = path.join(dir, 'model.safetensors');
    await exportSafetensors(await readLatestCheckpoint(path.join(dir, 'run')), file);
  }, 120_000);

  it('the file holds each weight in PyTorch’s layout and reads back bitwise', async () => {
    const ck = await readLatestCheckpoint(path.join(dir, 'run'));
    const { tensors, metadata } = decodeSafetensors(await fs.readFile(file), file);
    expect(metadata).toMatchObject({ format: 'pt', producer: 'dtrain', epoch: '2' });
    const { arch, weights, bnStats } = await readInitFile(file, ck.header.model.config);
    // One element by hand: stage2.block1.conv1.weight (TensorFlow [3, 3, 64, 128]) at y 2, x 0, in 9, out 100.
    const p = arch.params.find((q) => q.name === 'stage2.block1.conv1.weight')!;
    expect((tensors.get('3.0.conv1.weight')!.data as Float32Array)[((100 * 64 + 9) * 3 + 2) * 3 + 0]).toBe(ck.weights[p.offset + ((2 * 3 + 0) * 64 + 9) * 128 + 100]);
    expect(tensors.get('0.1.num_batches_tracked')!.data).toEqual(BigInt64Array.of(BigInt(ck.header.step)));
    expect(firstDifference(weights, ck.weights)).toBe(-1);
    expect(firstDifference(bnStats, ck.bnStats)).toBe(-1);
  });

  it('refuses a file for another network, a missing or an extra tensor, a truncated file, one line each naming file and tensor (header check and full read alike)', async () => {
    const config = { inChannels: 1, classes: 10, imageSize: 16 };
    const { tensors } = decodeSafetensors(await fs.readFile(file), file);
    const without = new Map(tensors);
    without.delete('8.bias');
    await fs.writeFile(path.join(dir, 'missing.safetensors'), encodeSafetensors(without));
    const extra = new Map(tensors).set('9.weight', { dtype: 'F32', shape: [1], data: new Float32Array(1) });
    await fs.writeFile(path.join(dir, 'extra.safetensors'), encodeSafetensors(extra));
    await fs.writeFile(path.join(dir, 'cut.safetensors'), (await fs.readFile(file)).subarray(0, 100_000));
    for (const check of [checkInitFile, readInitFile]) {
      await expect(check(file, { ...config, inChannels: 3 })).rejects.toThrow(/model\.safetensors: tensor 0\.0\.weight is \[64, 1, 7, 7\], the network needs \[64, 3, 7, 7\]/);
      await expect(check(path.join(dir, 'missing.safetensors'), config)).rejects.toThrow(/missing\.safetensors: no tensor 8\.bias/);
      await expect(check(path.join(dir, 'extra.safetensors'), config)).rejects.toThrow(/extra\.safetensors: tensors the network does not have: 9\.weight/);
      await expect(check(path.join(dir, 'cut.safetensors'), config)).rejects.toThrow(/cut\.safetensors: tensor \S+: bytes \[\d+, \d+\) do not hold its shape/);
      await expect(check(path.join(dir, 'nope.safetensors'), config)).rejects.toThrow(/nope\.safetensors: cannot read it \(ENOENT\)/);
    }
    await expect(checkInitFile(file, config)).resolves.toBeUndefined();
    // Values are the full read's to check: the header check cannot see them.
    const bias = new Float32Array(10);
    bias[3] = NaN;
    await fs.writeFile(path.join(dir, 'nan.safetensors'), encodeSafetensors(new Map(tensors).set('8.bias', { dtype: 'F32', shape: [10], data: bias })));
    await expect(readInitFile(path.join(dir, 'nan.safetensors'), config)).rejects.toThrow(/nan\.safetensors: tensor 8\.bias holds NaN at 3/);
    await expect(checkInitFile(path.join(dir, 'nan.safetensors'), config)).resolves.toBeUndefined();
  });

  it('a run with --init starts from the file: its first step’s loss is the loss of the file’s weights on that batch', async () => {
    const ck = await readLatestCheckpoint(path.join(dir, 'run'));
    const first = async (out: string, initFile?: string) => {
      const steps: { loss: number; indices: Int32Array }[] = [];
      await runTraining({ data, out: path.join(dir, out), settings: { epochs: 1, batchSize: 16, lr: 0.05, seed: 5, ...(initFile ? { initFile } : {}) }, hooks: { onStep: (st) => steps.push(st) } });
      return steps[0];
    };
    const [fresh, init] = [await first('fresh'), await first('init', file)];
    // The reference: the checkpoint's weights in a model of their own, on the same images.
    const model = new ResNet(ck.header.model.config);
    model.setWeights(ck.weights);
    model.setBatchNormStats(ck.bnStats);
    const b = new BatchAssembler(data.train, { height: 16, width: 16 }).assemble(data.train, init.indices);
    const want = (await model.computeGradients({ images: b.x, labels: b.y, n: b.n })).loss;
    model.dispose();
    expect(init.loss).toBe(want);
    expect(fresh.loss).not.toBe(want);
  });

  it('PyTorch loads the file into the tutorial’s module (strict) and evaluates as we do', async (ctx) => {
    const python = process.env.DTRAIN_TORCH_PYTHON ?? 'python3';
    if (spawnSync(python, ['-c', 'import torch'], { encoding: 'utf8' }).status !== 0) ctx.skip(`no PyTorch for ${python} (set DTRAIN_TORCH_PYTHON to a python3 with torch)`);
    const ck = await readLatestCheckpoint(path.join(dir, 'run'));
    const config = ck.header.model.config;
    const batch = randomBatch(8, config.imageSize, config.inChannels, config.classes, 4);
    await fs.writeFile(path.join(dir, 'x.f32'), Buffer.from(batch.images.buffer));
    const r = spawnSync(python, [path.join(REPO, 'tools/export/tutorial_resnet.py'), file, '--channels', '1', '--image-size', String(config.imageSize), '--input', path.join(dir, 'x.f32'), '--n', '8'], { encoding: 'utf8' });
    expect(r.status, r.stderr).toBe(0);
    const out = JSON.parse(r.stdout) as { loaded: number; logits: number[][] };
    // Ours: the same weights in the TensorFlow.js ResNet, evaluation mode.
    const model = new ResNet(config);
    model.setWeights(ck.weights);
    model.setBatchNormStats(ck.bnStats);
    const ours = await model.evaluate(batch);
    const predicted = await model.predict(batch);
    model.dispose();
    const theirs = out.logits.map((row, i) => {
      const m = Math.max(...row);
      const lse = m + Math.log(row.reduce((a, v) => a + Math.exp(v - m), 0));
      return lse - row[batch.labels[i]];
    });
    const theirLoss = theirs.reduce((a, v) => a + v, 0) / theirs.length;
    // Two float32 forward passes summing in different orders: core's forwardTolerance, relative.
    expect(Math.abs(theirLoss - ours.loss) / Math.abs(ours.loss)).toBeLessThan(forwardTolerance(describeResNet(config), 8));
    expect(out.logits.map((row) => row.indexOf(Math.max(...row)))).toEqual(Array.from(predicted));
  }, 120_000);
});
