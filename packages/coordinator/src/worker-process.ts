// A worker process of this machine, as `launch` and `join` start it: `node --import tsx ENTRY`
// with the environment of writeWorkerEnv, its stdout and stderr copied line by line into its log
// file (each line prefixed, e.g. "[rank 1] ") and the last lines kept for the error that names it.
import { spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import { createInterface } from 'node:readline';

export interface WorkerExit {
  code: number | null;
  signal: NodeJS.Signals | null;
  /** Set when the process could not be started at all. */
  spawnError?: string;
}

export interface WorkerProcess {
  child: ChildProcess;
  logFile: string;
  /** Its last lines of output (at most tailLines), newest last. */
  tail: string[];
  /** The process ended and its output streams closed (the child's 'close'). */
  exited: Promise<WorkerExit>;
  /** Every line of its output is in the log file. */
  logged: Promise<void>;
}

export interface StartWorker {
  /** The worker script (@dtrain/worker's WORKER_ENTRY). */
  entry: string;
  env: NodeJS.ProcessEnv;
  logFile: string;
  tailLines: number;
  /** Each log line's prefix, asked per line: a joined worker's rank is known only after the Welcome. */
  prefix: () => string;
}

export function startWorker(o: StartWorker): WorkerProcess {
  const child = spawn(process.execPath, ['--import', 'tsx', o.entry], { env: o.env, stdio: ['ignore', 'pipe', 'pipe'] });
  const log = fs.createWriteStream(o.logFile, { flags: 'a' });
  const tail: string[] = [];
  let open = 2;
  const logged = new Promise<void>((resolve) => {
    for (const stream of [child.stdout!, child.stderr!]) {
      const rl = createInterface({ input: stream });
      rl.on('line', (line) => {
        log.write(`${o.prefix()} ${line}\n`);
        tail.push(line);
        if (tail.length > o.tailLines) tail.shift();
      });
      rl.on('close', () => {
        if (--open === 0) log.end(() => resolve());
      });
    }
  });
  let spawnError: string | undefined;
  const exited = new Promise<WorkerExit>((resolve) => {
    child.on('error', (e) => {
      spawnError = `could not start ${process.execPath}: ${e.message}`;
    });
    child.on('close', (code, signal) => resolve({ code, signal, spawnError }));
  });
  return { child, logFile: o.logFile, tail, exited, logged };
}

/** Whether the process has neither exited nor been killed by a signal yet. */
export const running = (child: ChildProcess): boolean => child.exitCode === null && child.signalCode === null;

/**
 * SIGTERM to every running worker now, SIGKILL to those still running after `graceMs` (checkpoints
 * are written atomically: a worker stopped mid-step loses that step, not a file). Returns the
 * grace timer, which the caller clears once all have exited.
 */
export function stopWorkers(children: ChildProcess[], graceMs = 5000): NodeJS.Timeout {
  for (const c of children) if (running(c)) c.kill('SIGTERM');
  return setTimeout(() => {
    for (const c of children) if (running(c)) c.kill('SIGKILL');
  }, graceMs);
}
