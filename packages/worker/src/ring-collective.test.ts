// RingCollective across real processes and sockets, against the naive in-process reference
// (createInProcessGroup: rank-order float32 sums, one division).
import { fork } from 'node:child_process';
import { hostname } from 'node:os';
import { fileURLToPath } from 'node:url';
import { describe, expect, it } from 'vitest';
import { createInProcessGroup } from './collective.js';
import { inputOf, type CollectiveCase } from './testing/collective-proc.js';

const PROC = fileURLToPath(new URL('./testing/collective-proc.ts', import.meta.url));

async function runRing(worldSize: number, cases: CollectiveCase[]): Promise<Float32Array[][]> {
  const children = Array.from({ length: worldSize }, () =>
    fork(PROC, [], { execArgv: ['--import', 'tsx'], stdio: ['ignore', 'inherit', 'inherit', 'ipc'], serialization: 'advanced' }),
  );
  const endpoints: string[][] = new Array(worldSize);
  let seen = 0;
  const results = children.map(
    (child, rank) =>
      new Promise<Float32Array[]>((resolve, reject) => {
        const timer = setTimeout(() => reject(new Error(`rank ${rank} did not finish within 60 s`)), 60_000);
        child.on('exit', (code) => {
          if (code !== 0) reject(new Error(`rank ${rank} exited with code ${code}`));
        });
        child.on('message', (m: { type: string; endpoints?: string[]; results?: Float32Array[] }) => {
          if (m.type === 'endpoints') {
            endpoints[rank] = m.endpoints!;
            if (++seen === worldSize) {
              const peers = endpoints.map((e, r) => ({ rank: r, host: hostname(), endpoints: e }));
              for (const c of children) c.send({ type: 'peers', peers });
            }
          } else if (m.type === 'results') {
            clearTimeout(timer);
            resolve(m.results!);
          }
        });
        child.send({ type: 'init', rank, worldSize, cases });
      }),
  );
  try {
    return await Promise.all(results);
  } finally {
    for (const c of children) if (c.exitCode === null) c.kill('SIGKILL');
  }
}

async function reference(worldSize: number, cases: CollectiveCase[]): Promise<Float32Array[]> {
  const group = createInProcessGroup(worldSize);
  const out: Float32Array[] = [];
  for (const k of cases) {
    const bufs = group.map((_, r) => inputOf(k, r));
    await Promise.all(
      group.map((g, r) => (k.op === 'mean' ? g.allReduceMean(bufs[r]) : k.op === 'sum' ? g.allReduceSum(bufs[r]) : g.broadcast(bufs[r], k.root ?? 0))),
    );
    out.push(bufs[0]);
  }
  return out;
}

const ULP = 2 ** -23;
const bytes = (a: Float32Array) => Buffer.from(a.buffer, a.byteOffset, a.byteLength);

describe('RingCollective over real processes', () => {
  it('3 ranks: mean, sum and broadcast match the naive reference; every rank holds the same bits', async () => {
    const n = 3;
    // 1.5M floats: several 4 MiB pieces per chunk; 7 and 2: fewer elements than ranks in a chunk.
    const cases: CollectiveCase[] = [
      { op: 'mean', len: 1_500_001, seed: 1 },
      { op: 'sum', len: 7, seed: 2 },
      { op: 'sum', len: 2, seed: 3 },
      { op: 'broadcast', len: 1_100_000, root: 1, seed: 4 },
      { op: 'broadcast', len: 5, root: 2, seed: 5 },
      { op: 'mean', len: 3, seed: 6 },
    ];
    const [ring, ref] = await Promise.all([runRing(n, cases), reference(n, cases)]);
    cases.forEach((k, i) => {
      for (let r = 1; r < n; r++) {
        expect(bytes(ring[r][i]).equals(bytes(ring[0][i])), `case ${i} (${k.op}) rank ${r} vs rank 0`).toBe(true);
      }
      const got = ring[0][i];
      const want = ref[i];
      expect(got.length).toBe(k.len);
      if (k.op === 'broadcast') {
        expect(bytes(got).equals(bytes(inputOf(k, k.root ?? 0))), `case ${i}: broadcast is an exact copy`).toBe(true);
        return;
      }
      // Ring order differs from rank order by rounding only: (n+1) ulps of the sum of magnitudes.
      const inputs = Array.from({ length: n }, (_, r) => inputOf(k, r));
      let worst = 0;
      for (let j = 0; j < k.len; j++) {
        let mag = 0;
        for (const x of inputs) mag += Math.abs(x[j]);
        if (k.op === 'mean') mag /= n;
        const bound = (n + 1) * ULP * mag + 1e-45;
        worst = Math.max(worst, Math.abs(got[j] - want[j]) / bound);
      }
      expect(worst, `case ${i} (${k.op}): worst error in units of the bound`).toBeLessThanOrEqual(1);
    });
  });
});
