// A trained model leaves the project as the tutorial's PyTorch state_dict in a safetensors file
// (`cli export`), and such a file starts a run (`train --init`): names, shapes and layouts from
// @dtrain/core's tutorialStateDict, the format from safetensors.ts.

import fs from 'node:fs/promises';
import { describeResNet, fromPyTorchLayout, toPyTorchLayout, tutorialStateDict, type Architecture, type ResNetConfig, type StateDictEntry } from '@dtrain/core';
import type { Checkpoint } from './checkpoint.js';
import { decodeSafetensors, encodeSafetensors, parseSafetensorsHeader, readSafetensorsHeader, SafetensorsError, type SafeTensor, type SafetensorsHeader } from './safetensors.js';
import { writeFileAtomic } from './files.js';

/** The weights and BatchNorm statistics of a checkpoint as the tutorial module's state_dict, written atomically to `file`. */
export async function exportSafetensors(ck: Checkpoint, file: string): Promise<{ tensors: number; bytes: number }> {
  const arch = describeResNet(ck.header.model.config);
  const tensors = new Map<string, SafeTensor>();
  // PyTorch counts the training batches each BatchNorm has seen; ours are the optimiser's steps.
  const count = BigInt64Array.of(BigInt(ck.header.step));
  for (const e of tutorialStateDict(arch)) {
    const s = e.source;
    const data =
      s.kind === 'param' ? toPyTorchLayout(arch.params[s.index], ck.weights) : s.kind === 'bnStat' ? ck.bnStats.slice(s.offset, s.offset + e.shape[0]) : count;
    tensors.set(e.name, { dtype: e.dtype, shape: e.shape, data });
  }
  const metadata = { format: 'pt', producer: 'dtrain', epoch: String(ck.header.epoch), step: String(ck.header.step), dataset: String(ck.header.settings.dataset) };
  const bytes = encodeSafetensors(tensors, metadata);
  await writeFileAtomic(file, bytes);
  return { tensors: tensors.size, bytes: bytes.length };
}

/**
 * Checks the header of `file` against the tutorial module's state_dict for a network of `config`,
 * as PyTorch's load_state_dict(strict=True): every entry with its shape and dtype, and nothing
 * else; each error names the file and the tensor. Returns the architecture and the entries.
 */
function matchTutorialStateDict(header: SafetensorsHeader, config: ResNetConfig, file: string): { arch: Architecture; expected: StateDictEntry[] } {
  const arch = describeResNet(config);
  const expected = tutorialStateDict(arch);
  for (const e of expected) {
    const t = header.entries.get(e.name);
    if (!t) throw new SafetensorsError(`${file}: no tensor ${e.name} (the tutorial network for ${config.inChannels} channel(s), ${config.classes} classes has ${expected.length} entries)`);
    if (t.shape.join('x') !== e.shape.join('x')) {
      throw new SafetensorsError(`${file}: tensor ${e.name} is [${t.shape.join(', ')}], the network needs [${e.shape.join(', ')}] (another data set's channels or classes?)`);
    }
    if (e.source.kind !== 'bnCount' && t.dtype !== 'F32') throw new SafetensorsError(`${file}: tensor ${e.name} is ${t.dtype}, expected F32`);
  }
  const known = new Set(expected.map((e) => e.name));
  const extra = [...header.entries.keys()].filter((n) => !known.has(n));
  if (extra.length > 0) throw new SafetensorsError(`${file}: tensors the network does not have: ${extra.slice(0, 5).join(', ')}${extra.length > 5 ? `, ... (${extra.length})` : ''}`);
  return { arch, expected };
}

const cannotRead = (file: string) => (err: NodeJS.ErrnoException): never => {
  if (err instanceof SafetensorsError) throw err;
  throw new SafetensorsError(`${file}: cannot read it (${err.code ?? err.message}); --init takes a .safetensors file, e.g. one written by pnpm cli export`);
};

/**
 * What can be checked of an --init file before a run starts, from its header alone (a few KiB of
 * a 45 MB file): names, shapes, dtypes, byte ranges. readInitFile checks the values.
 */
export async function checkInitFile(file: string, config: ResNetConfig): Promise<void> {
  const header = await readSafetensorsHeader(file).catch(cannotRead(file));
  matchTutorialStateDict(header, config, file);
}

/**
 * The flat weights and BatchNorm statistics (TensorFlow layouts) of the tutorial module's
 * state_dict in `file`, for a network of `config` (checked as checkInitFile does; every value
 * must be finite).
 */
export async function readInitFile(file: string, config: ResNetConfig): Promise<{ weights: Float32Array; bnStats: Float32Array; arch: Architecture }> {
  const bytes = await fs.readFile(file).catch(cannotRead(file));
  const header = parseSafetensorsHeader(bytes, bytes.length, file);
  const { arch, expected } = matchTutorialStateDict(header, config, file);
  const { tensors } = decodeSafetensors(bytes, file, header);
  const weights = new Float32Array(arch.paramCount);
  const bnStats = new Float32Array(arch.bnStatCount);
  for (const e of expected) {
    if (e.source.kind === 'bnCount') continue;
    const values = tensors.get(e.name)!.data as Float32Array;
    const bad = values.findIndex((v) => !Number.isFinite(v));
    if (bad >= 0) throw new SafetensorsError(`${file}: tensor ${e.name} holds ${values[bad]} at ${bad}`);
    if (e.source.kind === 'param') fromPyTorchLayout(arch.params[e.source.index], values, weights);
    else bnStats.set(values, e.source.offset);
  }
  return { weights, bnStats, arch };
}
