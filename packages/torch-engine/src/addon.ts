// Finds and loads the native add-on that scripts/build.mjs built at install time, with one line
// saying why when it cannot: not built (no libtorch was found), or built against a libtorch that
// is gone or changed.

import { existsSync, readFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import type { NativeNetSpec } from './spec.js';

/** Where scripts/build.mjs puts the add-on and build-info.json (what it built against, or why it built nothing). */
export const BUILD_DIR = join(dirname(fileURLToPath(import.meta.url)), '..', 'native', 'build');

export interface BuildInfo {
  built: boolean;
  /** Not built: why, and what to do (one line). */
  why?: string;
  /** Built: the libtorch it links (its lib folder), its version and whether it has CUDA. */
  libtorch?: { dir: string; include: string; version: string; cuda: boolean; source: string };
}

export interface NativeEngine {
  step(images: Float32Array, labels: Int32Array, n: number, grads: Float32Array, bucketOf: Int32Array | null, onBucket: ((k: number) => void) | null): Promise<{ loss: number; correct: number }>;
  evaluate(images: Float32Array, labels: Int32Array, n: number): Promise<{ loss: number; correct: number }>;
  predict(images: Float32Array, n: number): Promise<Int32Array>;
  /** One SGD step with the options' momentum, weight decay and Nesterov; `first` starts the momentum buffer. */
  apply(grads: Float32Array, lr: number, first: boolean): void;
  trainStep(images: Float32Array, labels: Int32Array, n: number, lr: number, first: boolean): Promise<{ loss: number; correct: number }>;
  read(what: 'weights' | 'momentum' | 'bnStats', out: Float32Array): void;
  write(what: 'weights' | 'momentum' | 'bnStats', values: Float32Array): void;
  describe(): string;
  close(): void;
}

export interface NativeEngineOptions {
  device: string;
  threads: number;
  precision: string;
  channelsLast: boolean;
  seed: number;
  sgd: { momentum: number; weightDecay: number; nesterov: boolean; skipNormBiasDecay: boolean };
  labelSmoothing: number;
}

interface Addon {
  Engine: new (spec: NativeNetSpec, options: NativeEngineOptions) => NativeEngine;
  libtorchVersion: string;
  cudaDeviceCount(): number;
}

/** The engine cannot run in this installation; the message is one line saying why and what to do. */
export class TorchEngineUnavailableError extends Error {
  readonly code = 'E_TORCH_ENGINE_UNAVAILABLE' as const;
  constructor(message: string) {
    super(message);
    this.name = 'TorchEngineUnavailableError';
  }
}

export function buildInfo(dir = BUILD_DIR): BuildInfo {
  const file = join(dir, 'build-info.json');
  if (!existsSync(file)) return { built: false, why: 'the torch engine was not built: run pnpm install (it builds it where a libtorch is found)' };
  return JSON.parse(readFileSync(file, 'utf8')) as BuildInfo;
}

/** The version the headers of `include` declare now (torch/version.h or torch/headeronly/version.h). */
function headerVersion(include: string): string | undefined {
  const text = [['torch', 'csrc', 'api', 'include', 'torch', 'version.h'], ['torch', 'headeronly', 'version.h']]
    .map((p) => join(include, ...p))
    .filter((f) => existsSync(f))
    .map((f) => readFileSync(f, 'utf8'))
    .join('\n');
  const part = (k: string) => new RegExp(`#define TORCH_VERSION_${k} (\\d+)`).exec(text)?.[1];
  return part('MAJOR') === undefined ? undefined : `${part('MAJOR')}.${part('MINOR')}.${part('PATCH')}`;
}

const loaded = new Map<string, Addon>();

/** The add-on of `dir`, or a TorchEngineUnavailableError of one line: not built, libtorch changed or gone, or not loadable. */
export function loadAddon(dir = BUILD_DIR): Addon {
  const cached = loaded.get(dir);
  if (cached) return cached;
  const info = buildInfo(dir);
  const file = join(dir, 'dtrain_torch.node');
  if (!info.built || !existsSync(file)) throw new TorchEngineUnavailableError(`--engine torch: ${info.why ?? 'the add-on is missing; run pnpm install'}`);
  const lt = info.libtorch!;
  const now = headerVersion(lt.include);
  if (now !== lt.version) {
    throw new TorchEngineUnavailableError(
      `--engine torch: the add-on was built against libtorch ${lt.version} in ${lt.dir}, which ${now === undefined ? 'is gone' : `now holds ${now}`}; run pnpm install to rebuild it`,
    );
  }
  try {
    const addon = createRequire(import.meta.url)(file) as Addon;
    loaded.set(dir, addon);
    return addon;
  } catch (e) {
    const first = String((e as Error).message).split('\n')[0];
    throw new TorchEngineUnavailableError(`--engine torch: the add-on built against libtorch ${lt.version} in ${lt.dir} does not load (${first}); run pnpm install to rebuild it`);
  }
}

/** Whether the engine loads here, with libtorch's version and the GPUs it sees; never throws. */
export function torchEngineStatus(dir = BUILD_DIR): { available: boolean; detail: string; cudaDevices: number; info: BuildInfo } {
  const info = buildInfo(dir);
  try {
    const a = loadAddon(dir);
    const gpus = a.cudaDeviceCount();
    return { available: true, detail: `libtorch ${a.libtorchVersion} from ${info.libtorch?.source} (${info.libtorch?.dir}); ${gpus > 0 ? `${gpus} CUDA GPU(s)` : 'CPU only'}`, cudaDevices: gpus, info };
  } catch (e) {
    return { available: false, detail: (e as Error).message, cudaDevices: 0, info };
  }
}
