// Fuzzing live sockets (127.0.0.1, no CURVE so that garbage reaches the parsers): thousands of
// random and mutated messages go to a 2-rank ring's data socket (from strangers, and mutated
// copies of the real traffic on the previous rank's own link) and to a ControlServer, while real
// all-reduces run. Nothing crashes, every result is bitwise right, every rejection is counted and
// the log stays short. Seeded: a failure reproduces.
import { afterEach, describe, expect, it } from 'vitest';
import * as zmq from 'zeromq';
import { ControlClient, ControlServer, type ControlEnvelope } from './control.js';
import { decodeMessage, dtrain, encodeMessage, setTransportLogger, transportCounters } from './protocol.js';
import { Ring, type PeerInfo } from './ring.js';
import { makeData, ringReference, rng } from './testing/data.js';

const cleanup: (() => unknown)[] = [];
afterEach(async () => {
  for (const f of cleanup.splice(0).reverse()) await f();
  setTransportLogger(undefined);
});

/** Mutations of a real message (frames after the routing id): everything the issue lists. */
function mutants(frames: Buffer[], old: Buffer[][], rand: () => number, runId: string): Buffer[][] {
  const int = (n: number) => Math.floor(rand() * n);
  const [env, ...payload] = frames;
  const d = decodeMessage(env);
  const chunk = d.ok && d.message.kind === 'ringChunk' ? (d.message.body as dtrain.RingChunk.$Properties) : undefined;
  const withHeader = (h: Partial<dtrain.RingChunk.$Properties>, version?: number, run = runId) =>
    [encodeMessage('ringChunk', { ...chunk, ...h }, run, version), ...payload];
  const out: Buffer[][] = [];
  for (let k = 0; k < 4; k++) {
    switch (int(14)) {
      case 0: out.push([Buffer.from(Array.from({ length: int(300) }, () => int(256)))]); break; // random bytes
      case 1: out.push([env.subarray(0, int(env.length)), ...payload]); break; // truncated envelope
      case 2: { // bit flips
        const m = Buffer.from(env);
        for (let f = 1 + int(3); f > 0; f--) m[int(m.length)] ^= 1 << int(8);
        out.push([m, ...payload]);
        break;
      }
      case 3: if (chunk) out.push(withHeader({}, 2)); break; // another protocol version
      case 4: if (chunk) out.push(withHeader({ opId: Number(chunk.opId ?? 1) - 1 })); break; // stale op
      case 5: if (chunk) out.push(withHeader({ step: (chunk.step ?? 0) + 1, piece: (chunk.piece ?? 0) + 1 })); break;
      case 6: if (chunk) out.push(withHeader({ count: 2 ** 31, offset: 2 ** 40 })); break; // huge fields
      case 7: if (payload.length > 0) out.push([env]); break; // payload frame missing
      case 8: if (payload[0]) out.push([env, payload[0].subarray(0, payload[0].length - 1 - int(payload[0].length - 1))]); break;
      case 9: out.push([env, ...payload, Buffer.alloc(8)]); break; // an extra frame
      case 10: out.push([encodeMessage(['heartbeat', 'stepReport', 'ringHello', 'welcome'][int(4)] as 'heartbeat', { rank: 0 }, runId)]); break;
      case 11: if (chunk) out.push(withHeader({}, undefined, 'other-run')); break;
      // A length prefix claiming 4 GiB for run_id, then nothing.
      case 12: out.push([Buffer.concat([Buffer.from([0x08, 0x01, 0x12, 0xff, 0xff, 0xff, 0xff, 0x0f]), Buffer.alloc(int(16))])]); break;
      case 13: if (old.length > 0) out.push(old[int(old.length)]); break; // replay of an earlier message
    }
  }
  return out;
}

describe('fuzz', () => {
  it('a live ring and control socket survive thousands of random and mutated messages during real all-reduces', async () => {
    const lines: string[] = [];
    setTransportLogger((l) => lines.push(l));
    const runId = 'fuzz';
    const generation = 7;
    const before = transportCounters();

    // The ring: rank 0's link to rank 1 is wrapped so that before each genuine message a few
    // mutants (and replays of earlier genuine messages) go down the same authenticated link.
    const rings = await Promise.all([0, 1].map((rank) => Ring.create({ rank, worldSize: 2, runId, generation, timeoutMs: 15_000, pieceBytes: 2048, ipc: false })));
    cleanup.push(() => Promise.all(rings.map((r) => r.close())));
    const peers: PeerInfo[] = rings.map((r) => ({ rank: r.rank, host: r.host, endpoints: r.endpoints }));
    await Promise.all(rings.map((r) => r.connect(peers)));
    const link = (rings[0] as unknown as { toNext: { dealer: zmq.Dealer } }).toNext;
    const dealer = link.dealer;
    const send = dealer.send.bind(dealer);
    const rand = rng(20261129);
    const history: Buffer[][] = [];
    let injected = 0;
    let fuzzing = true;
    const tapped = async (frames: Buffer[]) => {
      if (fuzzing && Array.isArray(frames)) {
        for (const m of mutants(frames, history, rand, runId)) {
          await send(m);
          injected++;
        }
        if (history.length < 200) history.push(frames.map((f) => Buffer.from(f)));
      }
      await send(frames);
    };
    // zeromq.js sockets are sealed: put a proxy in the link's place that intercepts send only.
    link.dealer = new Proxy(dealer, {
      get(t, p) {
        if (p === 'send') return tapped;
        const v: unknown = Reflect.get(t, p, t);
        return typeof v === 'function' ? (v as (...a: unknown[]) => unknown).bind(t) : v;
      },
      set(t, p, v) {
        return Reflect.set(t, p, v, t);
      },
    });

    // The control socket with one real worker streaming reports.
    const server = await ControlServer.bind({ runId, timeoutMs: 15_000 });
    cleanup.push(() => server.close());
    const fromWorker: number[] = [];
    let worker: Buffer | undefined;
    server.onMessage((e: ControlEnvelope) => {
      if (e.message.kind === 'hello' && (e.message.body as { host?: string }).host === 'real') worker = e.peer;
      if (worker !== undefined && e.peer.equals(worker) && e.message.kind === 'stepReport') fromWorker.push((e.message.body as { step?: number }).step ?? 0);
    });
    const client = new ControlClient(server.endpoint, { runId, timeoutMs: 15_000 });
    cleanup.push(() => client.close(0));
    await client.send('hello', { host: 'real', pid: 1, requestedRank: -1 });

    // Strangers: random and mutated messages to rank 1's data socket (one claims rank 0's
    // routing id: parked by ZeroMQ while rank 0 holds it) and to the control socket.
    const strangers = [rings[1].endpoints[0], rings[1].endpoints[0], server.endpoint].map((ep, i) => {
      const d = new zmq.Dealer({ linger: 0, sendTimeout: 1000, ...(i === 1 ? { routingId: `dtrain:${runId}:${generation}:0` } : {}) });
      d.connect(ep);
      cleanup.push(() => d.close());
      return d;
    });
    const validChunk = [encodeMessage('ringChunk', { generation, opId: 1, rank: 0, phase: 1, step: 0, chunk: 1, piece: 0, offset: 0, count: 4, dtype: 1 }, runId), Buffer.alloc(16)];
    const validReport = [encodeMessage('stepReport', { rank: 0, step: 5, loss: 1 }, runId)];
    let strangerSent = 0;
    const flood = (async () => {
      const r = rng(7);
      for (let i = 0; i < 1000; i++) {
        for (const [k, d] of strangers.entries()) {
          const base = k === 2 ? validReport : validChunk;
          const ms = mutants(base, [base], r, runId);
          for (const m of ms) {
            await d.send(m).catch(() => undefined);
            strangerSent++;
          }
        }
        if (i % 50 === 0) await new Promise((res) => setTimeout(res, 1));
      }
    })();

    const spec = { len: 20_011, seed: 5 };
    const reports = (async () => {
      for (let step = 0; step < 200; step++) {
        await client.send('stepReport', { rank: 0, step, loss: 0.5 });
        if (step % 20 === 0) await new Promise((res) => setTimeout(res, 2));
      }
    })();
    for (let op = 0; op < 12; op++) {
      const opts = [{}, { average: true }, { fp16: true }][op % 3];
      const data = [0, 1].map((r) => makeData({ ...spec, seed: spec.seed + op }, r));
      const want = ringReference([0, 1].map((r) => makeData({ ...spec, seed: spec.seed + op }, r)), opts);
      await Promise.all(rings.map((r, i) => r.allReduce(data[i], opts)));
      for (const d of data) expect(Buffer.from(d.buffer).equals(Buffer.from(want.buffer))).toBe(true);
    }
    await Promise.all([flood, reports]);
    fuzzing = false;

    // The control socket delivered the real worker's 200 reports, in order.
    const deadline = Date.now() + 10_000;
    while (fromWorker.length < 200 && Date.now() < deadline) await new Promise((res) => setTimeout(res, 20));
    expect(fromWorker).toEqual(Array.from({ length: 200 }, (_, i) => i));
    // A broadcast after the storm still works.
    const w = [new Float32Array([1, 2, 3]), new Float32Array(3)];
    await Promise.all(rings.map((r, i) => r.broadcast(w[i], 0)));
    expect([...w[1]]).toEqual([1, 2, 3]);

    expect(rings.every((r) => r.error === undefined)).toBe(true);
    const after = transportCounters();
    const rejected = after.rejected - before.rejected;
    const ringRejected = Object.values(rings[1].stats().rejected).reduce((a, b) => a + b, 0);
    expect(injected).toBeGreaterThan(1000);
    expect(strangerSent).toBeGreaterThan(5000);
    // Every injected mutant on the real link was rejected (a few bit flips may decode into a
    // message identical to the genuine one: accepted in its place, the genuine copy then rejected).
    expect(ringRejected).toBeGreaterThanOrEqual(injected * 0.95);
    expect(rejected).toBeGreaterThanOrEqual(ringRejected + server.stats().rejected);
    expect(server.stats().rejected).toBeGreaterThan(1000);
    // Logged once per peer (rate-limited): a handful of lines, not thousands.
    expect(lines.length).toBeGreaterThan(0);
    expect(lines.length).toBeLessThan(20);
    console.log(
      `fuzz: ${injected} mutants on the real link, ${strangerSent} stranger messages; ` +
        `ring rejected ${ringRejected} (${JSON.stringify(rings[1].stats().rejected)}), control rejected ${server.stats().rejected}, log lines ${lines.length}`,
    );
  });
});
