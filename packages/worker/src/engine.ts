// Which engine computes the network (settings.engine): TensorFlow.js on its backend, or the
// libtorch engine. The trainer gets a model factory and the versions to record; nothing else in
// it knows which engine runs.

import { loadBackend } from '@dtrain/backend';
import { ResNet, type ResNetConfig, type TrainableModel } from '@dtrain/core';
import type { TrainSettings } from './settings.js';
import { TrainSettingsError } from './errors.js';

export interface ModelEngine {
  create(config: ResNetConfig): TrainableModel;
  /** Recorded in config.json: what computed the run. */
  versions: Record<string, string>;
  /** webgpu: the adapter, whose buffer limits bound the batch. */
  adapter?: import('@dtrain/backend').WebGpuAdapterInfo;
}

const DTRAIN_VERSION = '0.1.0';

/** Loads the engine of `s` (once per process for tfjs's backend); errors name the flag to change. */
export async function loadEngine(s: TrainSettings, localWorkers?: number): Promise<ModelEngine> {
  const sgd = { lr: s.lr, momentum: s.momentum, weightDecay: s.weightDecay, nesterov: s.nesterov, skipNormBiasDecay: s.skipNormBiasDecay };
  const labelSmoothing = s.labelSmoothing;
  if (s.engine === 'torch') {
    const torch = await import('@dtrain/torch-engine');
    const status = torch.torchEngineStatus();
    if (!status.available) throw new TrainSettingsError('engine', status.detail);
    const device = s.backend === 'gpu' ? 'cuda' : 'cpu';
    if (device === 'cuda' && status.cudaDevices === 0) {
      throw new TrainSettingsError('engine', `--engine torch --gpus: the libtorch in use (${status.detail}) sees no CUDA GPU; install a CUDA build of torch for python3 and run pnpm install again`);
    }
    return {
      // channels-last on GPUs, where tensor cores want NHWC; NCHW on the CPU (measured faster: tools/bench).
      create: (config) => new torch.TorchResNet(config, { seed: s.seed, sgd, labelSmoothing, device, localWorkers, precision: s.precision, channelsLast: device === 'cuda' }),
      versions: { dtrain: DTRAIN_VERSION, engine: 'torch', libtorch: status.detail, node: process.versions.node },
    };
  }
  const backend = await loadBackend(s.backend, { allowSoftwareGpu: s.allowSoftwareGpu, shareGpu: s.shareGpu, localWorkers });
  return {
    create: (config) => new ResNet(config, { seed: s.seed, sgd, labelSmoothing }),
    versions: { dtrain: DTRAIN_VERSION, engine: 'tfjs', tfjs: backend.versions.tfjs, tensorflow: backend.versions.tensorflow, node: process.versions.node, backendPackage: backend.packageName },
    adapter: backend.adapter,
  };
}
