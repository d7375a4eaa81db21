// Starts n real worker processes (node --import tsx ring-worker.ts), plays the coordinator's part
// of the rendezvous (collect endpoints, hand out the peer list) over their IPC channels.
import { fork, type ChildProcess } from 'node:child_process';
import { hostname } from 'node:os';
import { fileURLToPath } from 'node:url';
import type { PeerInfo } from '../ring.js';
import type { WorkerInit, WorkerMessage } from './ring-worker.js';

const WORKER = fileURLToPath(new URL('./ring-worker.ts', import.meta.url));

export interface RingRun {
  children: ChildProcess[];
  /** Messages from each rank, in arrival order. */
  messages: WorkerMessage[][];
  /** Resolves when every child has exited: exit codes by rank. */
  exited: Promise<(number | null)[]>;
  /** Resolves with the first message of `type` from `rank`. */
  waitFor(rank: number, type: WorkerMessage['type']): Promise<WorkerMessage>;
  kill(): void;
}

export function startRing(n: number, init: Omit<WorkerInit, 'type' | 'rank' | 'worldSize'>): RingRun {
  const children: ChildProcess[] = [];
  const messages: WorkerMessage[][] = [];
  const waiters: { rank: number; type: string; resolve: (m: WorkerMessage) => void }[] = [];
  const endpoints: (string[] | undefined)[] = new Array(n).fill(undefined);
  const exits: Promise<number | null>[] = [];
  for (let rank = 0; rank < n; rank++) {
    const child = fork(WORKER, [], {
      execArgv: ['--import', 'tsx'],
      stdio: ['ignore', 'inherit', 'inherit', 'ipc'],
      serialization: 'advanced',
    });
    children.push(child);
    messages.push([]);
    exits.push(new Promise((resolve) => child.on('exit', (code) => resolve(code))));
    child.on('message', (raw) => {
      const m = raw as WorkerMessage;
      messages[rank].push(m);
      for (const w of waiters.filter((x) => x.rank === rank && x.type === m.type)) {
        waiters.splice(waiters.indexOf(w), 1);
        w.resolve(m);
      }
      if (m.type === 'endpoints') {
        endpoints[rank] = m.endpoints;
        if (endpoints.every((e) => e !== undefined)) {
          const peers: PeerInfo[] = endpoints.map((e, r) => ({ rank: r, host: hostname(), endpoints: e! }));
          for (const c of children) c.send({ type: 'peers', peers });
        }
      }
    });
    child.send({ type: 'init', rank, worldSize: n, ...init } satisfies WorkerInit);
  }
  return {
    children,
    messages,
    exited: Promise.all(exits),
    waitFor(rank, type) {
      const seen = messages[rank].find((m) => m.type === type);
      if (seen !== undefined) return Promise.resolve(seen);
      return new Promise((resolve) => waiters.push({ rank, type, resolve }));
    },
    kill() {
      for (const c of children) if (c.exitCode === null && c.signalCode === null) c.kill('SIGKILL');
    },
  };
}
