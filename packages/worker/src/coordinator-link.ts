// A worker's control connection once training runs: one loop reads everything the coordinator
// sends (heartbeats, commands, the Welcome of a regroup, the final acknowledgement), and a timer
// sends this worker's heartbeats. The coordinator is declared gone when it is silent for the
// timeout (it sends a heartbeat every heartbeat interval), so a worker never outlives it.
//
// Heartbeats leave from the main thread. TensorFlow's kernels run synchronously on it, so a
// heartbeat can be late by the longest synchronous stretch (one step's forward and backward): the
// coordinator warns about a late worker only past max(5 heartbeat intervals, 2 of its step times, a quarter of the timeout)
// and declares it lost only after the timeout, which must exceed the longest step.
import { ControlTimeoutError, dtrain, type ControlClient, type ControlMessage, type PeerInfo } from '@dtrain/transport';
import { RunCompleteError } from './collective.js';

export type Activity = 'idle' | 'compute' | 'allReduce' | 'evaluate' | 'checkpoint' | 'data';

const ACTIVITY_CODE: Record<Activity, number> = {
  idle: dtrain.Heartbeat.Activity.IDLE,
  compute: dtrain.Heartbeat.Activity.COMPUTE,
  allReduce: dtrain.Heartbeat.Activity.ALL_REDUCE,
  evaluate: dtrain.Heartbeat.Activity.EVALUATE,
  checkpoint: dtrain.Heartbeat.Activity.CHECKPOINT,
  data: dtrain.Heartbeat.Activity.DATA,
};

export const CommandKind = dtrain.Command.Kind;

export interface CommandBody {
  kind?: number;
  epoch?: number;
  step?: number | { toNumber(): number };
  reason?: string;
  generation?: number;
}

export interface WelcomeBody {
  rank?: number;
  worldSize?: number;
  generation?: number;
  peers?: { rank?: number; host?: string; dataEndpoints?: string[]; curvePublicKey?: string }[];
  heartbeatMs?: number;
  timeoutMs?: number;
  configJson?: string;
  regroup?: { root?: number; stop?: boolean; reason?: string };
  offeredFiles?: { name?: string; size?: number; sha256?: string }[];
  elastic?: boolean;
}

/** The ring membership a Welcome announces, as Ring.connect takes it. */
export function welcomePeers(w: WelcomeBody): PeerInfo[] {
  return (w.peers ?? []).map((p) => ({ rank: p.rank ?? 0, host: p.host ?? '?', endpoints: [...(p.dataEndpoints ?? [])], publicKey: p.curvePublicKey || undefined }));
}

export interface CoordinatorLinkOptions {
  /** This worker's rank (updated at every regroup through `rank`). */
  rank: number;
  heartbeatMs: number;
  /** The coordinator is gone when silent this long. */
  timeoutMs: number;
  /** "rank 1 on host a", for messages. */
  who: string;
  /** Where the coordinator is, for messages. */
  endpoint: string;
}

export class CoordinatorLink {
  rank: number;
  activity: Activity = 'idle';
  step = 0;
  private seq = 0;
  private lastHeard = Date.now();
  private heartbeat: NodeJS.Timeout | undefined;
  private running = false;
  private stopped = false;
  private welcomes: WelcomeBody[] = [];
  private welcomeWaiter: ((w: WelcomeBody) => void) | undefined;
  private stopWaiter: (() => void) | undefined;
  private stopSeen = false;
  private commandHandler: ((c: CommandBody) => void) | undefined;
  private lostHandler: ((e: Error) => void) | undefined;
  private lostError: Error | undefined;

  constructor(
    private readonly control: ControlClient,
    private readonly o: CoordinatorLinkOptions,
  ) {
    this.rank = o.rank;
  }

  /** ROLLBACK and REGROUP commands (STOP is awaited with `waitForStop`). */
  onCommand(handler: (c: CommandBody) => void): void {
    this.commandHandler = handler;
  }

  /** Called once when the coordinator is gone (silent past the timeout, or it ended the run). */
  onLost(handler: (e: Error) => void): void {
    this.lostHandler = handler;
    if (this.lostError) handler(this.lostError);
  }

  start(): void {
    if (this.running) return;
    this.running = true;
    this.lastHeard = Date.now();
    this.heartbeat = setInterval(() => this.sendHeartbeat(), this.o.heartbeatMs);
    this.heartbeat.unref();
    this.sendHeartbeat();
    void this.pump();
  }

  /** Sends a heartbeat now (also called at phase changes, after a long synchronous stretch). */
  sendHeartbeat(): void {
    if (!this.running || this.stopped) return;
    void this.control
      .send('heartbeat', { rank: this.rank, seq: ++this.seq, step: this.step, activity: ACTIVITY_CODE[this.activity], unixMs: Date.now() })
      .catch(() => undefined);
  }

  setActivity(a: Activity): void {
    const changed = a !== this.activity;
    this.activity = a;
    if (changed) this.sendHeartbeat();
  }

  /**
   * The next Welcome (a regroup's), or an error after `timeoutMs`; RunCompleteError when the
   * coordinator answers with STOP instead (the run completed without this rank).
   */
  nextWelcome(during: string, timeoutMs: number): Promise<WelcomeBody> {
    const queued = this.welcomes.shift();
    if (queued) return Promise.resolve(queued);
    if (this.lostError) return Promise.reject(this.lostError);
    if (this.stopSeen) return Promise.reject(this.completeError());
    return new Promise<WelcomeBody>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.welcomeWaiter = undefined;
        this.completeWaiter = undefined;
        reject(new Error(`${this.o.who}: no Welcome from the coordinator at ${this.o.endpoint} within ${timeoutMs} ms during ${during}`));
      }, timeoutMs);
      this.welcomeWaiter = (w) => {
        clearTimeout(timer);
        this.welcomeWaiter = undefined;
        this.completeWaiter = undefined;
        resolve(w);
      };
      this.completeWaiter = () => {
        clearTimeout(timer);
        this.welcomeWaiter = undefined;
        this.completeWaiter = undefined;
        reject(this.completeError());
      };
      this.lostWaiters.push((e) => {
        clearTimeout(timer);
        reject(e);
      });
    });
  }

  private lostWaiters: ((e: Error) => void)[] = [];
  private completeWaiter: (() => void) | undefined;
  private stopReason = '';

  private completeError(): RunCompleteError {
    return new RunCompleteError(`${this.o.who}: the coordinator stopped this worker: ${this.stopReason || 'the run is complete'}`);
  }

  /** Resolves at the coordinator's Command STOP (the acknowledgement of the final report). */
  waitForStop(timeoutMs: number): Promise<void> {
    if (this.stopSeen) return Promise.resolve();
    return new Promise<void>((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`${this.o.who}: the coordinator did not acknowledge the final report within ${timeoutMs} ms`)), timeoutMs);
      this.stopWaiter = () => {
        clearTimeout(timer);
        resolve();
      };
      this.lostWaiters.push((e) => {
        clearTimeout(timer);
        reject(e);
      });
    });
  }

  stop(): void {
    this.stopped = true;
    if (this.heartbeat) clearInterval(this.heartbeat);
  }

  private lose(e: Error): void {
    if (this.lostError || this.stopped) return;
    this.lostError = e;
    this.stop();
    for (const w of this.lostWaiters.splice(0)) w(e);
    this.lostHandler?.(e);
  }

  private async pump(): Promise<void> {
    // Short receives: after a long synchronous stretch the queued heartbeats are read before the
    // silence is judged, so a busy worker never mistakes its own stall for the coordinator's.
    const slice = Math.max(50, Math.min(this.o.heartbeatMs, 1000));
    while (!this.stopped) {
      let m: ControlMessage;
      try {
        m = await this.control.receive('training', slice);
      } catch (e) {
        if (this.stopped) return;
        if (e instanceof ControlTimeoutError) {
          const silent = Date.now() - this.lastHeard;
          if (silent > this.o.timeoutMs) {
            this.lose(new Error(`${this.o.who}: the coordinator at ${this.o.endpoint} has been silent for ${(silent / 1000).toFixed(1)} s (timeout ${this.o.timeoutMs / 1000} s): it died, hung or cannot be reached. This worker stops; the run folder's last checkpoint is intact (continue with --resume).`));
            return;
          }
          continue;
        }
        this.lose(e as Error);
        return;
      }
      this.lastHeard = Date.now();
      this.dispatch(m);
    }
  }

  private dispatch(m: ControlMessage): void {
    if (m.kind === 'heartbeat') return;
    if (m.kind === 'welcome') {
      const w = m.body as WelcomeBody;
      if (this.welcomeWaiter) this.welcomeWaiter(w);
      else this.welcomes.push(w);
      return;
    }
    if (m.kind === 'command') {
      const c = m.body as CommandBody;
      if (c.kind === CommandKind.STOP) {
        this.stopSeen = true;
        this.stopReason = c.reason ?? '';
        this.stopWaiter?.();
        this.completeWaiter?.();
        return;
      }
      this.commandHandler?.(c);
      return;
    }
    if (m.kind === 'error') {
      const e = m.body as { message?: string };
      this.lose(new Error(`${this.o.who}: the coordinator ended the run: ${e.message ?? 'no reason given'}`));
    }
  }
}
