// The network as the tutorial's PyTorch module holds it: a state_dict's names, shapes and layouts,
// so that weights leave the project (`cli export`) and come back (`train --init`).
//
// The tutorial builds the network as one nn.Sequential:
//   0  nn.Sequential(Conv2d(C, 64, 7, 2), BatchNorm2d(64, eps=1e-3), ReLU)   0.0.weight, 0.1.running_mean
//   1  MaxPool2d(3, 2, 1)
//   2-5  one nn.Sequential per stage of two Residual blocks (conv1, bn1, conv2, bn2, and conv3,
//      the 1x1 shortcut, where the shape changes)                          2.0.conv1.weight, 3.0.conv3.bias
//   6  AdaptiveAvgPool2d(1), 7 Flatten, 8 Linear(512, classes)               8.weight
// PyTorch's layouts: conv weights [out, in, kh, kw], Linear [out, in]; ours (TensorFlow's) are
// [kh, kw, in, out] and [in, out]. BatchNorm's gamma / beta are its weight / bias.

import type { Architecture, ParamSpec } from './architecture.js';

export type StateDictSource =
  | { kind: 'param'; index: number }
  /** Running mean or variance: `offset` into the flat BatchNorm statistics. */
  | { kind: 'bnStat'; offset: number }
  /** BatchNorm's num_batches_tracked (int64, one value). */
  | { kind: 'bnCount' };

export interface StateDictEntry {
  name: string;
  /** PyTorch's shape. */
  shape: number[];
  dtype: 'F32' | 'I64';
  source: StateDictSource;
}

/** Our layer name -> the tutorial module's path: stem.conv -> 0.0, stage2.block1.shortcut -> 3.0.conv3, head.fc -> 8. */
export function pytorchModulePath(layer: string): string {
  if (layer === 'stem.conv') return '0.0';
  if (layer === 'stem.bn') return '0.1';
  if (layer === 'head.fc') return '8';
  const m = /^stage([1-4])\.block([12])\.(conv1|bn1|conv2|bn2|shortcut)$/.exec(layer);
  if (!m) throw new RangeError(`no PyTorch name for layer '${layer}'`);
  return `${Number(m[1]) + 1}.${Number(m[2]) - 1}.${m[3] === 'shortcut' ? 'conv3' : m[3]}`;
}

const SUFFIX: Record<string, string> = { weight: 'weight', bias: 'bias', gamma: 'weight', beta: 'bias' };

/** PyTorch's shape of a parameter: conv [out, in, kh, kw], Linear [out, in], vectors as they are. */
function pytorchShape(p: ParamSpec): number[] {
  if (p.shape.length === 4) return [p.shape[3], p.shape[2], p.shape[0], p.shape[1]];
  if (p.shape.length === 2) return [p.shape[1], p.shape[0]];
  return p.shape.slice();
}

/** Every entry of the tutorial module's state_dict, in its order (parameters, then each BatchNorm's buffers after its own parameters). */
export function tutorialStateDict(arch: Architecture): StateDictEntry[] {
  const entries: StateDictEntry[] = [];
  const bnOffset = new Map<string, number>();
  let offset = 0;
  for (const bn of arch.batchNorms) {
    bnOffset.set(bn.name, offset);
    offset += 2 * bn.channels;
  }
  arch.params.forEach((p, index) => {
    const dot = p.name.lastIndexOf('.');
    const [layer, kind] = [p.name.slice(0, dot), p.name.slice(dot + 1)];
    entries.push({ name: `${pytorchModulePath(layer)}.${SUFFIX[kind]}`, shape: pytorchShape(p), dtype: 'F32', source: { kind: 'param', index } });
    const at = bnOffset.get(layer);
    if (kind === 'beta' && at !== undefined) {
      const c = p.shape[0];
      const path = pytorchModulePath(layer);
      entries.push({ name: `${path}.running_mean`, shape: [c], dtype: 'F32', source: { kind: 'bnStat', offset: at } });
      entries.push({ name: `${path}.running_var`, shape: [c], dtype: 'F32', source: { kind: 'bnStat', offset: at + c } });
      entries.push({ name: `${path}.num_batches_tracked`, shape: [], dtype: 'I64', source: { kind: 'bnCount' } });
    }
  });
  return entries;
}

/** Index into a TensorFlow-layout tensor of the element at PyTorch-layout position `i` (row-major). */
function tensorflowIndex(p: ParamSpec, i: number): number {
  if (p.shape.length === 4) {
    const [kh, kw, cin, cout] = p.shape;
    const x = i % kw;
    const y = Math.floor(i / kw) % kh;
    const c = Math.floor(i / (kw * kh)) % cin;
    const o = Math.floor(i / (kw * kh * cin));
    return ((y * kw + x) * cin + c) * cout + o;
  }
  if (p.shape.length === 2) {
    const [fin, fout] = p.shape;
    return (i % fin) * fout + Math.floor(i / fin);
  }
  return i;
}

/** Parameter `p` of the flat weights (TensorFlow layouts) in PyTorch's layout. */
export function toPyTorchLayout(p: ParamSpec, weights: Float32Array): Float32Array {
  const out = new Float32Array(p.size);
  for (let i = 0; i < p.size; i++) out[i] = weights[p.offset + tensorflowIndex(p, i)];
  return out;
}

/** Writes `values` (PyTorch's layout) into parameter `p` of the flat weights (TensorFlow layouts). */
export function fromPyTorchLayout(p: ParamSpec, values: Float32Array, weights: Float32Array): void {
  for (let i = 0; i < p.size; i++) weights[p.offset + tensorflowIndex(p, i)] = values[i];
}
