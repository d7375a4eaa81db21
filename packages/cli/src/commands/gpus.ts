// `--gpus N` on launch and join: N GPUs must be visible to this run (nvidia-smi's GPUs, narrowed
// and ordered by the user's CUDA_VISIBLE_DEVICES), else a usage error that says what there is.
import { listGpus, type GpuInfo } from '@dtrain/backend';
import { visibleGpus } from '@dtrain/coordinator';
import { UsageError } from '../errors.js';

/** The visible GPUs, at least `n` of them; `all` is for tests (default: what nvidia-smi reports). */
export function requireGpus(n: number, env: NodeJS.ProcessEnv = process.env, all: GpuInfo[] = listGpus()): GpuInfo[] {
  const visible = visibleGpus(all, env);
  if (visible.length >= n) return visible;
  const names = all.length ? ` (${all.map((g) => `${g.index}: ${g.name}`).join(', ')})` : '';
  const narrowed = env.CUDA_VISIBLE_DEVICES === undefined ? '' : `, of which CUDA_VISIBLE_DEVICES=${JSON.stringify(env.CUDA_VISIBLE_DEVICES)} makes ${visible.length} visible`;
  throw new UsageError(
    `--gpus ${n}: nvidia-smi reports ${all.length} GPU${all.length === 1 ? '' : 's'} on this machine${names}${narrowed}; ` +
      `use --gpus ${visible.length || 'N'} with fewer workers, or --workers ${n} for CPU workers`,
  );
}
