/**
 * glibc malloc settings for worker processes. zeromq.js hands every large received message to
 * JavaScript as its own buffer, allocated by libzmq and freed when V8 collects it; with glibc's
 * defaults those multi-megabyte blocks are mmap'ed and munmap'ed each time, so every byte received
 * also costs a page fault and zeroing. Keeping them in the heap measured about 25% less CPU and
 * time per all-reduce at 4 ranks (tools/bench/allreduce.ts, rows "default malloc" vs the others).
 * It must be in the environment when the process starts: launchers pass `workerEnv()` to spawn.
 * The cost: up to trim_threshold bytes of freed memory stay mapped in each worker.
 */
export const WORKER_GLIBC_TUNABLES = 'glibc.malloc.mmap_threshold=134217728:glibc.malloc.trim_threshold=536870912';

/** `base` plus WORKER_GLIBC_TUNABLES (kept after any tunables already set, which win). */
export function workerEnv(base: NodeJS.ProcessEnv = process.env): NodeJS.ProcessEnv {
  const existing = base.GLIBC_TUNABLES;
  return { ...base, GLIBC_TUNABLES: existing ? `${WORKER_GLIBC_TUNABLES}:${existing}` : WORKER_GLIBC_TUNABLES };
}
