import { describe, expect, it } from 'vitest';
import { BackendError, listGpus, loadBackend, requireGpuDevice } from './index.js';

describe('loadBackend', () => {
  it('loads the native CPU backend and computes on it', async () => {
    const b = await loadBackend('cpu');
    expect(b.tf.getBackend()).toBe('tensorflow');
    expect(b.versions.tfjs).toMatch(/^\d+\.\d+\.\d+$/);
    const y = b.tf.matMul(b.tf.tensor2d([[1, 2]]), b.tf.tensor2d([[3], [4]]));
    expect(Array.from(y.dataSync())).toEqual([11]);
    y.dispose();
  });

  it('refuses to switch kinds within one process', async () => {
    await loadBackend('cpu');
    await expect(loadBackend('gpu')).rejects.toBeInstanceOf(BackendError);
  });

  it('a TensorFlow that registered no GPU device is refused for GPU training, naming the CUDA libraries', async () => {
    // The native library here registers only the CPU, as libtensorflow-gpu does when the CUDA 11
    // libraries are missing: --gpus must then fail, never run on the CPU.
    const b = await loadBackend('cpu');
    // The flag the check reads exists on the native backend (false here), so it is not a typo.
    expect((b.tf.backend() as unknown as { isUsingGpuDevice?: unknown }).isUsingGpuDevice).toBe(false);
    expect(() => requireGpuDevice(b.tf)).toThrow(BackendError);
    expect(() => requireGpuDevice(b.tf)).toThrow(/registered no GPU device.*libcudart\.so\.11\.0.*--workers N/s);
  });

  it('lists no GPUs on a machine without a driver, and never throws', () => {
    expect(Array.isArray(listGpus())).toBe(true);
  });
});
