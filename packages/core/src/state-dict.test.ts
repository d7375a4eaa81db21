import { describe, expect, it } from 'vitest';
import { describeResNet } from './architecture.js';
import { firstDifference } from './testing/model-checks.js';
import { fromPyTorchLayout, pytorchModulePath, toPyTorchLayout, tutorialStateDict } from './state-dict.js';

describe('the tutorial module’s state_dict', () => {
  const arch = describeResNet({ inChannels: 1, classes: 10, imageSize: 32 });
  const entries = tutorialStateDict(arch);

  it('names every parameter and BatchNorm buffer as the tutorial’s nn.Sequential does, with PyTorch’s shapes', () => {
    expect(entries.slice(0, 7).map((e) => `${e.name} ${e.shape.join('x')}`)).toEqual([
      '0.0.weight 64x1x7x7',
      '0.0.bias 64',
      '0.1.weight 64',
      '0.1.bias 64',
      '0.1.running_mean 64',
      '0.1.running_var 64',
      '0.1.num_batches_tracked ',
    ]);
    const byName = new Map(entries.map((e) => [e.name, e]));
    expect(byName.get('2.0.conv1.weight')?.shape).toEqual([64, 64, 3, 3]);
    expect(byName.get('3.0.conv3.weight')?.shape).toEqual([128, 64, 1, 1]);
    expect(byName.get('3.0.conv3.bias')?.shape).toEqual([128]);
    expect(byName.get('5.1.bn2.running_var')?.shape).toEqual([512]);
    expect(byName.get('8.weight')?.shape).toEqual([10, 512]);
    expect(byName.get('8.bias')?.shape).toEqual([10]);
    // Every parameter once, and three buffers per BatchNorm (PyTorch's 17 BatchNorms here).
    expect(entries.length).toBe(arch.params.length + 3 * arch.batchNorms.length);
    expect(new Set(entries.map((e) => e.name)).size).toBe(entries.length);
    expect(() => pytorchModulePath('stage5.block1.conv1')).toThrow(/no PyTorch name/);
  });

  it('moves conv weights from [kh, kw, in, out] to [out, in, kh, kw] and Linear from [in, out] to [out, in], and back', () => {
    const weights = Float32Array.from({ length: arch.paramCount }, (_, i) => i);
    const conv = arch.params.find((p) => p.name === 'stage2.block1.conv1.weight')!; // [3, 3, 64, 128]
    const pt = toPyTorchLayout(conv, weights);
    // Element (y 1, x 2, in 5, out 7): TensorFlow ((1*3 + 2)*64 + 5)*128 + 7; PyTorch ((7*64 + 5)*3 + 1)*3 + 2.
    expect(pt[((7 * 64 + 5) * 3 + 1) * 3 + 2]).toBe(conv.offset + ((1 * 3 + 2) * 64 + 5) * 128 + 7);
    const fc = arch.params.find((p) => p.name === 'head.fc.weight')!; // [512, 10]
    expect(toPyTorchLayout(fc, weights)[3 * 512 + 100]).toBe(fc.offset + 100 * 10 + 3);
    const back = new Float32Array(arch.paramCount);
    for (const p of arch.params) fromPyTorchLayout(p, toPyTorchLayout(p, weights), back);
    expect(firstDifference(back, weights)).toBe(-1);
  });
});
