// Which backend `--gpus N` trains on. Each candidate is loaded in a child process first (one
// process holds one backend; a broken CUDA or Vulkan install must not take the CLI down, and Dawn
// keeps a process alive while it holds the GPU), in order of preference:
//   gpu    tfjs-node-gpu: TensorFlow's CUDA kernels, but only with CUDA 11.2 / cuDNN 8.1;
//   webgpu Dawn on the machine's Vulkan driver: any GPU of today (CUDA 12/13 machines included).
// `--backend` names one and skips the others. Never a silent CPU run: when none works, the error
// says why for each.
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import { createRequire } from 'node:module';
import { listGpus, type WebGpuAdapterInfo } from '@dtrain/backend';
import { UsageError } from '../errors.js';
import { requireGpus } from './gpus.js';

export const GPU_BACKENDS = ['gpu', 'webgpu'] as const;
export type GpuBackend = (typeof GPU_BACKENDS)[number];

export const BACKEND_NAMES: Record<GpuBackend | 'cpu', string> = {
  cpu: 'cpu (tfjs-node)',
  gpu: 'gpu (tfjs-node-gpu, CUDA 11.2)',
  webgpu: 'webgpu (Dawn)',
};

export type Probe = { ok: true; versions: { tfjs: string; tensorflow: string }; adapter?: WebGpuAdapterInfo } | { ok: false; error: string };

/** Loads backend `kind` in a child process and reports what it found (or its error's first line). */
export function probeBackend(kind: GpuBackend, allowSoftwareGpu: boolean): Probe {
  const entry = createRequire(import.meta.url).resolve('@dtrain/backend');
  const script =
    `import(${JSON.stringify(entry)}).then(async (b) => { const l = await b.loadBackend(${JSON.stringify(kind)}, { allowSoftwareGpu: ${allowSoftwareGpu} }); ` +
    `console.log(JSON.stringify({ versions: l.versions, adapter: l.adapter })); process.exit(0); })` +
    `.catch((e) => { console.error(e.message.split('\\n')[0]); process.exit(3); });`;
  const r = spawnSync(process.execPath, ['--import', 'tsx', '-e', script], { encoding: 'utf8', timeout: 120_000, env: { ...process.env, TF_CPP_MIN_LOG_LEVEL: '2' } });
  if (r.status !== 0) {
    const why = r.stderr.trim().split('\n').pop() || (r.signal ? `killed by ${r.signal}${r.error ? ` (${r.error.message})` : ''}` : `exit code ${r.status}`);
    return { ok: false, error: why };
  }
  const found = JSON.parse(r.stdout.trim().split('\n').pop() ?? '{}') as Omit<Extract<Probe, { ok: true }>, 'ok'>;
  return { ok: true, ...found };
}

function hasNvidiaDriver(): boolean {
  return fs.existsSync('/proc/driver/nvidia/version') || listGpus().length > 0;
}

export interface GpuPlan {
  backend: GpuBackend;
  /** Several workers on one GPU (the software GPU, or --share-gpu). */
  shared: boolean;
  /** The run's first line: backend, device, how the workers are placed. */
  line: string;
}

export interface GpuChoice {
  backend?: GpuBackend;
  allowSoftwareGpu: boolean;
  shareGpu: boolean;
}

/** The backend `--gpus n` uses on this machine, or a UsageError naming what each candidate lacks. */
export function chooseGpuBackend(n: number, c: GpuChoice, probe: (kind: GpuBackend, allowSoftware: boolean) => Probe = probeBackend, nvidia = hasNvidiaDriver): GpuPlan {
  const reasons: string[] = [];
  for (const kind of c.backend ? [c.backend] : GPU_BACKENDS) {
    if (kind === 'gpu' && !nvidia()) {
      reasons.push(`${BACKEND_NAMES.gpu}: no NVIDIA driver`);
      continue;
    }
    const p = probe(kind, c.allowSoftwareGpu);
    if (!p.ok) {
      reasons.push(`${BACKEND_NAMES[kind]}: ${p.error.replace(/\.$/, '')}`);
      continue;
    }
    if (kind === 'gpu') {
      if (c.shareGpu) throw new UsageError('--share-gpu applies to the webgpu backend; the gpu backend gives each worker its own GPU');
      const gpus = requireGpus(n);
      return { backend: 'gpu', shared: false, line: `GPU backend: ${BACKEND_NAMES.gpu}, TensorFlow ${p.versions.tensorflow}; ${n} worker${n > 1 ? 's' : ''} on ${gpus.map((g) => `GPU ${g.index} (${g.name})`).join(', ')}` };
    }
    const a = p.adapter!;
    const device = `${a.description || a.device}${a.software ? ', a SOFTWARE GPU on the CPU (--allow-software-gpu)' : ''}`;
    if (n > 1 && !a.software && !c.shareGpu) {
      throw new UsageError(
        `--gpus ${n} on ${BACKEND_NAMES.webgpu}: WebGPU cannot open the i-th of several GPUs, so all ${n} workers would train on ${device}. ` +
          `Give --share-gpu to run them on that one GPU on purpose, or --gpus 1.`,
      );
    }
    const shared = n > 1;
    return { backend: 'webgpu', shared, line: `GPU backend: ${BACKEND_NAMES.webgpu} on ${device}; ${n} worker${n > 1 ? 's' : ''}${shared ? ' sharing it' : ''}` };
  }
  throw new UsageError(`--gpus ${n}: no GPU backend works on this machine: ${reasons.join('; ')}. Use --workers ${n} to train on the CPU.`);
}

/** The torch engine as a child process finds it (loading libtorch and counting CUDA GPUs). */
export function probeTorchEngine(): { available: boolean; detail: string; cudaDevices: number } {
  const entry = createRequire(import.meta.url).resolve('@dtrain/torch-engine');
  const script = `import(${JSON.stringify(entry)}).then((t) => { const s = t.torchEngineStatus(); console.log(JSON.stringify({ available: s.available, detail: s.detail, cudaDevices: s.cudaDevices })); process.exit(0); })`;
  const r = spawnSync(process.execPath, ['--import', 'tsx', '-e', script], { encoding: 'utf8', timeout: 120_000 });
  if (r.status !== 0) return { available: false, detail: r.stderr.trim().split('\n').pop() || `the probe exited with ${r.status ?? r.signal}`, cudaDevices: 0 };
  return JSON.parse(r.stdout.trim().split('\n').pop() ?? '{}') as ReturnType<typeof probeTorchEngine>;
}

/**
 * `--gpus n --engine torch`: libtorch on CUDA, worker i on the i-th GPU (CUDA_VISIBLE_DEVICES), or
 * all n on the first with --share-gpu; a UsageError naming what is missing otherwise.
 */
export function chooseTorchGpus(n: number, shareGpu: boolean, probe = probeTorchEngine): GpuPlan {
  const t = probe();
  if (!t.available) throw new UsageError(`--gpus ${n} ${t.detail.replace(/^--engine torch: /, '--engine torch: ')}. Use --workers ${n} to train on the CPU.`);
  if (t.cudaDevices === 0) throw new UsageError(`--gpus ${n} --engine torch: the libtorch in use sees no CUDA GPU (${t.detail}); install a CUDA build of torch for python3 and run pnpm install again, or use --workers ${n}`);
  if (shareGpu) return { backend: 'gpu', shared: n > 1, line: `GPU engine: torch (${t.detail}); ${n} worker${n > 1 ? 's sharing' : ' on'} the first GPU` };
  const gpus = requireGpus(n);
  return { backend: 'gpu', shared: false, line: `GPU engine: torch (${t.detail}); ${n} worker${n > 1 ? 's' : ''} on ${gpus.map((g) => `GPU ${g.index} (${g.name})`).join(', ')}` };
}
