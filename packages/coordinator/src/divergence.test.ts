// The replica-divergence check: every "replicas identical" line of a run rests on it. launch()
// with real worker processes and sockets (testing/fake-worker.ts, FAKE_MODE diverge: one rank
// reports another state hash, which a real worker reaches only through a bug), and the rule
// that picks the reference state on its own.
import { createHash } from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { describe, expect, it } from 'vitest';
import { launch, ReplicaDivergedError } from './index.js';
import { replicaDivergence, type ReplicaState } from './errors.js';

const FAKE = fileURLToPath(new URL('./testing/fake-worker.ts', import.meta.url));
const tmp = () => fs.mkdtempSync(path.join(os.tmpdir(), 'dtrain-diverge-'));
const sha = (s: string) => createHash('sha256').update(s).digest('hex');
const esc = (s: string) => s.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');

describe('launch: the replicas must finish identical', () => {
  it('one rank reports another state hash: the run fails naming that rank, its host and log, and what to do', async () => {
    const runDir = tmp();
    const err = await launch({ workers: 3, entry: FAKE, runDir, config: {}, env: { FAKE_MODE: 'diverge', FAKE_RANK: '2', FAKE_HOSTS: 'node-a,node-a,node-b' } }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(ReplicaDivergedError);
    const e = err as ReplicaDivergedError;
    expect(e.code).toBe('E_REPLICAS_DIVERGED');
    expect(e.diverged.map((s) => [s.rank, s.host])).toEqual([[2, 'node-b']]);
    expect(e.agreeing.map((s) => s.rank)).toEqual([0, 1]);
    const drifted = sha('a replica that drifted').slice(0, 12);
    const replicas = sha('the replicas').slice(0, 12);
    expect(e.message).toMatch(new RegExp(`^the replicas diverged: rank 2 on host node-b \\(state sha256 ${drifted}, log ${esc(path.join(runDir, 'logs', 'rank-2.log'))}\\) finished with another state than ranks 0, 1 \\(state sha256 ${replicas}, the majority\\)`));
    expect(e.message).not.toMatch(/rank [01] on host/);
    expect(e.message).toContain(`rank 0's (${path.join(runDir, 'logs', 'rank-0.log')})`);
    expect(e.message).toMatch(/Next: check that every machine runs the same dtrain, Node\.js and TensorFlow\.js versions .*pnpm cli doctor/);
  });

  it('two workers that disagree: no majority, so rank 1 is named against rank 0', async () => {
    const err = await launch({ workers: 2, entry: FAKE, runDir: tmp(), config: {}, env: { FAKE_MODE: 'diverge', FAKE_RANK: '1', FAKE_HOSTS: 'node-a,node-b' } }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(ReplicaDivergedError);
    expect((err as Error).message).toMatch(/^the replicas diverged: rank 1 on host node-b .* than rank 0 \(state sha256 [0-9a-f]{12}, no majority: compared with rank 0's\)/);
  });

  it('equal hashes pass: the same realistic hashes without a drifting rank complete the run', async () => {
    const r = await launch({ workers: 2, entry: FAKE, runDir: tmp(), config: {}, env: { FAKE_MODE: 'diverge', FAKE_HOSTS: 'node-a,node-b' } });
    expect(r.finals.map((f) => f.stateSha256)).toEqual([sha('the replicas'), sha('the replicas')]);
    expect(r.hosts).toEqual(['node-a', 'node-b']);
  });
});

describe('replicaDivergence: which state is the reference', () => {
  const state = (rank: number, hash: string): ReplicaState => ({ rank, host: `h${rank}`, stateSha256: sha(hash), log: `rank-${rank}.log` });

  it('the majority is the reference, even when rank 0 is the one that differs', () => {
    const d = replicaDivergence([state(0, 'x'), state(1, 'y'), state(2, 'y')])!;
    expect(d.diverged.map((s) => s.rank)).toEqual([0]);
    expect(d.message).toMatch(/^the replicas diverged: rank 0 on host h0 .* than ranks 1, 2 .*the majority\)\. Rank 0 wrote .* from its own copy, one of those that differ\./);
  });

  it('without a majority: the group of rank 0 on a tie, else the largest; every other rank is named', () => {
    const tie = replicaDivergence([state(0, 'a'), state(1, 'a'), state(2, 'b'), state(3, 'b')])!;
    expect(tie.diverged.map((s) => s.rank)).toEqual([2, 3]);
    expect(tie.message).toMatch(/rank 2 on host h2 .*; rank 3 on host h3 .* than ranks 0, 1 .*no majority: compared with rank 0's/);
    const largest = replicaDivergence([state(0, 'a'), state(1, 'b'), state(2, 'b'), state(3, 'c'), state(4, 'd')])!;
    expect(largest.diverged.map((s) => s.rank)).toEqual([0, 3, 4]);
    expect(largest.message).toMatch(/than ranks 1, 2 .*no majority: compared with the most common state/);
  });

  it('all equal (or one rank): nothing to report', () => {
    expect(replicaDivergence([state(0, 'a'), state(1, 'a'), state(2, 'a')])).toBeUndefined();
    expect(replicaDivergence([state(0, 'a')])).toBeUndefined();
  });
});
