// The process a launcher starts for each worker: `node --import tsx worker-main.ts`, configured by
// the environment (see distributed.ts). Exit 0 only when training completed; 1 when it failed
// (the error is printed and sent to the coordinator); 2 for a wrong environment.
import { readWorkerEnv, runDistributedWorker, WorkerEnvError } from './distributed.js';

async function main(): Promise<void> {
  const env = readWorkerEnv();
  await runDistributedWorker(env, (line) => console.log(line), (e) => {
    // Without a coordinator nobody collects this worker's results: stop rather than hang.
    console.error(`error: ${e.message}`);
    process.exit(1);
  });
  // Native TensorFlow and ZeroMQ threads may keep the event loop alive: leave explicitly.
  process.exit(0);
}

main().catch((err: unknown) => {
  const e = err as Error & { code?: string };
  console.error(`error: ${e.message ?? String(err)}`);
  if (!(err instanceof WorkerEnvError)) console.error(e.stack ?? '');
  process.exit(err instanceof WorkerEnvError ? 2 : 1);
});
