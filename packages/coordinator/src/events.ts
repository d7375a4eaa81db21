// What a run tells its caller as it goes (LaunchOptions.onEvent): the CLI prints them.
export type RunEvent =
  | { kind: 'listening'; endpoint: string; runId: string; logDir: string }
  | { kind: 'metrics'; url: string; port: number }
  | { kind: 'spawned'; rank: number; pid: number; logFile: string }
  | { kind: 'node'; host: string; workers: number; nodes: number; expectedNodes: number }
  | { kind: 'joined'; rank: number; host: string; device: string; joined: number; expected: number }
  | { kind: 'offered'; files: { name: string; size: number; sha256: string }[] }
  | { kind: 'welcomed'; worldSize: number; hosts: { host: string; ranks: number[] }[] }
  | { kind: 'report'; rank: number; detail: Record<string, unknown> }
  /** A worker is late (the stall inspector): no heartbeat for `silentSec`; it is declared lost only after the timeout. */
  | { kind: 'stall'; rank: number; host: string; silentSec: number; activity: string; step: number; timeoutSec: number }
  /** Elastic: a worker was lost (died, timed out, cut off); the others regroup without it. */
  | { kind: 'lost'; rank: number; host: string; reason: string; logTail: string[]; logFile: string; remaining: number }
  /** Elastic: the run completed (others sent final reports) while this worker's last collective failed: it was stopped. */
  | { kind: 'released'; rank: number; host: string; reason: string }
  /** Elastic: a new group formed (after a loss, or to admit joining workers). */
  | { kind: 'regrouped'; generation: number; worldSize: number; root: number; reason: string; stop: boolean; hosts: { host: string; ranks: number[] }[] };
