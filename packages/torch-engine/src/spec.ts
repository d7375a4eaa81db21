// The network description the native engine builds its network from: Architecture (what
// `model summary` prints) with parameter names resolved to indices, so the C++ side reads
// indices and numbers only, and cannot hold a second hand-written copy of the network.

import { BN_MOMENTUM, type Architecture, type BatchNormSpec, type ConvLayerSpec } from '@dtrain/core';

export interface NativeConv {
  name: string;
  kernel: number;
  stride: number;
  padding: number;
  /** Parameter indices; bias -1: none. */
  weight: number;
  bias: number;
}

export interface NativeBatchNorm {
  name: string;
  channels: number;
  eps: number;
  gamma: number;
  beta: number;
  /** Offset of the running mean in the flat statistics (the variance follows it). */
  statOffset: number;
}

export interface NativeNetSpec {
  inChannels: number;
  classes: number;
  imageSize: number;
  stemConv: NativeConv;
  stemBn: NativeBatchNorm;
  blocks: Array<{ name: string; conv1: NativeConv; bn1: NativeBatchNorm; conv2: NativeConv; bn2: NativeBatchNorm; shortcut: NativeConv | null }>;
  fcWeight: number;
  fcBias: number;
  bnMomentum: number;
  params: Array<{ name: string; shape: number[]; offset: number; size: number; init: string; fanIn: number; fanOut: number }>;
  paramCount: number;
  bnStatCount: number;
}

export function nativeNetSpec(arch: Architecture): NativeNetSpec {
  const index = new Map(arch.params.map((p, i) => [p.name, i]));
  const param = (name: string): number => {
    const i = index.get(name);
    if (i === undefined) throw new Error(`architecture: no parameter ${name}`);
    return i;
  };
  const statOffsets = new Map<string, number>();
  let offset = 0;
  for (const bn of arch.batchNorms) {
    statOffsets.set(bn.name, offset);
    offset += 2 * bn.channels;
  }
  const conv = (c: ConvLayerSpec): NativeConv => ({
    name: c.name,
    kernel: c.kernel,
    stride: c.stride,
    padding: c.padding,
    weight: param(`${c.name}.weight`),
    bias: c.bias ? param(`${c.name}.bias`) : -1,
  });
  const bn = (b: BatchNormSpec): NativeBatchNorm => ({
    name: b.name,
    channels: b.channels,
    eps: b.eps,
    gamma: param(`${b.name}.gamma`),
    beta: param(`${b.name}.beta`),
    statOffset: statOffsets.get(b.name)!,
  });
  return {
    ...arch.config,
    stemConv: conv(arch.stemConv),
    stemBn: bn(arch.stemBn),
    blocks: arch.blocks.map((b) => ({ name: b.name, conv1: conv(b.conv1), bn1: bn(b.bn1), conv2: conv(b.conv2), bn2: bn(b.bn2), shortcut: b.shortcut ? conv(b.shortcut) : null })),
    fcWeight: param('head.fc.weight'),
    fcBias: param('head.fc.bias'),
    bnMomentum: BN_MOMENTUM,
    params: arch.params.map((p) => ({ name: p.name, shape: p.shape, offset: p.offset, size: p.size, init: p.init, fanIn: p.fanIn ?? 0, fanOut: p.fanOut ?? 0 })),
    paramCount: arch.paramCount,
    bnStatCount: arch.bnStatCount,
  };
}
