// The trainer's ElasticCollective over a ring that is rebuilt at every membership change.
//
// A regroup, seen from one worker:
//   1. its ring broke (a neighbour died: PeerLostError/PeerTimeoutError), or the coordinator sent
//      ROLLBACK for this generation (the ring is aborted, so a collective waiting for a silent
//      peer returns at once), or the coordinator sent REGROUP and the trainer finished the step;
//   2. the trainer calls regroup(committed): the old ring closes, a new one binds (new endpoints),
//      and a StepReport with `regroup: {generation, committed, endpoints, key, reason}` tells the
//      coordinator this worker is ready and how far it got;
//   3. the coordinator's Welcome of the next generation gives the new rank, world size and peers,
//      and (Welcome.regroup) the root whose state everyone adopts and whether to stop;
//   4. the new ring connects (the preflight of a launch), and the trainer syncs from the root.
import { ThreadedRing, TransportError, type RegroupReport, type RingOptions } from '@dtrain/transport';
import { GroupChangedError, type BucketRanges, type ElasticCollective, type Progress, type RegroupResult, type StagedReduce } from './collective.js';
import { CommandKind, welcomePeers, type CommandBody, type CoordinatorLink, type WelcomeBody } from './coordinator-link.js';
import { RingCollective, type RingCollectiveOptions } from './ring-collective.js';

/** What the Welcome of a regroup announces (Welcome.regroup). */
export interface RegroupAnnouncement {
  regroup: { root: number; stop: boolean; reason: string };
}

/** The report each worker sends when it leaves a group (its type is the protocol's: @dtrain/transport). */
export type { RegroupReport };

export interface ElasticRingOptions {
  link: CoordinatorLink;
  /** How each new ring is made (the same listen address, port, security as the first). */
  ringOptions: Omit<RingOptions, 'rank' | 'worldSize' | 'generation' | 'runId'>;
  runId: string;
  /** Sends a report to the coordinator (StepReport.regroup). */
  report: (r: RegroupReport) => Promise<void>;
  /** How long to wait for the Welcome of the next group. */
  regroupTimeoutMs: number;
  initialRoot?: number;
  collectiveOptions?: RingCollectiveOptions;
  log?: (line: string) => void;
  /** FOR TESTS: called with each regroup's Welcome before the new ring connects. */
  onWelcome?: (w: WelcomeBody) => void;
}

export class ElasticRingCollective implements ElasticCollective {
  readonly elastic = true as const;
  readonly initialRoot: number;
  private ring_: ThreadedRing;
  private inner: RingCollective;
  private requested = false;
  private leftBecause = '';
  /**
   * The generation of the last Welcome: from it on, commands for it apply and a regroup reports
   * leaving it, also while its ring is still being set up (the ring learns its generation only
   * once connected) or when that setup failed. 0 between leaving a group and the next Welcome:
   * a ROLLBACK of the group just left is stale then (it must not abort the ring being prepared).
   */
  private joined: number;
  /** The generation the last regroup left (what `generation` says between groups). */
  private left = 0;
  /** A ROLLBACK for a generation whose Welcome has not been seen yet (it came first). */
  private rolledBackAhead = 0;

  constructor(
    ring: ThreadedRing,
    private readonly o: ElasticRingOptions,
  ) {
    this.ring_ = ring;
    this.joined = ring.generation;
    this.inner = new RingCollective(ring, o.collectiveOptions);
    this.initialRoot = o.initialRoot ?? 0;
    o.link.onCommand((c) => this.onCommand(c));
  }

  get ring(): ThreadedRing {
    return this.ring_;
  }
  get rank(): number {
    return this.ring_.rank;
  }
  get worldSize(): number {
    return this.ring_.worldSize;
  }
  get generation(): number {
    return this.joined || this.left;
  }
  get regroupRequested(): boolean {
    return this.requested;
  }

  stats() {
    return this.inner.stats();
  }

  allReduceMean(buf: Float32Array): Promise<void> {
    return this.guard(() => this.inner.allReduceMean(buf));
  }
  allReduceSum(buf: Float32Array): Promise<void> {
    return this.guard(() => this.inner.allReduceSum(buf));
  }
  broadcast(buf: Float32Array, root: number): Promise<void> {
    return this.guard(() => this.inner.broadcast(buf, root));
  }

  allReduceMeanStaged(buf: Float32Array, buckets: BucketRanges): StagedReduce {
    const staged = this.inner.allReduceMeanStaged(buf, buckets);
    return { ready: (i) => staged.ready(i), done: this.guard(() => staged.done) };
  }

  private async guard(f: () => Promise<void>): Promise<void> {
    try {
      await f();
    } catch (e) {
      // Any ring failure in an elastic run is a membership question the coordinator settles.
      if (e instanceof TransportError) {
        this.leftBecause = e.message;
        throw new GroupChangedError(e.message, { cause: e });
      }
      throw e;
    }
  }

  private onCommand(c: CommandBody): void {
    if (process.env.DTRAIN_DEBUG) this.o.log?.(`DEBUG command ${c.kind} gen ${c.generation} (joined ${this.joined})`);
    // Commands name the generation they are for: one for a ring already left is stale.
    const generation = c.generation ?? 0;
    if (c.kind === CommandKind.ROLLBACK && generation > this.joined) this.rolledBackAhead = Math.max(this.rolledBackAhead, generation);
    if (generation !== this.joined) return;
    if (c.kind === CommandKind.ROLLBACK) {
      this.o.log?.(`rank ${this.rank}: the coordinator rolls back generation ${c.generation}: ${c.reason ?? ''}`);
      this.ring_.abort(`the coordinator rolled back the step: ${c.reason ?? 'a member was lost'}`);
    } else if (c.kind === CommandKind.REGROUP) {
      this.requested = true;
    }
  }

  async regroup(committed: Progress): Promise<RegroupResult> {
    const left = this.joined;
    this.left = left;
    this.joined = 0;
    const dbg = (m: string) => process.env.DTRAIN_DEBUG && this.o.log?.(`DEBUG regroup: ${m}`);
    dbg(`start, leaving ${left}, broken: ${this.ring_.error?.message}`);
    const wasRequested = this.requested;
    this.requested = false;
    this.o.link.setActivity('idle');
    await this.ring_.close().catch(() => undefined);
    dbg('closed');
    const ring = await createRingRetrying({ ...this.o.ringOptions, rank: 0, worldSize: 1 });
    this.ring_ = ring;
    this.inner = new RingCollective(ring, this.o.collectiveOptions);
    const reason = this.leftBecause || (wasRequested ? 'a worker joins' : 'the coordinator asked');
    this.leftBecause = '';
    await this.o.report({ kind: 'regroup', generation: left, committed, endpoints: ring.endpoints, key: ring.publicKey ?? '', reason });
    dbg('reported');
    const w = await this.o.link.nextWelcome(`the regroup after generation ${left}`, this.o.regroupTimeoutMs);
    const a = parseAnnouncement(w);
    const rank = w.rank ?? 0;
    const worldSize = w.worldSize ?? 0;
    const peers = welcomePeers(w);
    this.joined = w.generation ?? left + 1;
    this.o.onWelcome?.(w);
    // Rolled back before its ring was up: a member of the new group was lost already.
    if (this.rolledBackAhead >= this.joined) ring.abort(`the coordinator rolled back generation ${this.joined} before its ring was up`);
    try {
      await ring.connect(peers, { runId: this.o.runId, generation: this.joined, rank, worldSize });
    } catch (e) {
      if (e instanceof TransportError) {
        this.leftBecause = e.message;
        throw new GroupChangedError(e.message, { cause: e });
      }
      throw e;
    }
    this.o.link.rank = rank;
    this.o.log?.(`rank ${rank} of ${worldSize} (generation ${ring.generation}): ${a.reason}; state from rank ${a.root}${a.stop ? '; stopping after a checkpoint' : ''}`);
    return { root: a.root, stop: a.stop, reason: a.reason };
  }

  close(): Promise<void> {
    return this.ring_.close();
  }
}

export function parseAnnouncement(w: WelcomeBody): RegroupAnnouncement['regroup'] {
  const r = w.regroup;
  const root = r?.root ?? 0;
  if (r && Number.isInteger(root) && root >= 0 && root < (w.worldSize ?? 0)) return { root, stop: r.stop === true, reason: r.reason || 'regroup' };
  return { root: 0, stop: false, reason: 'regroup' };
}

/** A fixed ring port may still be held by the ring just closed: retry the bind for a few seconds. */
async function createRingRetrying(opts: RingOptions): Promise<ThreadedRing> {
  const deadline = Date.now() + 10_000;
  for (;;) {
    try {
      return await ThreadedRing.create(opts);
    } catch (e) {
      if (!opts.port || Date.now() > deadline) throw e;
      await new Promise((r) => setTimeout(r, 200));
    }
  }
}
