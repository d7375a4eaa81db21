// ThreadedRing: the same ring in a thread of its own, driven from this thread. Real sockets,
// real threads; the reference is the ring's own fixed summation order (testing/data.ts).
import { afterEach, describe, expect, it } from 'vitest';
import { PeerLostError, RingAbortedError, RingUsageError } from './errors.js';
import { encodeMessage, transportCounters } from './protocol.js';
import { Ring, type PeerInfo } from './ring.js';
import { ThreadedRing, sharedFloat32Array } from './ring-thread.js';
import { makeData, ringReference, stagedReference } from './testing/data.js';
import * as zmq from 'zeromq';

const cleanup: (() => unknown)[] = [];
afterEach(async () => {
  for (const f of cleanup.splice(0)) await f();
});

type AnyRing = Ring | ThreadedRing;

async function mixedRing(kinds: ('thread' | 'plain')[], timeoutMs = 10_000): Promise<AnyRing[]> {
  const n = kinds.length;
  const rings: AnyRing[] = await Promise.all(
    kinds.map((k, rank) => (k === 'thread' ? ThreadedRing.create({ rank, worldSize: n, timeoutMs }) : Ring.create({ rank, worldSize: n, timeoutMs }))),
  );
  cleanup.push(() => Promise.all(rings.map((r) => r.close())));
  const peers: PeerInfo[] = rings.map((r, rank) => ({ rank, host: r.host, endpoints: r.endpoints }));
  await Promise.all(rings.map((r) => r.connect(peers, { runId: 'thread-test', generation: 1 })));
  return rings;
}

/** Blocks this thread (no event loop turn) until `done()` or `limitMs`; true if done. */
function blockUntil(done: () => boolean, limitMs: number): boolean {
  const cell = new Int32Array(new SharedArrayBuffer(4));
  const end = Date.now() + limitMs;
  while (Date.now() < end) {
    if (done()) return true;
    Atomics.wait(cell, 0, 0, 10);
  }
  return done();
}

describe('ThreadedRing', () => {
  it('all-reduces and broadcasts like Ring, bit for bit, also in a ring with plain Rings', async () => {
    const rings = await mixedRing(['thread', 'plain', 'thread']);
    const spec = { len: 100_003, seed: 5, specials: true };
    const inputs = [0, 1, 2].map((r) => makeData(spec, r));
    const want = ringReference(inputs, { average: true });
    // Rank 0 passes an ordinary array (copied through a staging buffer), rank 2 a shared one.
    const data = inputs.map((a, r) => (r === 2 ? Object.assign(sharedFloat32Array(a.length), {}).fill(0) : Float32Array.from(a)));
    data[2].set(inputs[2]);
    await Promise.all(rings.map((r, i) => r.allReduce(data[i], { average: true })));
    for (const d of data) expect(d).toEqual(want);

    const b = [0, 1, 2].map((r) => makeData({ len: 5000, seed: 9 }, r));
    await Promise.all(rings.map((r, i) => r.broadcast(b[i], 1)));
    for (const d of b) expect(d).toEqual(makeData({ len: 5000, seed: 9 }, 1));
    expect(rings[0].stats().ops).toBe(2);
    expect(rings[0].stats().bytesSent).toBeGreaterThan(0);
    expect(rings[2].rank).toBe(2);
    expect(rings[2].generation).toBe(1);
  });

  it('reduces the buckets handed over while this thread is blocked (the overlap with a backward pass)', async () => {
    const rings = (await mixedRing(['thread', 'thread'])) as ThreadedRing[];
    const len = 300_000;
    const buckets: [number, number][] = [[200_000, 300_000], [50_000, 200_000], [0, 50_000]];
    const inputs = [0, 1].map((r) => makeData({ len, seed: 11 }, r));
    const want = stagedReference(inputs, buckets, { average: true });
    const data = inputs.map((a) => {
      const s = sharedFloat32Array(len);
      s.set(a);
      return s;
    });
    const staged = rings.map((r, i) => r.allReduceStaged(data[i], buckets, { average: true }));
    // Bucket 0 is ready, then both "backward passes" block this thread: the threads reduce it meanwhile.
    for (const s of staged) s.ready(0);
    const first = buckets[0];
    const reducedMeanwhile = blockUntil(() => data.every((d) => d.subarray(first[0], first[1]).every((v, i) => v === want[first[0] + i])), 20_000);
    expect(reducedMeanwhile).toBe(true);
    // Later buckets may be declared ready in any order.
    for (const s of staged) s.ready(2);
    for (const s of staged) s.ready(1);
    await Promise.all(staged.map((s) => s.done));
    for (const d of data) expect(d).toEqual(want);
    expect(() => staged[0].ready(3)).toThrow(RingUsageError);
    expect(() => rings[0].allReduceStaged(new Float32Array(4), [[0, 4]])).toThrow(/SharedArrayBuffer/);
  });

  it('abort() rejects a staged all-reduce waiting for its next bucket with RingAbortedError', async () => {
    const rings = (await mixedRing(['thread', 'thread'])) as ThreadedRing[];
    const data = rings.map(() => sharedFloat32Array(1000).fill(1));
    const staged = rings.map((r, i) => r.allReduceStaged(data[i], [[0, 500], [500, 1000]]));
    for (const s of staged) s.ready(0);
    await new Promise((r) => setTimeout(r, 200));
    const t0 = Date.now();
    for (const r of rings) r.abort('the coordinator declared rank 3 lost');
    for (const s of staged) {
      const e = await s.done.then(() => undefined, (err: unknown) => err);
      expect(e).toBeInstanceOf(RingAbortedError);
      expect((e as Error).message).toMatch(/declared rank 3 lost/);
    }
    expect(Date.now() - t0).toBeLessThan(4000); // the timeout is 10 s
    expect(rings[0].error).toBeInstanceOf(RingAbortedError);
  });

  it('a lost peer comes back as PeerLostError naming it; rejected messages reach this process counters', async () => {
    const rings = await mixedRing(['thread', 'plain', 'plain']);
    // Garbage to the threaded rank's data socket: counted there, reported here.
    const before = transportCounters().rejected;
    const stranger = new zmq.Dealer({ linger: 0 });
    stranger.connect(rings[0].endpoints.find((e) => e.startsWith('tcp://'))!);
    for (let i = 0; i < 5; i++) await stranger.send([Buffer.from('not a dtrain message'), encodeMessage('ringClose', { rank: 9, generation: 1, ack: false }, 'x')]);
    // send() resolves once queued; closing with linger 0 before the connection is up would drop them.
    await new Promise((r) => setTimeout(r, 500));
    stranger.close();
    // Collectives read (and drop) the garbage: ZeroMQ takes turns between the stranger's
    // connection and the previous rank's, so a few small ones read all of it.
    for (let i = 0; i < 10 && transportCounters().rejected - before < 5; i++) {
      await Promise.all(rings.map((r) => r.allReduce(new Float32Array(1000).fill(1))));
    }
    expect(transportCounters().rejected - before).toBe(5);
    const data = rings.map(() => new Float32Array(10_000).fill(1));
    const p0 = rings[0].allReduce(data[0]);
    const p1 = rings[1].allReduce(data[1]);
    p1.catch(() => undefined);
    // Rank 2 dies instead of taking part.
    (rings[2] as Ring).abort('test: rank 2 dies');
    await rings[2].close();
    const e = await p0.then(() => undefined, (err: unknown) => err);
    expect(e).toBeInstanceOf(PeerLostError);
    expect((e as PeerLostError).rank).toBe(2);
    expect((e as Error).message).toMatch(/rank 2/);
  });
});
