// One process of `pnpm bench scaling`'s communication-only modes (started by scaling.ts, never by
// hand; the leading underscore keeps it out of `pnpm bench`'s list). Two roles:
//
// - 'ring': a data-parallel worker whose compute is a fixed sleep (a GPU's step: the CPU waits,
//   it does not work), followed by the real ring all-reduce of the real gradient size, every step.
//   With `bucketMb` > 0 it does what the trainer does instead: the ring runs in its own thread
//   (ThreadedRing), this thread is blocked for the "forward pass" (a third of the compute time),
//   then for the "backward pass", handing over each gradient bucket (gradientBuckets of the real
//   ResNet) at the moment the backward pass would finish it (backward time per layer in
//   proportion to its FLOPs, from the head back), and waits for the rest of the all-reduce.
//   Per step it records the step's wall time, the all-reduce's wall time and the CPU time this
//   process (JavaScript and ZeroMQ's I/O threads together) spent during the all-reduce, so the
//   parent can tell CPU-bound from waiting on the wire.
// - 'sink' / 'source': a plain TCP stream between two network namespaces, to measure what a
//   shaped link actually carries on this machine.
//
// The parent talks to it over the IPC channel only (works through `ip netns exec`, which execs
// node with the channel's file descriptor and environment intact). Every wait has a timeout.
import fs from 'node:fs';
import net from 'node:net';
import { Ring, ThreadedRing, sharedFloat32Array, type PeerInfo } from '@dtrain/transport';
import { bucketSchedule, FORWARD_SHARE } from './_overlap-model.js';

export interface RingInit {
  role: 'ring';
  rank: number;
  world: number;
  /** Host name in the ring (distinct per namespace, so that ipc:// is never chosen there). */
  host: string;
  listen: string;
  port: number;
  /** false in namespaces: the ring must cross the shaped link, never a unix socket. */
  ipc: boolean;
  floats: number;
  computeMs: number;
  warmup: number;
  steps: number;
  fp16: boolean;
  timeoutMs: number;
  /** 0: all-reduce after the compute. Else: buckets of this many MiB, overlapping the backward pass. */
  bucketMb: number;
}

const blockCell = new Int32Array(new SharedArrayBuffer(4));
/** Blocks this thread (no event-loop turn) until performance.now() reaches `until`: a GPU step holding it. */
function blockUntil(until: number): void {
  for (let left = until - now(); left > 0; left = until - now()) Atomics.wait(blockCell, 0, 0, left);
}

export interface StepSample {
  stepMs: number;
  allReduceMs: number;
  /** CPU time of this process (all threads) during the all-reduce, ms. */
  allReduceCpuMs: number;
  /** CPU time of this process during the whole step, ms. */
  stepCpuMs: number;
  /**
   * The JavaScript thread during the all-reduce, from /proc/self/task/<tid>/schedstat (ms): on a
   * core, runnable but waiting for one (CPU-starved), and the rest of the wall time (blocked:
   * waiting on the wire or on a peer). NaN where schedstat is not available.
   */
  jsRunMs: number;
  jsQueueMs: number;
  /** All threads of the process (JS, ZeroMQ I/O, V8, libuv): time runnable but waiting for a core, ms. */
  allQueueMs: number;
}

export interface RingResult {
  type: 'result';
  rank: number;
  samples: StepSample[];
  /** Wall time of the timed steps on this rank, ms (first timed step's start to last one's end). */
  timedWallMs: number;
  bytesSent: number;
}

export interface StreamInit {
  role: 'sink' | 'source';
  addr: string;
  port: number;
  bytes: number;
  timeoutMs: number;
}

type FromParent = RingInit | StreamInit | { type: 'peers'; peers: PeerInfo[] };

const now = () => performance.now();

/** [run ns, run-queue wait ns] of one thread, or of all threads of this process summed. */
function schedstat(tid?: number): [number, number] {
  try {
    const tids = tid !== undefined ? [String(tid)] : fs.readdirSync('/proc/self/task');
    let run = 0;
    let wait = 0;
    for (const t of tids) {
      try {
        const [a, b] = fs.readFileSync(`/proc/self/task/${t}/schedstat`, 'utf8').split(' ').map(Number);
        run += a;
        wait += b;
      } catch {
        /* the thread ended between readdir and read */
      }
    }
    return [run, wait];
  } catch {
    return [NaN, NaN];
  }
}
const cpuMs = () => {
  const u = process.cpuUsage();
  return (u.user + u.system) / 1000;
};

function nextMessage<T extends object>(what: string, timeoutMs: number): Promise<T> {
  return new Promise((resolve, reject) => {
    const t = setTimeout(() => {
      process.off('message', on);
      reject(new Error(`bench worker ${process.pid}: no ${what} from the parent within ${timeoutMs} ms`));
    }, timeoutMs);
    const on = (m: unknown) => {
      clearTimeout(t);
      resolve(m as T);
    };
    process.once('message', on);
  });
}

function send(m: object): Promise<void> {
  return new Promise((resolve, reject) => process.send!(m, (e: Error | null) => (e ? reject(e) : resolve())));
}

async function ringRole(o: RingInit): Promise<void> {
  const ringOpts = {
    rank: o.rank, worldSize: o.world, host: o.host, listen: o.listen, port: o.port,
    ipc: o.ipc, preferIpc: o.ipc, timeoutMs: o.timeoutMs, runId: 'bench-scaling',
    // Plaintext on purpose, as the peers it is compared with (Open MPI, gloo): the namespaces'
    // addresses are not loopback, so it must be said explicitly.
    security: { kind: 'none' as const },
  };
  const overlap = o.bucketMb > 0;
  const ring = overlap ? await ThreadedRing.create(ringOpts) : await Ring.create(ringOpts);
  const schedule = overlap ? bucketSchedule(o.floats, o.bucketMb) : undefined;
  try {
    await send({ type: 'endpoints', rank: o.rank, endpoints: ring.endpoints });
    const { peers } = await nextMessage<{ peers: PeerInfo[] }>('peer list', o.timeoutMs);
    await ring.connect(peers, { runId: 'bench-scaling', generation: 0 });
    // Gradient-like values: small, so that binary16 on the wire neither overflows nor flushes.
    const grad = overlap ? sharedFloat32Array(o.floats) : new Float32Array(o.floats);
    for (let i = 0; i < grad.length; i++) grad[i] = (Math.random() - 0.5) * 1e-2;
    // A barrier, so that every rank's first step starts together.
    await ring.allReduce(new Float32Array(o.world));
    const samples: StepSample[] = [];
    let timedStart = 0;
    for (let s = 0; s < o.warmup + o.steps; s++) {
      if (s === o.warmup) timedStart = now();
      const t0 = now();
      const c0 = cpuMs();
      let staged: Promise<void> | undefined;
      if (schedule) {
        const s = ring.allReduceStaged(grad, schedule.ranges, { average: true, fp16: o.fp16 });
        s.done.catch(() => undefined);
        const backwardStart = t0 + FORWARD_SHARE * o.computeMs;
        blockUntil(backwardStart);
        schedule.readyAt.forEach((at, k) => {
          blockUntil(backwardStart + at * (1 - FORWARD_SHARE) * o.computeMs);
          s.ready(k);
        });
        blockUntil(t0 + o.computeMs);
        staged = s.done;
      } else if (o.computeMs > 0) await new Promise((r) => setTimeout(r, o.computeMs));
      // From here: the all-reduce, or what is left of it after the backward pass.
      const js1 = schedstat(process.pid);
      const all1 = schedstat();
      const t1 = now();
      const c1 = cpuMs();
      await (staged ?? ring.allReduce(grad, { average: true, fp16: o.fp16 }));
      const t2 = now();
      const c2 = cpuMs();
      const js2 = schedstat(process.pid);
      const all2 = schedstat();
      if (s >= o.warmup) {
        samples.push({
          stepMs: t2 - t0, allReduceMs: t2 - t1, allReduceCpuMs: c2 - c1, stepCpuMs: c2 - c0,
          jsRunMs: (js2[0] - js1[0]) / 1e6, jsQueueMs: (js2[1] - js1[1]) / 1e6, allQueueMs: (all2[1] - all1[1]) / 1e6,
        });
      }
    }
    const timedWallMs = now() - timedStart;
    const bytesSent = ring.stats().bytesSent;
    await send({ type: 'result', rank: o.rank, samples, timedWallMs, bytesSent } satisfies RingResult);
  } finally {
    await ring.close();
  }
}

async function sinkRole(o: StreamInit): Promise<void> {
  const server = net.createServer();
  await new Promise<void>((res, rej) => {
    server.once('error', rej);
    server.listen(o.port, o.addr, () => res());
  });
  await send({ type: 'listening' });
  const result = await new Promise<{ bytes: number; ms: number }>((resolve, reject) => {
    const t = setTimeout(() => reject(new Error(`link check: nothing (or not everything) arrived at ${o.addr}:${o.port} within ${o.timeoutMs} ms`)), o.timeoutMs);
    server.once('connection', (sock) => {
      let got = 0;
      let first = 0;
      sock.on('data', (d: Buffer) => {
        if (got === 0) first = now();
        got += d.length;
      });
      sock.on('end', () => {
        clearTimeout(t);
        resolve({ bytes: got, ms: now() - first });
      });
      sock.on('error', reject);
    });
  });
  server.close();
  await send({ type: 'stream', ...result });
}

async function sourceRole(o: StreamInit): Promise<void> {
  const sock = net.connect(o.port, o.addr);
  const chunk = Buffer.alloc(1 << 20, 7);
  await new Promise<void>((resolve, reject) => {
    const t = setTimeout(() => reject(new Error(`link check: could not send ${o.bytes} bytes to ${o.addr}:${o.port} within ${o.timeoutMs} ms`)), o.timeoutMs);
    sock.once('error', reject);
    sock.once('connect', () => {
      let left = o.bytes;
      const pump = () => {
        while (left > 0) {
          const n = Math.min(left, chunk.length);
          left -= n;
          if (!sock.write(n === chunk.length ? chunk : chunk.subarray(0, n))) return void sock.once('drain', pump);
        }
        sock.end(() => {
          clearTimeout(t);
          resolve();
        });
      };
      pump();
    });
  });
  await send({ type: 'sent' });
}

async function workerMain(): Promise<void> {
  if (!process.send) throw new Error('_scaling-worker.ts is started by tools/bench/scaling.ts (it needs an IPC channel)');
  const init = await nextMessage<FromParent>('start message', 60_000);
  if (!('role' in init)) throw new Error('bench worker: expected a start message');
  if (init.role === 'ring') await ringRole(init);
  else if (init.role === 'sink') await sinkRole(init);
  else await sourceRole(init);
  process.disconnect();
}

workerMain().catch((e: unknown) => {
  console.error(`bench worker ${process.pid}: ${e instanceof Error ? e.stack ?? e.message : String(e)}`);
  process.exit(1);
});
