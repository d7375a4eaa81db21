// The choice `--gpus N` makes, with the probes replaced by their possible answers (the real probes
// run in gpu-launch.test.ts, on the software GPU).
import { describe, expect, it } from 'vitest';
import type { WebGpuAdapterInfo } from '@dtrain/backend';
import { UsageError } from '../errors.js';
import { chooseGpuBackend, type GpuBackend, type Probe } from './gpu-backend.js';

const limits = { maxStorageBufferBindingSize: 2 ** 31, maxBufferSize: 2 ** 32 };
const H100: WebGpuAdapterInfo = { vendor: 'nvidia', architecture: 'hopper', device: 'NVIDIA H100 80GB HBM3', description: 'NVIDIA H100 80GB HBM3', software: false, ...limits };
const LVP: WebGpuAdapterInfo = { vendor: 'mesa', architecture: '', device: 'llvmpipe', description: 'llvmpipe (LLVM 15)', software: true, ...limits };
const versions = { tfjs: '4.22.0', tensorflow: 'none (WebGPU)' };
const CUDA11_MISSING = 'TensorFlow loaded but registered no GPU device';

/** Probes answering from a table; records which were asked. */
function probes(table: Partial<Record<GpuBackend, Probe | ((allowSoftware: boolean) => Probe)>>) {
  const asked: GpuBackend[] = [];
  const probe = (kind: GpuBackend, allowSoftware: boolean): Probe => {
    asked.push(kind);
    const p = table[kind];
    if (p === undefined) throw new Error(`probe ${kind} not expected`);
    return typeof p === 'function' ? p(allowSoftware) : p;
  };
  return { asked, probe };
}
const choice = { allowSoftwareGpu: false, shareGpu: false };

describe('--gpus N picks the GPU backend that works here', () => {
  it('takes WebGPU where tfjs-node-gpu cannot find CUDA 11 (today\'s GPU machines), and says so in the first line', () => {
    const p = probes({ gpu: { ok: false, error: CUDA11_MISSING }, webgpu: { ok: true, versions, adapter: H100 } });
    const plan = chooseGpuBackend(1, choice, p.probe, () => true);
    expect(p.asked).toEqual(['gpu', 'webgpu']);
    expect(plan).toEqual({ backend: 'webgpu', shared: false, line: 'GPU backend: webgpu (Dawn) on NVIDIA H100 80GB HBM3; 1 worker' });
  });

  it('does not try tfjs-node-gpu without an NVIDIA driver', () => {
    const p = probes({ webgpu: { ok: true, versions, adapter: H100 } });
    expect(chooseGpuBackend(1, choice, p.probe, () => false).backend).toBe('webgpu');
    expect(p.asked).toEqual(['webgpu']);
  });

  it('tries only the backend --backend names', () => {
    const p = probes({ webgpu: { ok: false, error: 'no WebGPU adapter: ...' } });
    expect(() => chooseGpuBackend(2, { ...choice, backend: 'webgpu' }, p.probe, () => true)).toThrow('--gpus 2: no GPU backend works on this machine: webgpu (Dawn): no WebGPU adapter: ... Use --workers 2 to train on the CPU.');
    expect(p.asked).toEqual(['webgpu']);
  });

  it('never runs several workers on one GPU by accident: --share-gpu asks for it', () => {
    const p = probes({ gpu: { ok: false, error: CUDA11_MISSING }, webgpu: { ok: true, versions, adapter: H100 } });
    expect(() => chooseGpuBackend(4, choice, p.probe, () => true)).toThrow(UsageError);
    expect(() => chooseGpuBackend(4, choice, p.probe, () => true)).toThrow(/^--gpus 4 on webgpu \(Dawn\): WebGPU cannot open the i-th of several GPUs, so all 4 workers would train on NVIDIA H100 80GB HBM3\. Give --share-gpu/);
    expect(chooseGpuBackend(4, { ...choice, shareGpu: true }, p.probe, () => true)).toMatchObject({ backend: 'webgpu', shared: true, line: 'GPU backend: webgpu (Dawn) on NVIDIA H100 80GB HBM3; 4 workers sharing it' });
  });

  it('uses a software GPU only with --allow-software-gpu, and then lets the workers share it', () => {
    const webgpu = (allow: boolean): Probe => (allow ? { ok: true, versions, adapter: LVP } : { ok: false, error: 'the only WebGPU adapter is a software one (llvmpipe (LLVM 15)) ... --allow-software-gpu to use it anyway.' });
    expect(() => chooseGpuBackend(2, choice, probes({ webgpu }).probe, () => false)).toThrow(/webgpu \(Dawn\): the only WebGPU adapter is a software one .*--allow-software-gpu/);
    const plan = chooseGpuBackend(2, { ...choice, allowSoftwareGpu: true }, probes({ webgpu }).probe, () => false);
    expect(plan).toMatchObject({ backend: 'webgpu', shared: true });
    expect(plan.line).toBe('GPU backend: webgpu (Dawn) on llvmpipe (LLVM 15), a SOFTWARE GPU on the CPU (--allow-software-gpu); 2 workers sharing it');
  });

  it('names what each backend lacks when none works', () => {
    const p = probes({ gpu: { ok: false, error: CUDA11_MISSING }, webgpu: { ok: false, error: 'no WebGPU adapter' } });
    expect(() => chooseGpuBackend(1, choice, p.probe, () => true)).toThrow(
      `--gpus 1: no GPU backend works on this machine: gpu (tfjs-node-gpu, CUDA 11.2): ${CUDA11_MISSING}; webgpu (Dawn): no WebGPU adapter. Use --workers 1 to train on the CPU.`,
    );
  });
});
