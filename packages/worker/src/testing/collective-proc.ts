// A worker process for ring-collective.test.ts: forked with an IPC channel, it joins a real ring
// over real sockets (127.0.0.1) and runs the collectives it is told to through RingCollective.
import { Ring, type PeerInfo } from '@dtrain/transport';
import { RingCollective } from '../ring-collective.js';

export interface CollectiveCase {
  op: 'mean' | 'sum' | 'broadcast';
  len: number;
  root?: number;
  seed: number;
}

/** Deterministic inputs per (case, rank): mixed signs and magnitudes, so rounding shows. */
export function inputOf(c: CollectiveCase, rank: number): Float32Array {
  const out = new Float32Array(c.len);
  let s = (c.seed * 2654435761 + rank * 40503 + 1) >>> 0;
  for (let i = 0; i < c.len; i++) {
    s = (Math.imul(s, 1664525) + 1013904223) >>> 0;
    const u = s / 2 ** 32 - 0.5;
    out[i] = u * 10 ** ((s >>> 28) % 4 - 1);
  }
  return out;
}

type Msg = { type: 'init'; rank: number; worldSize: number; cases: CollectiveCase[] } | { type: 'peers'; peers: PeerInfo[] };

function next(type: Msg['type']): Promise<Msg> {
  return new Promise((resolve) => {
    const on = (m: Msg) => {
      if (m.type === type) {
        process.off('message', on);
        resolve(m);
      }
    };
    process.on('message', on);
  });
}

async function main(): Promise<void> {
  const init = (await next('init')) as Extract<Msg, { type: 'init' }>;
  const ring = await Ring.create({ rank: init.rank, worldSize: init.worldSize, timeoutMs: 20_000, runId: 'collective-test' });
  process.send!({ type: 'endpoints', endpoints: ring.endpoints });
  const { peers } = (await next('peers')) as Extract<Msg, { type: 'peers' }>;
  await ring.connect(peers);
  const c = new RingCollective(ring);
  const results: Float32Array[] = [];
  for (const k of init.cases) {
    const buf = inputOf(k, init.rank);
    if (k.op === 'mean') await c.allReduceMean(buf);
    else if (k.op === 'sum') await c.allReduceSum(buf);
    else await c.broadcast(buf, k.root ?? 0);
    results.push(buf);
  }
  await ring.close();
  process.send!({ type: 'results', results, stats: c.stats() }, () => process.disconnect());
}

main().catch((e: unknown) => {
  console.error(e);
  process.exit(2);
});
