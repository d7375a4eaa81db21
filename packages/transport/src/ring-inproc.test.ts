// Rings whose ranks live in this process (real sockets still): protocol refusals, strangers
// sending garbage, timeouts, usage errors.
import { execFileSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import * as zmq from 'zeromq';
import { PeerTimeoutError, ProtocolVersionError, RingAbortedError, RingSetupError, RingUsageError } from './errors.js';
import { encodeMessage, PROTOCOL_VERSION, setTransportLogger } from './protocol.js';
import { Ring, type PeerInfo, type RingOptions } from './ring.js';
import { makeData, ringReference } from './testing/data.js';

const cleanup: (() => unknown)[] = [];
afterEach(async () => {
  for (const f of cleanup.splice(0)) await f();
});

async function ringOf(n: number, opts: { timeoutMs?: number; runId?: string; pieceBytes?: number } = {}, perRank: (rank: number) => Partial<RingOptions> = () => ({})): Promise<Ring[]> {
  const rings = await Promise.all(Array.from({ length: n }, (_, rank) => Ring.create({ rank, worldSize: n, ...opts, ...perRank(rank) })));
  cleanup.push(() => Promise.all(rings.map((r) => r.close())));
  const peers: PeerInfo[] = rings.map((r) => ({ rank: r.rank, host: r.host, endpoints: r.endpoints }));
  await Promise.all(rings.map((r) => r.connect(peers)));
  return rings;
}

/** A tmpfs of `mib` MiB as the shared-memory directory for `fn` (root only: mount). */
async function withSmallShm(mib: number, fn: (lines: string[]) => Promise<void>): Promise<void> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'small-shm-'));
  execFileSync('mount', ['-t', 'tmpfs', '-o', `size=${mib}m`, 'tmpfs', dir]);
  const saved = process.env.DTRAIN_SHM_DIR;
  const lines: string[] = [];
  process.env.DTRAIN_SHM_DIR = dir;
  setTransportLogger((l) => lines.push(l));
  try {
    await fn(lines);
    expect(fs.readdirSync(dir)).toEqual([]); // every segment unlinked once mapped
  } finally {
    setTransportLogger(undefined);
    if (saved === undefined) delete process.env.DTRAIN_SHM_DIR;
    else process.env.DTRAIN_SHM_DIR = saved;
    // Lazily: the rings' mappings keep it busy until they are collected.
    execFileSync('umount', ['-l', dir]);
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

describe('ring in one process', () => {
  // A container's /dev/shm is often 64 MiB: links take smaller segments, or sockets, and say so.
  it.skipIf(process.getuid?.() !== 0)('a full shared-memory directory gives smaller segments, then sockets; same bits either way', async () => {
    const spec = { len: 300_001, seed: 13 };
    const want = ringReference([0, 1].map((rank) => makeData(spec, rank)));
    const check = async (mib: number, expectShared: boolean[], said: RegExp) => {
      await withSmallShm(mib, async (lines) => {
        // 16 slots of 1 MiB wanted per link (17 MiB with the header); the directory has less.
        const rings = await ringOf(2, { pieceBytes: 1 << 20 }, () => ({ shmBytes: 16 << 20 }));
        expect(rings.map((r) => r.stats().shm.toNext)).toEqual(expectShared);
        expect(lines.join('\n')).toMatch(said);
        const data = rings.map((r) => makeData(spec, r.rank));
        await Promise.all(rings.map((r, i) => r.allReduce(data[i])));
        for (const d of data) expect(d).toEqual(want);
      });
    };
    // 13 MiB: the first link gets 8 slots, the second 4 (what is left), both shared.
    await check(13, [true, true], /room for 8 of 16 slots[\s\S]*room for 4 of 16 slots/);
    // 1 MiB: not even 2 slots fit; both links are sockets, and the log says what is wanted.
    await check(1, [false, false], /no shared memory for its link to rank 1 .*ENOSPC.*bytes are wanted per link/);
  });

  it('a rank without shared memory next to ranks with it: its two links are sockets, the third is shared, same bits', async () => {
    const rings = await ringOf(3, { pieceBytes: 16 * 1024 }, (rank) => ({ sharedMemory: rank !== 1 }));
    expect(rings.map((r) => r.stats().shm)).toEqual([
      { toNext: false, fromPrev: true }, // 0 -> 1 refused by rank 1; 2 -> 0 shared
      { toNext: false, fromPrev: false },
      { toNext: true, fromPrev: false },
    ]);
    for (const opts of [{}, { average: true }, { fp16: true }]) {
      const spec = { len: 100_003, seed: 9 };
      const data = rings.map((r) => makeData(spec, r.rank));
      const want = ringReference([0, 1, 2].map((rank) => makeData(spec, rank)), opts);
      await Promise.all(rings.map((r, i) => r.allReduce(data[i], opts)));
      for (const d of data) expect(d).toEqual(want);
    }
    expect(rings[2].stats().piecesViaShm).toBeGreaterThan(0);
    expect(rings[1].stats().piecesViaShm).toBe(0);
  });

  it('rings bound before their ranks were known take rank and world size from connect() (the Welcome)', async () => {
    // As `dtrain join` workers do: bind first (the endpoints go into the Hello), learn the rank later.
    const rings = await Promise.all([0, 1, 2].map(() => Ring.create({ rank: 0, worldSize: 1, timeoutMs: 5000 })));
    cleanup.push(() => Promise.all(rings.map((r) => r.close())));
    // The coordinator's assignment, deliberately not the creation order.
    const order = [2, 0, 1];
    const peers: PeerInfo[] = order.map((_, rank) => ({ rank, host: rings[order.indexOf(rank)].host, endpoints: rings[order.indexOf(rank)].endpoints }));
    await Promise.all(rings.map((r, i) => r.connect(peers, { runId: 'late', generation: 1, rank: order[i], worldSize: 3 })));
    expect(rings.map((r) => [r.rank, r.worldSize])).toEqual([[2, 3], [0, 3], [1, 3]]);
    const spec = { len: 1000, seed: 3 };
    const data = rings.map((r) => makeData(spec, r.rank));
    const want = ringReference([0, 1, 2].map((rank) => makeData(spec, rank)));
    await Promise.all(rings.map((r, i) => r.allReduce(data[i])));
    for (const d of data) expect(d).toEqual(want);
    const bad = await Ring.create({ rank: 0, worldSize: 1 });
    cleanup.push(() => bad.close());
    await expect(bad.connect(peers, { rank: 3, worldSize: 3 })).rejects.toThrow(RingUsageError);
  });

  it('abort() wakes a collective that waits for a silent peer at once, with the reason', async () => {
    const rings = await ringOf(3, { timeoutMs: 20_000 });
    // Ranks 0 and 1 enter an all-reduce, rank 2 never does: without abort they would wait 20 s.
    const waiting = [0, 1].map((r) => rings[r].allReduce(new Float32Array(1000).fill(1)));
    for (const w of waiting) w.catch(() => undefined);
    await new Promise((r) => setTimeout(r, 200));
    const t0 = Date.now();
    rings[0].abort('the coordinator declared rank 2 lost');
    rings[1].abort('the coordinator declared rank 2 lost');
    await expect(waiting[0]).rejects.toThrow(RingAbortedError);
    await expect(waiting[1]).rejects.toThrow(/declared rank 2 lost/);
    expect(Date.now() - t0).toBeLessThan(5000); // far below the 20 s timeout, with room for a loaded machine
    await expect(rings[0].allReduce(new Float32Array(4))).rejects.toThrow(RingAbortedError);
  });

  it('abort() during setup ends a connect whose next rank never answers at once (an elastic ROLLBACK of a generation being set up)', async () => {
    // Rank 0 gets its previous rank's RingHello, then waits for the next rank's answer: rank 1 is
    // a socket that accepts and never answers. Before: abort() was not seen until the timeout.
    const silent = new zmq.Router({ linger: 0 });
    await silent.bind('tcp://127.0.0.1:*');
    const [r0, r2] = await Promise.all([0, 2].map((rank) => Ring.create({ rank, worldSize: 3, timeoutMs: 20_000, ipc: false })));
    cleanup.push(() => Promise.all([r0.close(), r2.close()]).then(() => silent.close()));
    const peers: PeerInfo[] = [
      { rank: 0, host: r0.host, endpoints: r0.endpoints },
      { rank: 1, host: r0.host, endpoints: [silent.lastEndpoint!] },
      { rank: 2, host: r2.host, endpoints: r2.endpoints },
    ];
    const setup = r0.connect(peers, { runId: 'setup', generation: 2 });
    r2.connect(peers, { runId: 'setup', generation: 2 }).catch(() => undefined); // waits for rank 1 forever
    setup.catch(() => undefined);
    await new Promise((r) => setTimeout(r, 300));
    const t0 = Date.now();
    r0.abort('the coordinator rolled back generation 2');
    await expect(setup).rejects.toThrow(/rolled back generation 2/);
    expect(Date.now() - t0).toBeLessThan(5000); // the timeout is 20 s
  });

  it('refuses a previous rank that speaks another protocol version, naming it', async () => {
    const ring = await Ring.create({ rank: 1, worldSize: 2, runId: 'v', timeoutMs: 5000 });
    cleanup.push(() => ring.close());
    // The "old" rank 0: a socket for our DEALER to connect to, and a DEALER that says hello.
    const sink = new zmq.Router({ linger: 0 });
    await sink.bind('tcp://127.0.0.1:*');
    const old = new zmq.Dealer({ linger: 0, routingId: 'dtrain:v:0:0' });
    cleanup.push(() => {
      sink.close();
      old.close();
    });
    old.connect(ring.endpoints[0]);
    await old.send(encodeMessage('ringHello', { rank: 0, worldSize: 2, generation: 0, host: 'old-box' }, 'v', 99));
    const peers: PeerInfo[] = [
      { rank: 0, host: 'old-box', endpoints: [sink.lastEndpoint!] },
      { rank: 1, host: ring.host, endpoints: ring.endpoints },
    ];
    const err = await ring.connect(peers).then(() => undefined, (e: unknown) => e);
    expect(err).toBeInstanceOf(ProtocolVersionError);
    expect((err as ProtocolVersionError).code).toBe('E_PROTOCOL_VERSION');
    expect((err as Error).message).toContain(`rank 0 on host old-box speaks dtrain protocol version 99, this process speaks ${PROTOCOL_VERSION}`);
  });

  it('a next rank that cannot be reached fails the setup, naming host and endpoint', async () => {
    const ring = await Ring.create({ rank: 0, worldSize: 2, runId: 'u', timeoutMs: 600 });
    cleanup.push(() => ring.close());
    // Rank 1 says hello to us, but advertises an endpoint where nothing listens.
    const one = new zmq.Dealer({ linger: 0, routingId: 'dtrain:u:0:1' });
    cleanup.push(() => one.close());
    one.connect(ring.endpoints[0]);
    await one.send(encodeMessage('ringHello', { rank: 1, worldSize: 2, generation: 0, host: 'far' }, 'u'));
    const peers: PeerInfo[] = [
      { rank: 0, host: ring.host, endpoints: ring.endpoints },
      { rank: 1, host: 'far', endpoints: ['tcp://127.0.0.1:1'] },
    ];
    const err = await ring.connect(peers).then(() => undefined, (e: unknown) => e);
    expect(err).toBeInstanceOf(RingSetupError);
    expect((err as Error).message).toMatch(/could not reach rank 1 on host far at tcp:\/\/127\.0\.0\.1:1 within 600 ms/);
  });

  it('a next rank with no usable endpoint fails the setup, and a collective called on that ring anyway rejects with the same error', async () => {
    const ring = await Ring.create({ rank: 0, worldSize: 2, runId: 'v', timeoutMs: 600 });
    cleanup.push(() => ring.close());
    const peers: PeerInfo[] = [
      { rank: 0, host: ring.host, endpoints: ring.endpoints },
      { rank: 1, host: 'far', endpoints: ['udp://far:1'] },
    ];
    const err = await ring.connect(peers).then(() => undefined, (e: unknown) => e);
    expect(err).toBeInstanceOf(RingSetupError);
    expect((err as Error).message).toBe('rank 0: rank 1 on far advertised no usable endpoint (udp://far:1)');
    await expect(ring.allReduce(new Float32Array(4))).rejects.toBe(err);
  });

  it('strangers sending garbage are rejected and counted; the results stay exact', async () => {
    const rings = await ringOf(2, { runId: 'g', pieceBytes: 4096 });
    const strangers = rings.map((r) => {
      const s = new zmq.Dealer({ linger: 0, sendHighWaterMark: 0 });
      s.connect(r.endpoints[0]);
      return s;
    });
    cleanup.push(() => strangers.forEach((s) => s.close()));
    let stop = false;
    const valid = encodeMessage('ringChunk', { generation: 0, opId: 1, rank: 0, phase: 1, step: 0, chunk: 0, piece: 0, offset: 0, count: 2, dtype: 1 }, 'g');
    const flood = strangers.map(async (s) => {
      for (let i = 0; !stop; i++) {
        const frames = [
          [randomBytes(i % 300)],
          [valid, randomBytes(8)], // well-formed, but from an unknown peer
          [encodeMessage('ringAbort', { generation: 0, failedRank: 1, reason: 'lies' }, 'g')],
          [randomBytes(3), randomBytes(5), randomBytes(7)],
        ][i % 4];
        await s.send(frames);
        if (i % 50 === 0) await new Promise((r) => setImmediate(r));
      }
    });
    for (let op = 0; op < 5; op++) {
      const spec = { len: 20_001, seed: 100 + op };
      const data = rings.map((r) => makeData(spec, r.rank));
      const ref = ringReference(rings.map((r) => makeData(spec, r.rank)));
      await Promise.all(rings.map((r, i) => r.allReduce(data[i])));
      for (const d of data) expect(Buffer.from(d.buffer).equals(Buffer.from(ref.buffer))).toBe(true);
    }
    stop = true;
    await Promise.all(flood);
    for (const r of rings) {
      expect(r.error).toBeUndefined();
      expect(r.stats().rejected['unknown sender']).toBeGreaterThan(0);
    }
  });

  it('an all-reduce whose peer never joins it fails after the timeout, naming the peer', async () => {
    const rings = await ringOf(2, { timeoutMs: 500 });
    const t0 = Date.now();
    const err = await rings[0].allReduce(new Float32Array(1000).fill(1)).then(() => undefined, (e: unknown) => e);
    const elapsed = Date.now() - t0;
    expect(err).toBeInstanceOf(PeerTimeoutError);
    expect((err as Error).message).toMatch(new RegExp(`rank 1 on host ${rings[1].host} sent nothing for 500 ms`));
    expect(elapsed).toBeGreaterThanOrEqual(450);
    expect(elapsed).toBeLessThan(3000);
    // A broken ring stays broken: the next call fails at once with the same error.
    await expect(rings[0].allReduce(new Float32Array(4))).rejects.toBe(err);
  });

  it('checks its arguments and refuses use after close', async () => {
    await expect(Ring.create({ rank: 2, worldSize: 2 })).rejects.toBeInstanceOf(RingUsageError);
    await expect(Ring.create({ rank: 0, worldSize: 0 })).rejects.toBeInstanceOf(RingUsageError);
    await expect(Ring.create({ rank: 0, worldSize: 1, pieceBytes: 3 })).rejects.toBeInstanceOf(RingUsageError);
    const [r] = await ringOf(1);
    const a = new Float32Array([1, 2, 3]);
    await r.allReduce(a, { average: true });
    expect(Array.from(a)).toEqual([1, 2, 3]);
    await r.close();
    await r.close();
    await expect(r.allReduce(a)).rejects.toBeInstanceOf(RingUsageError);
  });
});

describe('staged all-reduce (buckets handed over during a backward pass)', () => {
  it('equals the per-bucket reference whatever order the buckets become ready in; floats outside buckets stay', async () => {
    const rings = await ringOf(3, { timeoutMs: 10_000, pieceBytes: 4096 });
    const buckets: [number, number][] = [[15_000, 20_000], [7, 15_000], [0, 7], [20_000, 20_000]];
    const inputs = [0, 1, 2].map((r) => makeData({ len: 20_014, seed: 21 }, r));
    const want = Float32Array.from(inputs[0]);
    for (const [from, to] of buckets) want.set(ringReference(inputs.map((a) => a.subarray(from, to))), from);
    const data = inputs.map((a) => Float32Array.from(a));
    const staged = rings.map((r, i) => r.allReduceStaged(data[i], buckets));
    // Each rank declares its buckets in another order, with event-loop turns in between.
    const orders = [[0, 1, 2, 3], [3, 2, 1, 0], [1, 3, 0, 2]];
    await Promise.all(
      orders.map(async (order, r) => {
        for (const i of order) {
          await new Promise((res) => setTimeout(res, 5));
          staged[r].ready(i);
        }
      }),
    );
    await Promise.all(staged.map((s) => s.done));
    for (const [r, d] of data.entries()) {
      expect(d.subarray(0, 20_000)).toEqual(want.subarray(0, 20_000));
      expect(d.subarray(20_000)).toEqual(inputs[r].subarray(20_000));
    }
  });

  it('rejects buckets that are not ranges of the buffer', async () => {
    const rings = await ringOf(1);
    const s = rings[0].allReduceStaged(new Float32Array(10), [[0, 11]]);
    await expect(s.done).rejects.toThrow(/bucket \[0, 11\) is not a range of the 10-float buffer/);
  });
});
