// WebGPU in Node: Dawn's binding (npm `webgpu`, dawn.node ships in its tarball) under TensorFlow.js's
// WebGPU backend. Runs on any GPU with a Vulkan driver (a real one, or Mesa's lavapipe on the CPU,
// which `pnpm setup:software-gpu` unpacks into .cache/software-gpu for tests): no CUDA, no
// libtensorflow.
//
// Order matters: the Vulkan loader of the software GPU is loaded by path before Dawn starts (Dawn
// dlopen()s "libvulkan.so.1" by name, see native/loader.c), and tfjs's backend module checks
// `navigator.gpu` when it is imported.
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { nativeLoader } from './native.js';

export interface WebGpuAdapterInfo {
  vendor: string;
  architecture: string;
  device: string;
  description: string;
  /** A CPU implementation (Mesa's llvmpipe, SwiftShader): for tests, never for a user's training by accident. */
  software: boolean;
  /** The largest storage buffer one binding can see, and the largest buffer, in bytes. */
  maxStorageBufferBindingSize: number;
  maxBufferSize: number;
}

/** What tools/software-gpu/setup.sh wrote: the ICD file and the libraries to load first. */
export interface SoftwareGpu {
  dir: string;
  icd: string;
  preload: string[];
  mesa: string;
}

const REPO_ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..', '..');

/** The software GPU of this checkout ($DTRAIN_SOFTWARE_GPU_DIR or .cache/software-gpu), if set up. */
export function softwareGpu(env: NodeJS.ProcessEnv = process.env): SoftwareGpu | null {
  const dir = env.DTRAIN_SOFTWARE_GPU_DIR ?? path.join(REPO_ROOT, '.cache', 'software-gpu');
  const file = path.join(dir, 'software-gpu.json');
  if (!fs.existsSync(file)) return null;
  const m = JSON.parse(fs.readFileSync(file, 'utf8')) as Omit<SoftwareGpu, 'dir'>;
  return { dir, ...m };
}

let gpu: GPU | undefined;

/**
 * Dawn's GPU object, once per process, also set as `navigator.gpu`. The software GPU's ICD is added
 * to the drivers Vulkan finds (VK_ADD_DRIVER_FILES), so a real GPU's driver stays visible beside it.
 */
export async function openWebGpu(): Promise<GPU> {
  if (gpu) return gpu;
  const sw = softwareGpu();
  if (sw) {
    const loader = nativeLoader();
    if (!loader) throw new Error(`the software GPU in ${sw.dir} needs @dtrain/backend's native module (pnpm install builds it)`);
    for (const lib of sw.preload) loader.preload(lib);
    process.env.VK_ADD_DRIVER_FILES = [process.env.VK_ADD_DRIVER_FILES, sw.icd].filter(Boolean).join(':');
  }
  const { create, globals } = await import('webgpu');
  Object.assign(globalThis, globals);
  gpu = create([]);
  const g = globalThis as { navigator?: { gpu?: GPU } };
  g.navigator ??= {};
  g.navigator.gpu = gpu;
  return gpu;
}

export function adapterInfo(a: GPUAdapter): WebGpuAdapterInfo {
  const i = a.info as GPUAdapterInfo & { isFallbackAdapter?: boolean };
  return {
    vendor: i.vendor,
    architecture: i.architecture,
    device: i.device,
    description: i.description,
    software: i.isFallbackAdapter === true || /llvmpipe|lavapipe|swiftshader/i.test(`${i.device} ${i.description}`),
    maxStorageBufferBindingSize: a.limits.maxStorageBufferBindingSize,
    maxBufferSize: a.limits.maxBufferSize,
  };
}

/**
 * The adapters Dawn offers, each once. WebGPU has no enumeration: this asks for the
 * high-performance, the low-power and the fallback adapter.
 */
export async function listWebGpuAdapters(): Promise<WebGpuAdapterInfo[]> {
  const g = await openWebGpu();
  const found = new Map<string, WebGpuAdapterInfo>();
  const asks: GPURequestAdapterOptions[] = [{ powerPreference: 'high-performance' }, { powerPreference: 'low-power' }, { forceFallbackAdapter: true }];
  for (const ask of asks) {
    const a = await g.requestAdapter(ask);
    if (!a) continue;
    const info = adapterInfo(a);
    found.set(`${info.vendor}|${info.architecture}|${info.device}|${info.description}`, info);
  }
  return [...found.values()];
}
