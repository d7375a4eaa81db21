// The errors a run ends with. Each has a literal `code` to switch on and names the rank, the host
// and where to look next.
export class CoordinatorError extends Error {
  override get name(): string {
    return this.constructor.name;
  }
}

/** A worker exited before the run completed (or with a non-zero code). */
export class WorkerFailedError extends CoordinatorError {
  readonly code = 'E_WORKER_FAILED' as const;
  constructor(
    readonly rank: number,
    readonly host: string,
    readonly exitCode: number | null,
    readonly signal: NodeJS.Signals | null,
    readonly reason: string | undefined,
    readonly logTail: string[],
    readonly logFile: string,
    /** How to name it when it has no rank yet (it failed before the Welcome), e.g. "local rank 1". */
    who?: string,
  ) {
    const how = signal ? `was killed by ${signal}` : exitCode === null ? 'failed' : `exited with code ${exitCode}`;
    super(
      `${who ?? `rank ${rank}`} on host ${host} ${how}${reason ? `: ${reason}` : ''}. ` +
        `Last lines of its log (${logFile}):\n${logTail.map((l) => `  ${l}`).join('\n') || '  (empty)'}`,
    );
  }
}

/** Not every worker joined within the join timeout. */
export class JoinTimeoutError extends CoordinatorError {
  readonly code = 'E_JOIN_TIMEOUT' as const;
}

/** Workers finished with different final states: the replicas diverged (a bug, never expected). */
export class ReplicaDivergedError extends CoordinatorError {
  readonly code = 'E_REPLICAS_DIVERGED' as const;
  constructor(
    message: string,
    /** The ranks whose state differs from the reference state (see replicaDivergence), by rank. */
    readonly diverged: ReplicaState[],
    /** The ranks that hold the reference state. */
    readonly agreeing: ReplicaState[],
  ) {
    super(message);
  }
}

/** A rank's final report as the divergence check sees it; `log` says where its log is. */
export interface ReplicaState {
  rank: number;
  host: string;
  stateSha256: string;
  log: string;
}

/**
 * The invariant every "replicas identical" line rests on: all ranks finish with the same state
 * hash. The reference is the hash most ranks hold (rank 0's on a tie, since rank 0 wrote the
 * run's files); every other rank is named with its host. Undefined when all agree.
 */
export function replicaDivergence(states: ReplicaState[]): ReplicaDivergedError | undefined {
  const groups = new Map<string, ReplicaState[]>();
  for (const s of states) groups.set(s.stateSha256, [...(groups.get(s.stateSha256) ?? []), s]);
  if (groups.size <= 1) return undefined;
  const most = Math.max(...[...groups.values()].map((g) => g.length));
  const tied = [...groups.values()].filter((g) => g.length === most);
  const reference = tied.find((g) => g.some((s) => s.rank === 0)) ?? tied[0];
  const diverged = states.filter((s) => !reference.includes(s));
  const short = (h: string) => h.slice(0, 12);
  const ranks = (xs: ReplicaState[]) => `rank${xs.length > 1 ? 's' : ''} ${xs.map((s) => s.rank).join(', ')}`;
  const basis = most * 2 > states.length ? 'the majority' : reference.some((s) => s.rank === 0) ? "no majority: compared with rank 0's" : 'no majority: compared with the most common state';
  const rank0 = states.find((s) => s.rank === 0);
  return new ReplicaDivergedError(
    `the replicas diverged: ${diverged.map((s) => `rank ${s.rank} on host ${s.host} (state sha256 ${short(s.stateSha256)}, log ${s.log})`).join('; ')} ` +
      `finished with another state than ${ranks(reference)} (state sha256 ${short(reference[0].stateSha256)}, ${basis}). ` +
      `Rank 0 wrote the run's checkpoints and summary.json from its own copy${rank0 && diverged.includes(rank0) ? ', one of those that differ' : ''}. ` +
      `Next: check that every machine runs the same dtrain, Node.js and TensorFlow.js versions and backend (pnpm cli doctor on each), ` +
      `compare the logs of the ranks named with rank 0's${rank0 ? ` (${rank0.log})` : ''}, and run again (or continue with --resume from a checkpoint); ` +
      `equal versions must give equal states, so if it happens again report it as a bug with these logs`,
    diverged,
    reference,
  );
}

/**
 * An elastic run stopped because fewer workers than --min-workers were left; rank 0 wrote a
 * checkpoint of the position reached, and `--resume` continues it with any number of workers.
 */
export class RunStoppedError extends CoordinatorError {
  readonly code = 'E_RUN_STOPPED' as const;
}

/** Files offered to other machines could not be read. */
export class OfferedFileError extends CoordinatorError {
  readonly code = 'E_OFFERED_FILE' as const;
}
