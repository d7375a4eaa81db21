// The stall inspector's rule (Horovod's, in spirit): a worker that has been silent too long is
// named first (late), and counted gone only after the timeout. Pure: membership.ts acts on it.

export interface Timing {
  heartbeatMs: number;
  /** Silence after which a worker counts as gone. */
  timeoutMs: number;
  /** How long a worker may take to start (it loads TensorFlow and builds the model without heartbeats). */
  joinTimeoutMs: number;
}

export interface HeardOf {
  /** Date.now() of its last heartbeat or report. */
  lastHeard: number;
  /** Its last step's duration (a step's compute blocks its heartbeats). */
  stepMs: number;
  /** Training began: before that it is held to the join timeout instead. */
  started: boolean;
}

/** 'starting': silent, but still within its start-up time; 'late': to be named; 'gone': past the timeout. */
export type Lateness = 'on time' | 'starting' | 'late' | 'gone';

export function lateness(x: HeardOf, now: number, t: Timing): { silentMs: number; verdict: Lateness } {
  const silentMs = now - x.lastHeard;
  // Late: past 5 intervals, 2 of its own step times and a quarter of the timeout, whichever is longest.
  const warnAfter = Math.max(5 * t.heartbeatMs, 2 * x.stepMs, t.timeoutMs / 4);
  if (!x.started && silentMs <= Math.max(t.timeoutMs, t.joinTimeoutMs)) return { silentMs, verdict: 'starting' };
  if (silentMs > t.timeoutMs) return { silentMs, verdict: 'gone' };
  return { silentMs, verdict: silentMs > warnAfter ? 'late' : 'on time' };
}
