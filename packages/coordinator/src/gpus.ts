// Which GPU each local worker gets. The user's CUDA_VISIBLE_DEVICES is the set of GPUs the run may
// use, as for torchrun and Horovod: local rank i gets its i-th entry (an index or a UUID, as CUDA
// takes them); unset, GPU i. Worker i then sees only that GPU, as its device 0.

/** Fewer GPUs are visible than the workers asked for. */
export class GpuSelectionError extends Error {
  readonly code = 'E_GPU_SELECTION' as const;
  override get name(): string {
    return 'GpuSelectionError';
  }
}

/** The GPUs CUDA_VISIBLE_DEVICES lists, in its order; null when it is unset (every GPU visible). */
export function visibleDeviceIds(env: NodeJS.ProcessEnv = process.env): string[] | null {
  const v = env.CUDA_VISIBLE_DEVICES;
  if (v === undefined) return null;
  return v
    .split(',')
    .map((s) => s.trim())
    .filter((s) => s !== '');
}

/** CUDA_VISIBLE_DEVICES for the worker of `localRank`; throws, naming the variable, when too few GPUs are visible. */
export function deviceForLocalRank(localRank: number, localWorkers: number, env: NodeJS.ProcessEnv = process.env): string {
  const ids = visibleDeviceIds(env);
  if (ids === null) return String(localRank);
  if (localWorkers > ids.length) {
    throw new GpuSelectionError(
      `--gpus ${localWorkers}: CUDA_VISIBLE_DEVICES=${JSON.stringify(env.CUDA_VISIBLE_DEVICES)} makes ${ids.length} GPU${ids.length === 1 ? '' : 's'} visible; ` +
        `use --gpus ${ids.length || 'N'} or list more GPUs in CUDA_VISIBLE_DEVICES (unset: every GPU)`,
    );
  }
  return ids[localRank];
}

/**
 * The GPUs of `all` (as nvidia-smi lists them: index, UUID) that CUDA_VISIBLE_DEVICES makes visible,
 * in its order. As CUDA does, an entry matches a GPU by index or by a prefix of its UUID, and the
 * list ends at the first entry that matches none.
 */
export function visibleGpus<G extends { index: number; uuid?: string }>(all: G[], env: NodeJS.ProcessEnv = process.env): G[] {
  const ids = visibleDeviceIds(env);
  if (ids === null) return all;
  const out: G[] = [];
  for (const id of ids) {
    const g = /^\d+$/.test(id) ? all.find((x) => x.index === Number(id)) : all.find((x) => x.uuid !== undefined && id.length >= 4 && x.uuid.startsWith(id));
    if (g === undefined || out.includes(g)) break;
    out.push(g);
  }
  return out;
}
