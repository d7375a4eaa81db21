import { describe, expect, it } from 'vitest';
import { deviceForLocalRank, GpuSelectionError, visibleDeviceIds, visibleGpus } from './gpus.js';

const GPUS = [0, 1, 2, 3].map((index) => ({ index, uuid: `GPU-${index}a5e1c0d-0000-0000-0000-00000000000${index}` }));

describe('the GPU of each local worker', () => {
  it('unset: worker i gets GPU i', () => {
    expect(visibleDeviceIds({})).toBeNull();
    expect([0, 1, 2].map((i) => deviceForLocalRank(i, 3, {}))).toEqual(['0', '1', '2']);
  });

  it("set: worker i gets the i-th GPU the user listed, indexes or UUIDs, in the user's order", () => {
    const env = { CUDA_VISIBLE_DEVICES: '2, 3' };
    expect(visibleDeviceIds(env)).toEqual(['2', '3']);
    expect([0, 1].map((i) => deviceForLocalRank(i, 2, env))).toEqual(['2', '3']);
    const uuids = { CUDA_VISIBLE_DEVICES: `${GPUS[3].uuid},${GPUS[1].uuid}` };
    expect([0, 1].map((i) => deviceForLocalRank(i, 2, uuids))).toEqual([GPUS[3].uuid, GPUS[1].uuid]);
  });

  it('more workers than visible GPUs: refused, naming the variable and what to do', () => {
    expect(() => deviceForLocalRank(0, 3, { CUDA_VISIBLE_DEVICES: '2,3' })).toThrow(GpuSelectionError);
    expect(() => deviceForLocalRank(0, 3, { CUDA_VISIBLE_DEVICES: '2,3' })).toThrow('--gpus 3: CUDA_VISIBLE_DEVICES="2,3" makes 2 GPUs visible; use --gpus 2 or list more GPUs in CUDA_VISIBLE_DEVICES (unset: every GPU)');
    // Empty: CUDA's way of hiding every GPU.
    expect(() => deviceForLocalRank(0, 1, { CUDA_VISIBLE_DEVICES: '' })).toThrow(/makes 0 GPUs visible; use --gpus N/);
  });
});

describe("visibleGpus: nvidia-smi's list as CUDA_VISIBLE_DEVICES narrows it", () => {
  it('unset: all of them', () => {
    expect(visibleGpus(GPUS, {})).toEqual(GPUS);
  });
  it('by index or UUID prefix, in the listed order', () => {
    expect(visibleGpus(GPUS, { CUDA_VISIBLE_DEVICES: '3,1' }).map((g) => g.index)).toEqual([3, 1]);
    expect(visibleGpus(GPUS, { CUDA_VISIBLE_DEVICES: 'GPU-2a5e,0' }).map((g) => g.index)).toEqual([2, 0]);
  });
  // CUDA documents the first; the second is ours: two workers on one GPU never happen by accident.
  it('the list ends at the first entry that names no GPU, or one already listed', () => {
    expect(visibleGpus(GPUS, { CUDA_VISIBLE_DEVICES: '1,7,2' }).map((g) => g.index)).toEqual([1]);
    expect(visibleGpus(GPUS, { CUDA_VISIBLE_DEVICES: '1,1,2' }).map((g) => g.index)).toEqual([1]);
    expect(visibleGpus(GPUS, { CUDA_VISIBLE_DEVICES: '' })).toEqual([]);
  });
});
