// The thread side of ThreadedRing (ring-thread.ts): owns one real Ring and runs every call the
// parent posts. Only this file runs in the thread.
import { parentPort } from 'node:worker_threads';
import { transportCounters } from './protocol.js';
import { Ring, type StagedAllReduce } from './ring.js';
import type { FromThread, ThreadState, ToThread } from './ring-thread.js';
import { serializeError } from './ring-thread.js';

const port = parentPort;
if (port === null) throw new Error('ring-thread-worker.ts runs inside a worker thread started by ThreadedRing');

let ring: Ring | undefined;
const staged = new Map<number, StagedAllReduce>();

function state(): ThreadState {
  return {
    rank: ring?.rank ?? 0,
    worldSize: ring?.worldSize ?? 1,
    generation: ring?.generation ?? 0,
    runId: ring?.runId ?? '',
    stats: ring?.stats(),
    error: ring?.error === undefined ? undefined : serializeError(ring.error),
    counters: transportCounters(),
  };
}

function reply(id: number, p: Promise<unknown>): void {
  p.then(
    () => port!.postMessage({ t: 'done', id, ok: true, state: state() } satisfies FromThread),
    (e: unknown) => port!.postMessage({ t: 'done', id, ok: false, error: serializeError(e), state: state() } satisfies FromThread),
  );
}

port.on('message', (m: ToThread) => {
  switch (m.t) {
    case 'create':
      reply(m.id, Ring.create(m.opts).then((r) => {
        ring = r;
        port!.postMessage({ t: 'created', endpoints: r.endpoints, publicKey: r.publicKey, host: r.host, timeoutMs: r.timeoutMs } satisfies FromThread);
      }));
      return;
    case 'connect':
      reply(m.id, ring!.connect(m.peers, m.ids));
      return;
    case 'allReduce':
      reply(m.id, ring!.allReduce(m.data, m.opts));
      return;
    case 'broadcast':
      reply(m.id, ring!.broadcast(m.data, m.root));
      return;
    case 'staged': {
      const s = ring!.allReduceStaged(m.data, m.buckets, m.opts);
      staged.set(m.id, s);
      reply(m.id, s.done.finally(() => staged.delete(m.id)));
      return;
    }
    case 'ready':
      staged.get(m.id)?.ready(m.index);
      return;
    case 'abort':
      ring?.abort(m.reason);
      return;
    case 'close':
      // The thread then ends on its own, once libzmq let go of everything: terminating it with
      // sockets or a context alive aborts the process (zeromq.js throws in a cleanup hook).
      reply(m.id, (ring?.close() ?? Promise.resolve()).finally(() => setImmediate(() => port!.close())));
      return;
  }
});
