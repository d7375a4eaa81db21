// A worker process for the multi-process tests: forked by ring.test.ts with an IPC channel,
// it joins a real ring over real sockets and runs the collectives it is told to.
import { createHash } from 'node:crypto';
import { Ring, TransportError, type PeerInfo, type RingStats } from '../index.js';
import { makeData, type DataSpec } from './data.js';

export interface WorkerOp extends DataSpec {
  average?: boolean;
  fp16?: boolean;
  /** Reduce with allReduceStaged over these [from, to) ranges, handing them over in order. */
  buckets?: [number, number][];
  broadcastRoot?: number;
}

export interface WorkerInit {
  type: 'init';
  rank: number;
  worldSize: number;
  timeoutMs: number;
  pieceBytes?: number;
  preferIpc?: boolean;
  /** Ring options of the same names (shared-memory links between same-host ranks). */
  sharedMemory?: boolean;
  shmBytes?: number;
  ops: WorkerOp[];
  /** Send results (base64) for ops up to this length. */
  returnUpTo: number;
  /** Wait for a 'go' message before each op (lets the parent kill or stop a rank mid-op). */
  gated?: boolean;
}

export type WorkerMessage =
  | { type: 'endpoints'; endpoints: string[] }
  | { type: 'op-start'; op: number }
  | { type: 'op-done'; op: number; sha256: string; data?: string; ms: number }
  | { type: 'error'; op: number; code: string; message: string; ms: number; errorName: string }
  | { type: 'closed'; stats: RingStats };

const send = (m: WorkerMessage) => process.send!(m);

function waitMessage<T>(type: string): Promise<T> {
  return new Promise((resolve) => {
    const on = (m: { type: string }) => {
      if (m.type === type) {
        process.off('message', on);
        resolve(m as T);
      }
    };
    process.on('message', on);
  });
}

async function main(): Promise<void> {
  const init = await waitMessage<WorkerInit>('init');
  const ring = await Ring.create({
    rank: init.rank,
    worldSize: init.worldSize,
    timeoutMs: init.timeoutMs,
    pieceBytes: init.pieceBytes,
    preferIpc: init.preferIpc,
    sharedMemory: init.sharedMemory,
    shmBytes: init.shmBytes,
    runId: 'test',
  });
  send({ type: 'endpoints', endpoints: ring.endpoints });
  const { peers } = await waitMessage<{ peers: PeerInfo[] }>('peers');
  await ring.connect(peers);
  for (let i = 0; i < init.ops.length; i++) {
    const op = init.ops[i];
    const data = makeData(op, init.rank);
    if (init.gated === true) await waitMessage('go');
    send({ type: 'op-start', op: i });
    const t0 = performance.now();
    try {
      if (op.broadcastRoot !== undefined) await ring.broadcast(data, op.broadcastRoot);
      else if (op.buckets !== undefined) {
        const staged = ring.allReduceStaged(data, op.buckets, { average: op.average, fp16: op.fp16 });
        op.buckets.forEach((_, b) => staged.ready(b));
        await staged.done;
      } else await ring.allReduce(data, { average: op.average, fp16: op.fp16 });
    } catch (e) {
      const err = e as Error;
      send({
        type: 'error', op: i, code: e instanceof TransportError ? e.code : 'UNKNOWN',
        message: err.message + " stats=" + JSON.stringify(ring.stats()), ms: performance.now() - t0, errorName: err.name,
      });
      await ring.close();
      process.exit(3);
    }
    const ms = performance.now() - t0;
    const bytes = Buffer.from(data.buffer, data.byteOffset, data.byteLength);
    send({
      type: 'op-done', op: i, ms,
      sha256: createHash('sha256').update(bytes).digest('hex'),
      data: op.len <= init.returnUpTo ? bytes.toString('base64') : undefined,
    });
  }
  await ring.close();
  send({ type: 'closed', stats: ring.stats() });
  process.disconnect();
}

main().catch((e: unknown) => {
  console.error(e);
  process.exit(2);
});
