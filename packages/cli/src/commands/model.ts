import { Command, Option } from '@commander-js/extra-typings';
import { describeResNet, TUTORIAL_CONFIG, type Architecture } from '@dtrain/core';
import { positiveInt } from '../errors.js';

const fmt = (n: number) => n.toLocaleString('en-US');

export function formatSummary(a: Architecture): string {
  const rows = a.layers.map((l) => [l.name, l.type, `[${l.outputShape.join(', ')}]`, fmt(l.params), (l.flops / 1e6).toFixed(1)]);
  const head = ['layer', 'type', 'output (H, W, C)', 'params', 'MFLOPs'];
  const widths = head.map((h, i) => Math.max(h.length, ...rows.map((r) => r[i].length)));
  const line = (r: string[]) => r.map((c, i) => (i >= 3 ? c.padStart(widths[i]) : c.padEnd(widths[i]))).join('  ');
  const c = a.config;
  return [
    `ResNet (tutorial definition): input ${c.imageSize}x${c.imageSize}x${c.inChannels}, ${c.classes} classes`,
    '',
    line(head),
    widths.map((w) => '-'.repeat(w)).join('  '),
    ...rows.map(line),
    '',
    `trainable parameters:        ${fmt(a.paramCount)} (${((a.paramCount * 4) / 1e6).toFixed(1)} MB as float32: the all-reduce payload)`,
    `BatchNorm running stats:     ${fmt(a.bnStatCount)} (not trained; averaged across workers before evaluation)`,
    `forward FLOPs per image:     ${(a.flopsPerImage / 1e9).toFixed(3)} GFLOP (a multiply-add counts 2)`,
    `training FLOPs per image:    ~${((3 * a.flopsPerImage) / 1e9).toFixed(3)} GFLOP (forward + backward ~ 3x forward)`,
  ].join('\n');
}

export function registerModel(program: Command) {
  const model = program.command('model').description('Inspect the network');
  model
    .command('summary')
    .description('Layers, output shapes, parameter counts and FLOPs of the ResNet')
    .addOption(new Option('--in-channels <n>', 'input channels (3 for CIFAR-10, 1 for Fashion-MNIST)').default(TUTORIAL_CONFIG.inChannels).argParser(positiveInt('--in-channels')))
    .addOption(new Option('--classes <n>', 'number of classes').default(TUTORIAL_CONFIG.classes).argParser(positiveInt('--classes')))
    .addOption(new Option('--image-size <px>', 'square input size').default(TUTORIAL_CONFIG.imageSize).argParser(positiveInt('--image-size')))
    .option('--json', 'print JSON instead of a table')
    .action((opts) => {
      const a = describeResNet({ inChannels: opts.inChannels, classes: opts.classes, imageSize: opts.imageSize });
      if (opts.json) {
        const { config, layers, paramCount, bnStatCount, flopsPerImage, params } = a;
        console.log(JSON.stringify({ config, paramCount, bnStatCount, flopsPerImage, layers, params: params.map(({ name, shape, offset }) => ({ name, shape, offset })) }, null, 2));
      } else {
        console.log(formatSummary(a));
      }
    });
}
