// `dtrain export RUN_DIR [--format safetensors] [--checkpoint last|best|FILE] [--out FILE]`: the
// trained network as the tutorial's PyTorch state_dict, for model.load_state_dict(load_file(...)).
import fs from 'node:fs';
import path from 'node:path';
import { Command, Option } from '@commander-js/extra-typings';
import { BEST_CHECKPOINT, exportSafetensors, readCheckpoint, readLatestCheckpoint } from '@dtrain/worker';
import { UsageError, oneOf } from '../errors.js';

const FORMATS = ['safetensors'] as const;

/** The checkpoint `which` names in `runDir`: its newest, its best (best.ckpt), or a file. */
async function chooseCheckpoint(runDir: string, which: string) {
  if (which === 'last') return readLatestCheckpoint(runDir);
  const file = which === 'best' ? path.join(runDir, BEST_CHECKPOINT) : path.resolve(which);
  if (!fs.existsSync(file)) throw new UsageError(which === 'best' ? `${runDir} has no ${BEST_CHECKPOINT} (runs write it since it exists; --checkpoint last takes the newest)` : `--checkpoint ${which}: no such file`);
  return readCheckpoint(file);
}

export function registerExport(program: Command): void {
  program
    .command('export')
    .description('Write a run’s trained network as the tutorial’s PyTorch state_dict (names such as 0.0.weight, 2.0.conv1.weight; PyTorch layouts) in a safetensors file')
    .argument('<run-dir>', 'the run folder')
    .addOption(new Option('--format <f>', 'file format').choices(FORMATS).argParser(oneOf('--format', FORMATS)).default('safetensors' as const))
    .option('--checkpoint <which>', 'last (the newest checkpoint), best (best.ckpt: the best test accuracy) or a checkpoint file', 'last')
    .option('--out <file>', 'where to write it (default: RUN_DIR/model.safetensors, best.safetensors with --checkpoint best)')
    .action(async (dir, o) => {
      const runDir = path.resolve(dir);
      if (!fs.existsSync(runDir)) throw new UsageError(`${dir}: no such run folder`);
      const ck = await chooseCheckpoint(runDir, o.checkpoint);
      const out = path.resolve(o.out ?? path.join(runDir, o.checkpoint === 'best' ? 'best.safetensors' : 'model.safetensors'));
      const r = await exportSafetensors(ck, out);
      console.log(`wrote ${out}: ${r.tensors} tensors, ${(r.bytes / 1e6).toFixed(1)} MB, from ${path.basename(ck.file)} (epoch ${ck.header.epoch}, step ${ck.header.step})`);
      console.log(`in PyTorch: model.load_state_dict(safetensors.torch.load_file('${out}')) on the tutorial's module (tools/export/tutorial_resnet.py)`);
    });
}
