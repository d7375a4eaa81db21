// Processes the CLI tests start (the CLI itself, a Prometheus), and when they end.
//
// Each one is spawned detached, so it leads a process group of its own and its workers join that
// group: one kill(-pgid) ends the CLI and everything it started. The group is killed when the test
// that started it ends, however it ends (success, failed assertion, timeout), and at the latest
// KILL_MARGIN_MS before that test's timeout: a process never outlives its test, and a test whose
// run hangs fails with the run's own output instead of vitest's bare timeout. Without this a test
// that timed out left its `launch` and workers on the 2 cores, and the next tests failed too.
import { spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import type { TestContext } from 'vitest';

export const CLI_DIR = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');
export const CLI_MAIN = path.join(CLI_DIR, 'src', 'main.ts');

/**
 * Kept between the kill of a test's processes and the test's timeout: for the processes to close
 * their pipes, for the assertions, and for vitest to report. Every test's timeout must exceed it.
 */
export const KILL_MARGIN_MS = 20_000;

/**
 * The longest one training launch of these tests (1-3 workers, 12x12 synthetic images, 1-3 epochs,
 * ~20-60 s alone) may take on a loaded 2-core machine before it counts as hung.
 */
export const RUN_LIMIT_MS = 150_000;

/** The timeout of a test that runs `runs` launches one after another (those at once count once). */
export const testTimeoutFor = (runs: number): number => runs * RUN_LIMIT_MS + KILL_MARGIN_MS;

export interface Line {
  /** When it arrived (Date.now()). */
  t: number;
  text: string;
}

export interface ProcessRun {
  /** Exit code; null when a signal ended it. */
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
  /** stdout and stderr as they arrived, interleaved. */
  out: string;
  /** Every output line (both streams) with its arrival time, for measured delays. */
  lines: Line[];
  t0: number;
  /** When it ended. */
  t1: number;
  /** Whether a process of its group (a worker) was still there when it ended. */
  leftBehind: boolean;
  /** Why the helper killed it, if it did (its limit or its test's deadline). */
  killed?: string;
}

export interface StartOptions {
  /** Added to this process's environment; an undefined value removes the variable. */
  env?: NodeJS.ProcessEnv;
  cwd?: string;
  /** Its own limit, when shorter than what is left of the test (a fault test bounding a run). */
  limitMs?: number;
  /** Sees each output line as it arrives, with the process (to signal it). */
  onLine?: (l: Line, child: ChildProcess) => void;
  /**
   * Processes of its group that outlive it are left alone until the test ends (a test that watches
   * workers exit on their own); by default they are killed when it ends.
   */
  keepGroup?: boolean;
}

export interface Started {
  child: ChildProcess;
  /** Its output so far (complete once `done` resolves). */
  run: ProcessRun;
  done: Promise<ProcessRun>;
}

/** kill(-pgid): the process and every process of its group. */
export function killGroup(child: ChildProcess): void {
  try {
    if (child.pid !== undefined) process.kill(-child.pid, 'SIGKILL');
  } catch {
    // already gone
  }
}

/**
 * Whether a dtrain worker of its process group still runs. On Linux from /proc, so that what is
 * not a worker does not count: tsx's esbuild service, which exits a moment after the process that
 * started it, or a zombie not yet reaped (signal 0 to the group finds both: a flaky "left behind").
 */
function groupAlive(child: ChildProcess): boolean {
  const pgid = child.pid;
  if (pgid === undefined) return false;
  if (process.platform !== 'linux') {
    try {
      process.kill(-pgid, 0);
      return true;
    } catch {
      return false;
    }
  }
  for (const pid of fs.readdirSync('/proc').filter((d) => /^\d+$/.test(d))) {
    try {
      const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
      const [state, , group] = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
      if (Number(group) !== pgid || state === 'Z') continue;
      if (fs.readFileSync(`/proc/${pid}/cmdline`, 'utf8').includes('worker-main')) return true;
    } catch {
      // it ended while we looked
    }
  }
  return false;
}

/** Milliseconds until this test's processes must be dead: KILL_MARGIN_MS before its timeout. */
function timeLeft(ctx: TestContext): number {
  const started = ctx.task.result?.startTime ?? Date.now();
  return started + ctx.task.timeout - KILL_MARGIN_MS - Date.now();
}

/** Collects a stream's lines (a partial line waits for its end) and its text. */
function lineCollector(run: ProcessRun, which: 'stdout' | 'stderr', onLine: (l: Line) => void) {
  let partial = '';
  return {
    take(chunk: Buffer) {
      const text = chunk.toString();
      run[which] += text;
      run.out += text;
      const parts = (partial + text).split('\n');
      partial = parts.pop()!;
      for (const p of parts.filter(Boolean)) onLine({ t: Date.now(), text: p });
    },
    flush() {
      if (partial) onLine({ t: Date.now(), text: partial });
      partial = '';
    },
  };
}

/**
 * Starts `command` in a process group of its own, killed (with its group) when the test ends or
 * its time runs out; `done` resolves when it has ended and its output is complete.
 */
export function startProcess(ctx: TestContext, command: string, args: string[], opts: StartOptions = {}): Started {
  const left = timeLeft(ctx);
  if (left <= 0) throw new Error(`no time left in this test to start ${command}: its timeout (${ctx.task.timeout} ms) leaves less than the ${KILL_MARGIN_MS} ms kept for cleanup`);
  const limit = Math.min(opts.limitMs ?? Infinity, left);
  const why = limit === opts.limitMs ? `its limit of ${limit} ms` : `the test's deadline, ${KILL_MARGIN_MS} ms before its ${ctx.task.timeout} ms timeout`;
  const child = spawn(command, args, { cwd: opts.cwd, env: { ...process.env, ...opts.env }, detached: true, stdio: ['ignore', 'pipe', 'pipe'] });
  ctx.onTestFinished(() => killGroup(child));
  const run: ProcessRun = { code: null, signal: null, stdout: '', stderr: '', out: '', lines: [], t0: Date.now(), t1: 0, leftBehind: false };
  const onLine = (l: Line) => {
    run.lines.push(l);
    opts.onLine?.(l, child);
  };
  const streams = [lineCollector(run, 'stdout', onLine), lineCollector(run, 'stderr', onLine)];
  child.stdout!.on('data', (c: Buffer) => streams[0].take(c));
  child.stderr!.on('data', (c: Buffer) => streams[1].take(c));
  const timer = setTimeout(() => {
    run.killed = `killed after ${limit} ms: ${why}`;
    killGroup(child);
  }, limit);
  const done = new Promise<ProcessRun>((resolve) => {
    child.once('error', (e) => {
      run.stderr += `could not start ${command}: ${e.message}\n`;
    });
    child.once('close', (code, signal) => {
      clearTimeout(timer);
      for (const s of streams) s.flush();
      Object.assign(run, { code, signal, t1: Date.now(), leftBehind: groupAlive(child) });
      if (!opts.keepGroup) killGroup(child);
      resolve(run);
    });
  });
  return { child, run, done };
}

/** `node --import tsx src/main.ts ...args` from packages/cli, as startProcess. */
export function startCli(ctx: TestContext, args: string[], opts: StartOptions & { prefix?: string[] } = {}): Started {
  const argv = [...(opts.prefix ?? []), process.execPath, '--import', 'tsx', CLI_MAIN, ...args];
  return startProcess(ctx, argv[0], argv.slice(1), { cwd: CLI_DIR, ...opts });
}

/** The CLI run to its end (see startCli). */
export function runCli(ctx: TestContext, args: string[], opts: StartOptions & { prefix?: string[] } = {}): Promise<ProcessRun> {
  return startCli(ctx, args, opts).done;
}

// launch()/join() inside the test process: their workers, killed by pid (shared with coordinator's tests).
export { killWorkersAtEnd } from '../../../coordinator/src/testing/workers.js';
