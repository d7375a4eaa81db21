// Loads TensorFlow.js on the native TensorFlow library: @tensorflow/tfjs-node (CPU) or
// @tensorflow/tfjs-node-gpu (CUDA). Every process that computes (worker, single-process
// trainer, benchmarks, tests) goes through here, so the CPU and GPU paths share all code
// but the one `import` below.
//
// GPU requirements (those of libtensorflow 2.9.1, which tfjs-node-gpu 4.22 binds):
// Linux x86-64, an NVIDIA driver, CUDA 11.2 and cuDNN 8.1 on the library path.

import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import { createRequire } from 'node:module';
import type * as tfTypes from '@tensorflow/tfjs-core';
import { loadQuietly } from './quiet-load.js';
import { adapterInfo, openWebGpu, softwareGpu, type WebGpuAdapterInfo } from './webgpu.js';

/** cpu: libtensorflow on the CPU; gpu: libtensorflow with CUDA 11.2 (tfjs-node-gpu); webgpu: Dawn (webgpu.ts). */
export type BackendKind = 'cpu' | 'gpu' | 'webgpu';
export type Tf = typeof tfTypes;

export class BackendError extends Error {
  readonly code = 'BACKEND_UNAVAILABLE' as const;
  constructor(message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'BackendError';
  }
}

export interface LoadedBackend {
  kind: BackendKind;
  /** The tfjs-core namespace, with the native backend registered and selected. */
  tf: Tf;
  /** Package that provides the backend. */
  packageName: string;
  versions: { tfjs: string; tensorflow: string };
  /** CUDA_VISIBLE_DEVICES as this process sees it (GPU only). */
  visibleGpus?: string;
  /** The adapter in use (webgpu only). */
  adapter?: WebGpuAdapterInfo;
}

export interface LoadOptions {
  /** webgpu: accept a software adapter (lavapipe: tests only; refused otherwise). */
  allowSoftwareGpu?: boolean;
  /**
   * webgpu: workers of the run on this machine. WebGPU offers no way to open the i-th of several
   * GPUs, so with more than one they would all share the first, which is refused unless `shareGpu`.
   */
  localWorkers?: number;
  shareGpu?: boolean;
}

export interface GpuInfo {
  /** nvidia-smi's index (PCI bus order), which CUDA_VISIBLE_DEVICES uses when CUDA_DEVICE_ORDER=PCI_BUS_ID. */
  index: number;
  /** GPU-...: what CUDA_VISIBLE_DEVICES may also name it by. */
  uuid: string;
  name: string;
  memoryMiB: number;
}

const require = createRequire(import.meta.url);
let loaded: LoadedBackend | undefined;
/** The WebGPU device of this process, and who wants to hear when it is lost. */
let webGpuDevice: GPUDevice | undefined;
const deviceLostListeners: Array<(message: string) => void> = [];

/**
 * Calls `listener` once if this process's WebGPU device is lost (driver reset, GPU fallen off the
 * bus, out of memory in the driver...): nothing on it can be trusted or read back after that.
 */
export function onDeviceLost(listener: (message: string) => void): void {
  deviceLostListeners.push(listener);
}

/** FOR TESTS: loses this process's WebGPU device, as a driver reset would. */
export function destroyWebGpuDevice(): void {
  if (!webGpuDevice) throw new BackendError('this process has no WebGPU device to lose');
  webGpuDevice.destroy();
}

/** Every GPU the NVIDIA driver reports, whatever CUDA_VISIBLE_DEVICES says; [] when there is no driver or no GPU. */
export function listGpus(): GpuInfo[] {
  try {
    const out = execFileSync('nvidia-smi', ['--query-gpu=index,uuid,name,memory.total', '--format=csv,noheader,nounits'], {
      encoding: 'utf8',
      timeout: 10_000,
      stdio: ['ignore', 'pipe', 'ignore'],
    });
    return out
      .trim()
      .split('\n')
      .filter(Boolean)
      .map((line) => {
        const [index, uuid, name, mem] = line.split(',').map((s) => s.trim());
        return { index: Number(index), uuid: uuid ?? '', name: name ?? '?', memoryMiB: Number(mem) };
      });
  } catch {
    return [];
  }
}

/**
 * Throws unless TensorFlow registered a GPU device. libtensorflow loads the CUDA libraries by name
 * when it starts (libcudart.so.11.0, libcublas.so.11, libcublasLt.so.11, libcufft.so.10,
 * libcurand.so.10, libcusolver.so.11, libcusparse.so.11, libcudnn.so.8 for 2.9.1); when one is
 * missing it logs a line and goes on with the CPU alone, which would turn `--gpus N` into N CPU
 * workers without a word. A machine whose driver is newer (CUDA 12 or 13 only) is the usual case.
 */
export function requireGpuDevice(tf: Tf): void {
  const usingGpu = (tf.backend() as unknown as { isUsingGpuDevice?: boolean }).isUsingGpuDevice === true;
  if (!usingGpu) {
    throw new BackendError(
      'TensorFlow loaded but registered no GPU device, although the NVIDIA driver is present: it could not load the ' +
        'CUDA 11.2 / cuDNN 8.1 libraries that libtensorflow 2.9.1 needs (libcudart.so.11.0, libcublas.so.11, libcudnn.so.8, ...). ' +
        'Install them (a driver for CUDA 12 or 13 runs them) or put them on LD_LIBRARY_PATH; run with TF_CPP_MIN_LOG_LEVEL=0 ' +
        'to see which library failed. Use --workers N to train on the CPU instead.',
    );
  }
}

/**
 * Loads the backend once per process. For 'gpu', call it after CUDA_VISIBLE_DEVICES is set
 * (the launcher sets it per worker); TensorFlow reads it when the library initialises.
 */
export async function loadBackend(kind: BackendKind = 'cpu', opts: LoadOptions = {}): Promise<LoadedBackend> {
  if (loaded) {
    if (loaded.kind !== kind) {
      throw new BackendError(`this process already loaded the ${loaded.kind} backend; one process cannot switch to ${kind}`);
    }
    return loaded;
  }
  if (kind === 'webgpu') {
    loaded = await loadWebGpuBackend(opts);
    return loaded;
  }
  // TensorFlow's C++ start-up banner is noise on every worker; errors still show (quiet-load.ts).
  process.env.TF_CPP_MIN_LOG_LEVEL ??= '2';
  const packageName = kind === 'gpu' ? '@tensorflow/tfjs-node-gpu' : '@tensorflow/tfjs-node';
  if (kind === 'gpu') {
    const hasDriver = fs.existsSync('/proc/driver/nvidia/version') || listGpus().length > 0;
    if (!hasDriver) {
      throw new BackendError(
        'GPU training was requested, but no NVIDIA driver/GPU is visible on this machine (nvidia-smi finds none). ' +
          'Use --workers N to train on the CPU, or run on a machine with CUDA 11.2 + cuDNN 8.1.',
      );
    }
  }
  let mod: Tf & { version: Record<string, string> };
  try {
    mod = loadQuietly(() => require(packageName));
  } catch (err) {
    const detail = err instanceof Error ? err.message.split('\n')[0] : String(err);
    const hint =
      kind === 'gpu'
        ? 'The GPU addon is built by `pnpm install` when nvidia-smi works (or with DTRAIN_TFJS_GPU=1); it needs libtensorflow 2.9.1 GPU, CUDA 11.2 and cuDNN 8.1.'
        : 'Run `pnpm install` again; tools/provision-tfjs.mjs provisions libtensorflow and builds the addon.';
    throw new BackendError(`cannot load ${packageName}: ${detail}\n${hint}`, { cause: err });
  }
  const tf = mod as Tf;
  if (tf.getBackend() !== 'tensorflow') {
    const ok = await tf.setBackend('tensorflow');
    if (!ok) throw new BackendError(`${packageName} loaded but the 'tensorflow' backend did not initialise`);
  }
  if (kind === 'gpu') requireGpuDevice(tf);
  const bindingVersion = (tf.backend() as unknown as { binding?: { TF_Version?: string } }).binding?.TF_Version;
  loaded = {
    kind,
    tf,
    packageName,
    versions: { tfjs: mod.version['tfjs-node'] ?? mod.version['tfjs-core'] ?? '?', tensorflow: bindingVersion ?? '?' },
    visibleGpus: kind === 'gpu' ? (process.env.CUDA_VISIBLE_DEVICES ?? 'all') : undefined,
  };
  return loaded;
}

/**
 * TensorFlow.js on WebGPU, on the adapter Dawn ranks first (high-performance), with a device that
 * has the adapter's own limits (one 64x96x96x64 float32 activation is 151 MB, above WebGPU's
 * defaults). libtensorflow is not loaded: `@tensorflow/tfjs` registers the gradients.
 */
async function loadWebGpuBackend(opts: LoadOptions): Promise<LoadedBackend> {
  const gpu = await openWebGpu();
  const adapter = await gpu.requestAdapter({ powerPreference: 'high-performance' });
  if (!adapter) {
    const sw = softwareGpu();
    throw new BackendError(
      'no WebGPU adapter: Dawn found no Vulkan driver with a device. On a machine with a GPU, install its Vulkan driver and the Vulkan loader (libvulkan1); ' +
        (sw ? `the software GPU in ${sw.dir} gave none either (run FORCE=1 pnpm setup:software-gpu). ` : 'for the software GPU of the tests, run pnpm setup:software-gpu. ') +
        'Use --workers N to train on the CPU.',
    );
  }
  const info = adapterInfo(adapter);
  if (info.software && opts.allowSoftwareGpu !== true) {
    throw new BackendError(`the only WebGPU adapter is a software one (${info.description}): it runs on the CPU and is meant for tests. Use --workers N to train on the CPU, or --allow-software-gpu to use it anyway.`);
  }
  const sharers = opts.localWorkers ?? 1;
  if (!info.software && sharers > 1 && opts.shareGpu !== true) {
    throw new BackendError(
      `${sharers} workers on this machine would all train on one GPU (${info.description}): WebGPU cannot open the i-th of several GPUs. ` +
        'Give --share-gpu to run them on that GPU on purpose, or --gpus 1.',
    );
  }
  const l = adapter.limits;
  // timestamp-query: tf.profile() then reports each kernel's GPU time (tfjs writes timestamps only while profiling).
  const device = await adapter.requestDevice({
    requiredFeatures: adapter.features.has('timestamp-query') ? ['timestamp-query'] : [],
    requiredLimits: {
      maxStorageBufferBindingSize: l.maxStorageBufferBindingSize,
      maxBufferSize: l.maxBufferSize,
      maxComputeWorkgroupStorageSize: l.maxComputeWorkgroupStorageSize,
      maxComputeWorkgroupsPerDimension: l.maxComputeWorkgroupsPerDimension,
      maxComputeWorkgroupSizeX: l.maxComputeWorkgroupSizeX,
      maxComputeInvocationsPerWorkgroup: l.maxComputeInvocationsPerWorkgroup,
    },
  });
  webGpuDevice = device;
  void device.lost.then((lost) => {
    const message = `the GPU device was lost (${info.description || info.device}; reason: ${lost.reason}${lost.message ? `; ${lost.message.split('\n')[0]}` : ''})`;
    for (const l of deviceLostListeners) l(message);
  });
  const tf = require('@tensorflow/tfjs') as Tf & { version: Record<string, string> };
  const { WebGPUBackend } = require('@tensorflow/tfjs-backend-webgpu') as { WebGPUBackend: new (d: GPUDevice, i?: GPUAdapterInfo) => unknown };
  // Our device, with our limits, in place of the one the module's own factory would open.
  tf.removeBackend('webgpu');
  tf.registerBackend('webgpu', () => new WebGPUBackend(device, adapter.info) as never, 3);
  if (!(await tf.setBackend('webgpu'))) throw new BackendError(`the WebGPU backend did not initialise on ${info.description}`);
  return { kind: 'webgpu', tf, packageName: '@tensorflow/tfjs-backend-webgpu', versions: { tfjs: tf.version['tfjs-core'] ?? '?', tensorflow: 'none (WebGPU)' }, adapter: info };
}

/**
 * Measured float32 matmul throughput of the loaded backend, in GFLOP/s (2*n^3 FLOPs per
 * n x n product): the ceiling that `dtrain doctor` and the train-step benchmark compare with.
 */
export async function measureMatmulGflops(tf: Tf, n = 1024, reps = 10): Promise<number> {
  const a = tf.randomNormal([n, n]);
  const b = tf.randomNormal([n, n]);
  // On a GPU, reading the product back waits for it (WebGPU reads only asynchronously).
  const once = async () => {
    const c = tf.matMul(a, b);
    await c.data();
    c.dispose();
  };
  await once(); // warm-up: uploads the inputs, picks kernels
  await once();
  const t0 = performance.now();
  for (let i = 0; i < reps; i++) await once();
  const seconds = (performance.now() - t0) / 1000;
  tf.dispose([a, b]);
  return (2 * n ** 3 * reps) / seconds / 1e9;
}

export { listWebGpuAdapters, softwareGpu, type SoftwareGpu, type WebGpuAdapterInfo } from './webgpu.js';
