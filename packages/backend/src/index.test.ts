import { describe, expect, it } from 'vitest';
import { BackendError, listGpus, loadBackend } from './index.js';

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

  it('lists no GPUs on a machine without a driver, and never throws', () => {
    expect(Array.isArray(listGpus())).toBe(true);
  });
});
