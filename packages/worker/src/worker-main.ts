// The process a launcher starts for each worker: `node --import tsx worker-main.ts`, configured by
// the environment (see distributed.ts). Exit 0 only when training completed; 1 when it failed
// (the error is printed and sent to the coordinator); 2 for a wrong environment.
import { closeThreadedRings } from '@dtrain/transport';
import { readWorkerEnv, runDistributedWorker, WorkerEnvError } from './distributed.js';

/**
 * Every exit goes through here: the ring's thread must have closed its ZeroMQ sockets first, or
 * zeromq.js aborts the process (SIGABRT) instead of exiting with `code` (ThreadedRing).
 */
async function exit(code: number, why: string): Promise<never> {
  await closeThreadedRings(why).catch(() => undefined);
  process.exit(code);
}

// A crash anywhere still leaves through exit(): Node's own exit on an uncaught error would tear
// the ring's thread down with its sockets open (SIGABRT instead of exit code 1).
for (const event of ['uncaughtException', 'unhandledRejection'] as const) {
  process.on(event, (err: unknown) => {
    const e = err as Error;
    console.error(`error: ${e?.message ?? String(err)}`);
    console.error(e?.stack ?? '');
    void exit(1, 'this worker crashed');
  });
}

async function main(): Promise<void> {
  const env = readWorkerEnv();
  await runDistributedWorker(env, (line) => console.log(line), (e) => {
    // Without a coordinator nobody collects this worker's results: stop rather than hang.
    console.error(`error: ${e.message}`);
    void exit(1, 'the coordinator is gone');
  });
  // Native TensorFlow and ZeroMQ threads may keep the event loop alive: leave explicitly.
  await exit(0, 'training completed');
}

main().catch((err: unknown) => {
  const e = err as Error & { code?: string };
  console.error(`error: ${e.message ?? String(err)}`);
  if (!(err instanceof WorkerEnvError)) console.error(e.stack ?? '');
  void exit(err instanceof WorkerEnvError ? 2 : 1, 'this worker failed');
});
