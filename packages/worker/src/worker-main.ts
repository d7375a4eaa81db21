// The process a launcher starts for each worker: `node --import tsx worker-main.ts`, configured by
// the environment (see distributed.ts). Exit 0 only when training completed; 1 when it failed
// (the error is printed and sent to the coordinator); 2 for a wrong environment.
import { onDeviceLost } from '@dtrain/backend';
import { closeThreadedRings } from '@dtrain/transport';
import { readWorkerEnv, WorkerEnvError } from '@dtrain/transport';
import { runDistributedWorker } from './distributed.js';

let exiting: Promise<never> | undefined;

/**
 * Every exit goes through here, once (the first code stands): the ring's thread must have closed
 * its ZeroMQ sockets first, or zeromq.js aborts the process (SIGABRT) instead of exiting with
 * `code` (ThreadedRing).
 */
async function exit(code: number, why: string): Promise<never> {
  exiting ??= closeThreadedRings(why)
    .catch(() => undefined)
    .then(() => process.exit(code));
  return exiting;
}

// Our stdout and stderr are pipes to the launcher (its log files and console). When it is gone
// (EPIPE: killed, or its machine's join process died) the run is over for this worker: leave now,
// instead of failing on every later log line.
for (const stream of [process.stdout, process.stderr]) {
  stream.on('error', (e: NodeJS.ErrnoException) => {
    if (e.code === 'EPIPE') void exit(1, 'the launcher is gone (the other end of this worker\'s output closed)');
  });
}

/** console.error that cannot throw (stderr may be a broken pipe by now). */
function report(line: string): void {
  try {
    console.error(line);
  } catch {
    // nowhere left to say it
  }
}

// A crash anywhere still leaves through exit(): Node's own exit on an uncaught error would tear
// the ring's thread down with its sockets open (SIGABRT instead of exit code 1).
for (const event of ['uncaughtException', 'unhandledRejection'] as const) {
  process.on(event, (err: unknown) => {
    const e = err as Error;
    report(`error: ${e?.message ?? String(err)}`);
    report(e?.stack ?? '');
    void exit(1, 'this worker crashed');
  });
}

// A lost GPU device fails every later op and read; say so at once and leave, so the coordinator
// names this worker as lost with the reason in its log tail.
onDeviceLost((message) => {
  report(`error: ${message}`);
  void exit(1, 'its GPU device was lost');
});

async function main(): Promise<void> {
  const env = readWorkerEnv();
  await runDistributedWorker(env, (line) => console.log(line), (e) => {
    // Without a coordinator nobody collects this worker's results: stop rather than hang.
    report(`error: ${e.message}`);
    void exit(1, 'the coordinator is gone');
  });
  // Native TensorFlow and ZeroMQ threads may keep the event loop alive: leave explicitly.
  await exit(0, 'training completed');
}

main().catch((err: unknown) => {
  const e = err as Error & { code?: string };
  report(`error: ${e.message ?? String(err)}`);
  if (!(err instanceof WorkerEnvError)) report(e.stack ?? '');
  void exit(err instanceof WorkerEnvError ? 2 : 1, 'this worker failed');
});
