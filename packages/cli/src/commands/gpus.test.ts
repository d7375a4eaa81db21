import { describe, expect, it } from 'vitest';
import { UsageError } from '../errors.js';
import { requireGpus } from './gpus.js';

const H100 = [0, 1, 2, 3].map((index) => ({ index, uuid: `GPU-${index}000`, name: 'NVIDIA H100 80GB HBM3', memoryMiB: 81559 }));

describe('--gpus N: N GPUs visible to this run', () => {
  it("the GPUs CUDA_VISIBLE_DEVICES lists, in its order, are the run's", () => {
    expect(requireGpus(2, { CUDA_VISIBLE_DEVICES: '3,2' }, H100).map((g) => g.index)).toEqual([3, 2]);
    expect(requireGpus(4, {}, H100)).toHaveLength(4);
  });

  it('too few: a usage error that says what nvidia-smi sees, what CUDA_VISIBLE_DEVICES leaves, and what to do', () => {
    expect(() => requireGpus(3, { CUDA_VISIBLE_DEVICES: '2,3' }, H100)).toThrow(UsageError);
    expect(() => requireGpus(3, { CUDA_VISIBLE_DEVICES: '2,3' }, H100)).toThrow(
      '--gpus 3: nvidia-smi reports 4 GPUs on this machine (0: NVIDIA H100 80GB HBM3, 1: NVIDIA H100 80GB HBM3, 2: NVIDIA H100 80GB HBM3, 3: NVIDIA H100 80GB HBM3), ' +
        'of which CUDA_VISIBLE_DEVICES="2,3" makes 2 visible; use --gpus 2 with fewer workers, or --workers 3 for CPU workers',
    );
    expect(() => requireGpus(1, {}, [])).toThrow('--gpus 1: nvidia-smi reports 0 GPUs on this machine; use --gpus N with fewer workers, or --workers 1 for CPU workers');
  });
});
