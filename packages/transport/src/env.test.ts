import { describe, expect, it } from 'vitest';
import { workerEnv, WORKER_GLIBC_TUNABLES } from './env.js';

describe('workerEnv', () => {
  it('adds the malloc tunables and keeps what the user set (theirs last, so they win)', () => {
    expect(workerEnv({ PATH: '/bin' })).toEqual({ PATH: '/bin', GLIBC_TUNABLES: WORKER_GLIBC_TUNABLES });
    expect(workerEnv({ GLIBC_TUNABLES: 'glibc.malloc.arena_max=2' }).GLIBC_TUNABLES).toBe(
      `${WORKER_GLIBC_TUNABLES}:glibc.malloc.arena_max=2`,
    );
  });
});
