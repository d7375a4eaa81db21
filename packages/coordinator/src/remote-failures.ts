// Failures on other machines arrive as messages (the worker's own Error, then its join process's
// exit report), often from several ranks at once when a ring link breaks. The membership collects
// them for a moment; this names the root cause: a rank that could not reach its neighbour (its
// message names both hosts and the endpoint) before ranks that only waited. Pure.
import { WorkerFailedError } from './errors.js';

/** What a `dtrain join` process reports when one of its workers exits non-zero (Error.worker_exit, read). */
export interface AgentExitReport {
  localRank: number;
  exitCode: number | null;
  signal: string | null;
  reason?: string;
  logTail: string[];
  logFile: string;
}

/** A worker of another machine, as the root cause sees it. */
export interface RemoteWorker {
  host: string;
  localRank: number;
  /** Its rank, when the Welcome gave it one. */
  rank?: number;
  /** What its Error said, if it sent one. */
  error?: string;
}

export function remoteRootCause(workers: RemoteWorker[], exits: { host: string; report: AgentExitReport }[]): WorkerFailedError | undefined {
  const failed = workers.filter((x) => x.error !== undefined);
  const culprit = failed.find((x) => /could not reach/.test(x.error!)) ?? failed[0];
  if (culprit) {
    const x = exits.find((r) => r.host === culprit.host && r.report.localRank === culprit.localRank)?.report;
    return failure(culprit.rank ?? -1, culprit.host, culprit.localRank, culprit.error, x, x ? `${x.logFile} on host ${culprit.host}` : `its log on host ${culprit.host}`);
  }
  // A worker that died before saying Hello, or without a word: only its join process speaks.
  const r = exits[0];
  if (!r) return undefined;
  const w = workers.find((x) => x.host === r.host && x.localRank === r.report.localRank);
  return failure(w?.rank ?? -1, r.host, r.report.localRank, r.report.reason, r.report, `${r.report.logFile} on host ${r.host}`);
}

function failure(rank: number, host: string, localRank: number, reason: string | undefined, x: AgentExitReport | undefined, logFile: string): WorkerFailedError {
  const signal = (x?.signal as NodeJS.Signals | null | undefined) ?? null;
  return new WorkerFailedError(rank, host, x?.exitCode ?? null, signal, reason, x?.logTail ?? [], logFile, rank < 0 ? `local rank ${localRank}` : undefined);
}
