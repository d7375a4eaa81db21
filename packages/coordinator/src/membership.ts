// Who is in the run: the membership state machine of the coordinator (Horovod's elastic
// WorkerStateRegistry is the model). It admits or refuses Hellos, forms the group and numbers its
// ranks, hears heartbeats and final reports, and decides what a failure means: without --elastic
// any lost worker ends the run; with it, the survivors roll back the step in flight, regroup
// without it (a new generation) and go on, and joiners are admitted at a step boundary.
// No sockets and no processes here: what it does to the world goes through MembershipPorts, so it
// is tested by driving it with messages (membership.test.ts).
//
// Invariants it keeps: `byRank[r].rank === r` for the current group; a lost or released member is
// in no later group; the first failure wins (ports.fail) and nothing changes after it.
import { countAuthRefused, dtrain, type Bodies, type BodyKind, type KeyMaterial, type RegroupReport } from '@dtrain/transport';
import { WorkerFailedError } from './errors.js';
import type { RunEvent } from './events.js';
import type { TrainingMetrics } from './metrics.js';
import type { OfferedFile } from './file-offer.js';
import { remoteRootCause, type AgentExitReport } from './remote-failures.js';
import { lateness } from './stall.js';
import type { WorkerExit } from './worker-process.js';

const Kind = dtrain.Command.Kind;
const Code = dtrain.Error.Code;

/**
 * Hello.requested_rank of a `dtrain join` process itself (not a worker): it registers its host and
 * how many workers it will start, and receives Command START (which carries the run id), so it can
 * later report its workers' exits (Error with a WorkerExit) and hear about the end.
 */
export const NODE_AGENT_RANK = -2;

/** What a Hello may call its host (RFC 1123 names, and '_' as some machines have). */
const HOST_NAME = /^[A-Za-z0-9][A-Za-z0-9._-]{0,252}$/;

const ACTIVITY_NAMES = ['idle', 'compute', 'all-reduce', 'evaluate', 'checkpoint', 'data'];

/** A worker that said Hello: one of ours (local, requested its RANK) or one of another machine's. */
export interface Member {
  peer: Buffer;
  host: string;
  localRank: number;
  local: boolean;
  endpoints: string[];
  device: string;
  /** Hello.curve_public_key ('' without CURVE): its ring's key, passed on in Welcome.peers. */
  key: string;
  /** Local workers: their RANK until the Welcome; then the rank in the current group. */
  rank: number;
  /** Local workers: the RANK they were started with (their slot and log file). */
  slot: number;
  error?: string;
  final?: Record<string, unknown>;
  /** Heartbeats and the stall inspector. */
  lastHeard: number;
  activity: string;
  step: number;
  stepMs: number;
  warned: boolean;
  /**
   * Training began (a heartbeat with an activity, or a step report). Before that the worker loads
   * TensorFlow and builds the model, long synchronous stretches without heartbeats: it is held to
   * the join timeout instead, and not reported as late.
   */
  started: boolean;
  /** The worker process's count of dropped messages, as last reported (a RejectedReport). */
  rejectedSeen: number;
  /** Why it was declared lost (elastic); a lost member is out of every later group. */
  lost?: string;
  /** Elastic: released with STOP because the run completed while its last collective failed. */
  released?: string;
}

/** Another machine, known from its `join` process's registration or its first worker's Hello. */
interface Node {
  host: string;
  expected: number;
  agent?: Buffer;
}

export interface MembershipOptions {
  /** Workers this machine starts (RANK 0..localWorkers-1). */
  localWorkers: number;
  /** Machines in the run, this one included. */
  nodesExpected: number;
  localHost: string;
  elastic: boolean;
  /** Elastic: with fewer workers the run stops after a checkpoint. */
  minWorkers: number;
  heartbeatMs: number;
  timeoutMs: number;
  joinTimeoutMs: number;
  /** CURVE: a Hello's key must be in this allow-list (named, with its directory, in refusals). */
  keys?: KeyMaterial;
}

/** What the membership does to the world: launch wires these to the control socket, the local processes and the run's outcome. */
export interface MembershipPorts {
  send<K extends BodyKind>(peer: Buffer, kind: K, body: Bodies[K]): Promise<void>;
  /** A local worker's log, by slot, for the errors that name it. */
  logOf(slot: number): { tail: string[]; logFile: string };
  /** Stops a local worker's process (SIGKILL) if it still runs: a hung one must not come back into a group that moved on. */
  kill(slot: number): void;
  emit(e: RunEvent): void;
  /** Ends the run with this error; the first one counts. */
  fail(e: Error): void;
  failed(): boolean;
}

type LostHow = 'exit' | 'signal' | 'timeout' | 'connection' | 'stalled';
type Regroup = { reasons: string[]; ready: Map<Member, RegroupReport>; timer: NodeJS.Timeout; rollback: boolean };

export class Membership {
  /** Everyone who said Hello and is not lost, by peer (hex routing id). */
  readonly members = new Map<string, Member>();
  /** The current group: ranks 0..worldSize-1 of this generation. */
  readonly byRank: Member[] = [];
  readonly lostMembers: Member[] = [];
  generation = 1;
  worldSize = 0;
  welcomed = false;
  /** All expected workers said Hello (before the first Welcome). */
  readonly joined: Promise<void>;
  /** Every worker of another machine in the group sent its final report. */
  readonly remoteDone: Promise<void>;

  private readonly nodes = new Map<string, Node>(); // other machines, by host
  private readonly agents = new Map<string, string>(); // agent peer (hex) -> host
  private readonly pendingJoiners: Member[] = [];
  private regroup: Regroup | undefined;
  /** What the first Welcome told every worker of the run (and a joiner's Welcome tells it). */
  private runConfig: { configJson: string; offeredFiles: OfferedFile[]; elastic: boolean } = { configJson: '', offeredFiles: [], elastic: false };
  private localExits = 0;
  private allJoined!: () => void;
  private remoteFinished!: () => void;
  // Failures of other machines, collected for a moment before the root cause is named.
  private remoteGrace: NodeJS.Timeout | undefined;
  private pendingLocal: WorkerFailedError | undefined;
  private readonly remoteExits: { host: string; report: AgentExitReport }[] = [];

  constructor(
    private readonly o: MembershipOptions,
    private readonly ports: MembershipPorts,
    private readonly metrics: TrainingMetrics,
  ) {
    this.joined = new Promise((resolve) => (this.allJoined = resolve));
    this.remoteDone = new Promise((resolve) => (this.remoteFinished = resolve));
    metrics.setWorkers(0, o.localWorkers);
  }

  private get multi(): boolean {
    return this.o.nodesExpected > 1;
  }

  /** The workers expected in all: this machine's and those each other machine registered. */
  expectedWorld(): number {
    return this.o.localWorkers + [...this.nodes.values()].reduce((a, x) => a + x.expected, 0);
  }

  memberOf(peer: Buffer): Member | undefined {
    return this.members.get(peer.toString('hex'));
  }

  private joinedOn(host: string): number {
    return [...this.members.values()].filter((m) => !m.local && m.host === host).length;
  }

  private send<K extends BodyKind>(peer: Buffer, kind: K, body: Bodies[K]): void {
    void this.ports.send(peer, kind, body).catch(() => undefined);
  }

  // ---- rendezvous ------------------------------------------------------------------------------

  hello(peer: Buffer, h: dtrain.Hello.$Properties, authenticatedKey: string | undefined): void {
    const requested = h.requestedRank ?? 0; // proto3 omits 0
    const host = h.host ?? '';
    const localRank = h.localRank ?? 0;
    const refuse = (why: string) => this.send(peer, 'error', { code: Code.REFUSED, message: why, rank: requested, host });
    const refusal = this.helloRefusal(h, host, authenticatedKey);
    if (refusal) return refuse(refusal);
    if (requested === NODE_AGENT_RANK || requested === -1) {
      const r = this.fromAnotherMachine(peer, h, requested, host);
      if (r) return r === 'agent' ? undefined : refuse(r);
    } else {
      if (!Number.isInteger(requested) || requested < 0 || requested >= this.o.localWorkers) return refuse(`RANK ${requested} is not in 0..${this.o.localWorkers - 1}`);
      const taken = [...this.members.values()].find((x) => x.local && x.rank === requested);
      if (taken) return refuse(`rank ${requested} already joined from host ${taken.host}`);
    }
    if (!(h.dataEndpoints ?? []).length) return refuse('a Hello needs the ring endpoints');
    const key = this.o.keys ? (authenticatedKey ?? h.curvePublicKey ?? '') : (h.curvePublicKey ?? '');
    const member: Member = {
      peer, host, localRank, local: requested >= 0, endpoints: h.dataEndpoints ?? [], device: h.device ?? '', key,
      rank: requested, slot: requested, lastHeard: Date.now(), activity: 'idle', step: 0, stepMs: 0, warned: false, started: false, rejectedSeen: 0,
    };
    this.members.set(peer.toString('hex'), member);
    if (this.welcomed) {
      // Elastic: admitted at the next step boundary; the group finishes its step, then regroups with it.
      this.pendingJoiners.push(member);
      this.ports.emit({ kind: 'joined', rank: -1, host, device: member.device, joined: this.members.size, expected: this.members.size });
      this.startRegroup('join', `host ${host} joins with local rank ${localRank}`);
      return;
    }
    this.metrics.setWorkers(this.members.size, this.expectedWorld());
    this.ports.emit({ kind: 'joined', rank: requested, host, device: member.device, joined: this.members.size, expected: this.expectedWorld() });
    this.checkJoined();
  }

  /** Why a Hello is refused whoever sends it, or undefined. */
  private helloRefusal(h: dtrain.Hello.$Properties, host: string, authenticatedKey: string | undefined): string | undefined {
    if (this.welcomed && !this.o.elastic) return `the run already started with ${this.worldSize} workers (start it with --elastic to admit workers while it runs)`;
    if (!host) return 'a Hello needs a host';
    // The host is printed to the operator's terminal and labels metrics: a name, not text.
    if (!HOST_NAME.test(host)) {
      const shown = JSON.stringify(host.slice(0, 64)) + (host.length > 64 ? ` (and ${host.length - 64} more characters)` : '');
      return `a Hello's host must be a host name: at most 253 letters, digits, '.', '-' and '_', starting with a letter or digit; got ${shown} (pnpm cli join --host NAME, or DTRAIN_HOST)`;
    }
    // The connection passed the CURVE handshake with an allow-listed key; the key a Hello names
    // for its ring must be allow-listed too, or the other workers would connect to a stranger.
    const keys = this.o.keys;
    if (keys && !keys.allowed.some((k) => k.publicKey === (authenticatedKey ?? h.curvePublicKey ?? ''))) {
      const why = h.curvePublicKey ? `its key ${h.curvePublicKey}` : 'it sent no CURVE key (started without --keys?)';
      countAuthRefused(`hello key not allowed`);
      process.stderr.write(`coordinator: refused a Hello from host ${host}: ${why} is not in ${keys.dir}/allowed_keys\n`);
      return `host ${host} is not allowed: ${why} is not in the coordinator's allow-list (${keys.dir}/allowed_keys); on the coordinator's machine run: pnpm cli keys add-peer '<line of pnpm cli keys show on ${host}>'`;
    }
    return undefined;
  }

  /**
   * A Hello of another machine: its join process (NODE_AGENT_RANK) registers the host and how many
   * workers it starts; its workers (-1) then join one by one. Returns a refusal, 'agent' when the
   * Hello was the registration (answered), or undefined to admit the worker.
   */
  private fromAnotherMachine(peer: Buffer, h: dtrain.Hello.$Properties, requested: number, host: string): string | 'agent' | undefined {
    const during = this.welcomed && this.o.elastic;
    if (!this.multi && !during) return `this coordinator runs on one machine (${this.o.localWorkers} workers); start it with --nodes M --listen ADDR:PORT to accept workers of other machines, or --elastic to admit them while it runs`;
    if (host === this.o.localHost) return `host ${host} has the same name as the coordinator's machine: give every machine its own name (pnpm cli join --host NAME, or DTRAIN_HOST)`;
    let node = this.nodes.get(host);
    if (during && requested === NODE_AGENT_RANK) {
      // Elastic: a machine (new, or back after losing its workers) adds workers to the running group.
      const more = h.localWorldSize ?? 0;
      if (more < 1) return `host ${host} did not say how many workers it starts (LOCAL_WORLD_SIZE): start them with pnpm cli join`;
      if (!node) this.nodes.set(host, (node = { host, expected: 0 }));
      node.expected = this.joinedOn(host) + more;
      this.ports.emit({ kind: 'node', host, workers: more, nodes: this.nodes.size + 1, expectedNodes: this.nodes.size + 1 });
    }
    if (!node) {
      const refusal = this.registerNode(host, h.localWorldSize ?? 0);
      if (typeof refusal === 'string') return refusal;
      node = refusal;
    }
    if (requested === NODE_AGENT_RANK) {
      node.agent = peer;
      this.agents.set(peer.toString('hex'), host);
      // The reply carries the run id, so the join process's later reports are accepted.
      this.send(peer, 'command', { kind: Kind.START, reason: this.o.elastic ? 'registered (elastic)' : 'registered', elastic: this.o.elastic });
      this.checkJoined();
      return 'agent';
    }
    const localRank = h.localRank ?? 0;
    if ([...this.members.values()].some((x) => x.host === host && x.localRank === localRank)) return `local rank ${localRank} of host ${host} already joined`;
    if (this.joinedOn(host) >= node.expected) return `host ${host} registered ${node.expected} workers, and all of them have joined`;
    return undefined;
  }

  /** A machine not seen before, with `expected` workers: the Node, or why it is refused. */
  private registerNode(host: string, expected: number): Node | string {
    const { nodesExpected } = this.o;
    if (this.nodes.size >= nodesExpected - 1) {
      return `the run expects ${nodesExpected} machines and all have joined (this one${[...this.nodes.keys()].map((x) => `, ${x}`).join('')}); host ${host} is one too many`;
    }
    if (expected < 1) return `host ${host} did not say how many workers it starts (LOCAL_WORLD_SIZE): start them with pnpm cli join`;
    const node = { host, expected };
    this.nodes.set(host, node);
    this.ports.emit({ kind: 'node', host, workers: expected, nodes: this.nodes.size + 1, expectedNodes: nodesExpected });
    this.metrics.setWorkers(this.members.size, this.expectedWorld());
    return node;
  }

  private checkJoined(): void {
    const localJoined = [...this.members.values()].filter((m) => m.local).length;
    if (this.welcomed || localJoined < this.o.localWorkers || this.nodes.size < this.o.nodesExpected - 1) return;
    for (const node of this.nodes.values()) if (this.joinedOn(node.host) < node.expected) return;
    this.allJoined();
  }

  /**
   * The first Welcome. Ranks: this machine's workers first (their RANK), then the other machines'
   * by host name, each by local rank. `config` goes to every worker as Welcome.config_json.
   */
  async welcome(config: unknown, offeredFiles: OfferedFile[] = []): Promise<void> {
    const local = [...this.members.values()].filter((x) => x.local).sort((a, b) => a.rank - b.rank);
    const remote = [...this.members.values()].filter((x) => !x.local).sort(byHostThenLocalRank);
    this.byRank.push(...local, ...remote);
    this.worldSize = this.byRank.length;
    this.byRank.forEach((x, r) => (x.rank = r));
    this.runConfig = { configJson: JSON.stringify(config), offeredFiles, elastic: this.o.elastic };
    this.welcomed = true;
    for (const x of this.byRank) x.lastHeard = Date.now();
    this.metrics.setWorkers(this.worldSize, this.worldSize);
    const { worldSize, generation } = this;
    const peers = this.peers();
    const { heartbeatMs, timeoutMs } = this.o;
    await Promise.all(this.byRank.map((x) => this.ports.send(x.peer, 'welcome', { rank: x.rank, worldSize, generation, peers, heartbeatMs, timeoutMs, ...this.runConfig })));
    this.tellAgents();
    this.ports.emit({ kind: 'welcomed', worldSize, hosts: this.groupHosts() });
    if (remote.length === 0) this.remoteFinished();
  }

  private peers(): dtrain.Peer.$Properties[] {
    return this.byRank.map((x) => ({ rank: x.rank, host: x.host, dataEndpoints: x.endpoints, curvePublicKey: x.key }));
  }

  /** Tells each machine's node agent the rank of each of its workers in the group just welcomed. */
  private tellAgents(): void {
    for (const node of this.nodes.values()) {
      if (node.agent === undefined) continue;
      const mine = this.byRank.filter((x) => !x.local && x.host === node.host);
      const ranks = new Array<number>(Math.max(0, ...mine.map((x) => x.localRank + 1))).fill(-1);
      for (const x of mine) ranks[x.localRank] = x.rank;
      this.send(node.agent, 'rankAssignment', { generation: this.generation, worldSize: this.worldSize, ranks });
    }
  }

  groupHosts(): { host: string; ranks: number[] }[] {
    const hs: { host: string; ranks: number[] }[] = [];
    for (const x of this.byRank) {
      const last = hs.at(-1);
      if (last?.host === x.host) last.ranks.push(x.rank);
      else hs.push({ host: x.host, ranks: [x.rank] });
    }
    return hs;
  }

  // ---- while training --------------------------------------------------------------------------

  heartbeat(peer: Buffer, hb: { activity?: number; step?: number | { toNumber(): number } }): void {
    const member = this.memberOf(peer);
    if (!member) return;
    member.lastHeard = Date.now();
    member.activity = ACTIVITY_NAMES[hb.activity ?? 0] ?? 'unknown';
    if ((hb.activity ?? 0) !== 0) member.started = true;
    member.step = typeof hb.step === 'number' ? hb.step : (hb.step?.toNumber() ?? member.step);
  }

  /**
   * Every heartbeat interval: a heartbeat to every worker and node agent, and the stall inspector:
   * a late worker is named first, and declared lost (elastic) or fails the run only after the timeout.
   */
  inspect(now: number): void {
    if (!this.welcomed || this.ports.failed()) return;
    const { timeoutMs } = this.o;
    for (const x of [...this.byRank]) {
      this.send(x.peer, 'heartbeat', { rank: x.rank, unixMs: now });
      if (x.final !== undefined || this.regroup?.ready.has(x)) continue;
      const { silentMs, verdict } = lateness(x, now, this.o);
      this.metrics.setHeartbeatAge(x.rank, x.host, silentMs / 1000);
      if (verdict === 'gone') {
        const why = `no heartbeat for ${(silentMs / 1000).toFixed(1)} s (timeout ${timeoutMs / 1000} s; last activity: ${x.activity} at step ${x.step}): it hung, was stopped, or its network is down`;
        if (this.o.elastic) this.declareLost(x, why, 'timeout');
        else this.ports.fail(this.failedError(x, why));
      } else if (verdict === 'late' && !x.warned) {
        x.warned = true;
        this.metrics.countStallWarning(x.rank, x.host);
        this.ports.emit({ kind: 'stall', rank: x.rank, host: x.host, silentSec: silentMs / 1000, activity: x.activity, step: x.step, timeoutSec: timeoutMs / 1000 });
      } else if (verdict === 'on time') x.warned = false;
    }
    for (const node of this.nodes.values()) if (node.agent) this.send(node.agent, 'heartbeat', { rank: 0, unixMs: now });
  }

  /** A member's final report (`kind: 'done'`): acknowledged, so that the worker exits knowing it arrived. */
  finalReport(member: Member, detail: Record<string, unknown>): void {
    member.final = detail;
    this.send(member.peer, 'command', { kind: Kind.STOP, reason: 'done' });
    // A regroup started before this report (a member failed in the last collective) is moot:
    // training is over. Those that already asked to regroup are released; later askers too.
    const st = this.regroup;
    if (st) {
      clearTimeout(st.timer);
      this.regroup = undefined;
      for (const x of [...st.ready.keys()]) if (x.final === undefined) this.release(x, 'its last collective failed after others completed it');
    }
    this.checkRemoteFinished();
  }

  private checkRemoteFinished(): void {
    if (this.welcomed && this.byRank.every((x) => x.local || x.final !== undefined)) this.remoteFinished();
  }

  // ---- failures --------------------------------------------------------------------------------

  /** A local worker's process closed (its output not yet all in the log): the workers gauge (a lost one left it already). */
  localClosed(slot: number): void {
    if ([...this.members.values()].some((x) => x.local && x.slot === slot)) {
      this.metrics.setWorkers(this.members.size - ++this.localExits, this.welcomed ? this.worldSize : this.expectedWorld());
    }
  }

  /** A local worker exited and its output is in its log: lost (elastic), a failure, or a clean end. */
  async localExited(slot: number, x: WorkerExit): Promise<void> {
    const { code, signal } = x;
    // The final report travels over the control socket, the exit over a pipe: give the report a
    // moment to arrive before calling a clean exit a failure.
    const live = () => [...this.members.values()].find((m) => m.local && m.slot === slot);
    for (let i = 0; i < 40 && code === 0 && live()?.final === undefined; i++) await new Promise((r) => setTimeout(r, 50));
    const member = live() ?? this.lostMembers.find((m) => m.local && m.slot === slot);
    if (member?.lost !== undefined || member?.released !== undefined) return;
    if (this.o.elastic && this.welcomed && member && (code !== 0 || member.final === undefined)) {
      const how = signal ? `was killed by ${signal}` : `exited with code ${code}`;
      return this.declareLost(member, `${how}${member.error ? `: ${member.error}` : ''}`, signal ? 'signal' : 'exit');
    }
    if (code === 0 && member?.final !== undefined) return;
    const reason = x.spawnError ?? member?.error ?? (code === 0 ? 'it exited before sending its final report' : undefined);
    const { tail, logFile } = this.ports.logOf(slot);
    const err = new WorkerFailedError(slot, member?.host ?? this.o.localHost, code, signal, reason, tail, logFile);
    // Failures on other machines came first: their root cause is being chosen; this one follows from it.
    if (this.remoteGrace) this.pendingLocal ??= err;
    else this.ports.fail(err);
  }

  /** A worker's Error message (it exits next, or its join process reports its exit). */
  workerError(member: Member, message: string | undefined): void {
    if (member.error === undefined) member.error = message;
    if (this.o.elastic && this.welcomed) {
      // Its process exits next (a local child's exit, or its join process's report) and is
      // declared lost then; a remote one that says this much is lost already.
      if (!member.local) this.declareLost(member, `failed: ${message}`, 'exit');
      return;
    }
    if (!member.local) this.collectRemoteFailures();
  }

  /** The host of a node agent's peer, or undefined if `peer` is not one. */
  agentHost(peer: Buffer): string | undefined {
    return this.agents.get(peer.toString('hex'));
  }

  /** A join process reports that one of its workers exited (Error with a WorkerExit). */
  agentReport(host: string, x: AgentExitReport): void {
    this.remoteExits.push({ host, report: x });
    if (!(this.o.elastic && this.welcomed)) return this.collectRemoteFailures();
    const w = [...this.members.values()].find((m) => !m.local && m.host === host && m.localRank === x.localRank);
    const how = x.signal ? `was killed by ${x.signal}` : `exited with code ${x.exitCode}${x.reason ? `: ${x.reason}` : ''}`;
    if (w) this.declareLost(w, how, x.signal ? 'signal' : 'exit', x.logTail, `${x.logFile} on host ${host}`);
  }

  /** Waits 2 s for the other reports of a broken ring, then names the root cause. */
  private collectRemoteFailures(): void {
    if (this.remoteGrace) return;
    this.remoteGrace = setTimeout(() => {
      const remote = [...this.members.values()].filter((x) => !x.local);
      const cause = remoteRootCause(
        remote.map((x) => ({ host: x.host, localRank: x.localRank, rank: this.welcomed ? x.rank : undefined, error: x.error })),
        this.remoteExits,
      );
      const err = cause ?? this.pendingLocal;
      if (err) this.ports.fail(err);
    }, 2000);
  }

  private failedError(member: Member, reason: string, logTail?: string[], logFile?: string): WorkerFailedError {
    const log = member.local ? this.ports.logOf(member.slot) : undefined;
    return new WorkerFailedError(member.rank, member.host, null, null, reason, logTail ?? log?.tail ?? [], logFile ?? log?.logFile ?? `its log on host ${member.host}`);
  }

  /** Rank 0 gone after the last collective, before confirming summary.json and the final checkpoint. */
  private lastFilesMissing(member: Member, what: string, logTail?: string[], logFile?: string): WorkerFailedError {
    const why = `${what}, before confirming the run's last files (summary.json, the final checkpoint): check them; the checkpoints it had written are intact`;
    return this.failedError(member, why, logTail, logFile);
  }

  // ---- elastic regroups ------------------------------------------------------------------------
  // A lost member leaves the group at once; the survivors are told to roll back (ROLLBACK: the step
  // in flight is abandoned), each answers with a regroup report (how far it got, its new ring
  // endpoints), and when all have answered (or the deadline passed) the Welcome of the next
  // generation goes out, naming the root whose state everyone adopts. Joiners wait in
  // `pendingJoiners` for the next step boundary.

  /**
   * A survivor may wait a whole ring timeout for a neighbour that died during the new ring's setup
   * before it fails and reports: the regroup's deadline leaves it half a timeout more, or both
   * neighbours of the dead one would be declared lost at the same moment.
   */
  private get regroupDeadlineMs(): number {
    return this.o.timeoutMs * 1.5;
  }

  declareLost(member: Member, reason: string, how: LostHow, logTail?: string[], logFile?: string): void {
    if (member.lost !== undefined || member.released !== undefined || this.ports.failed()) return;
    member.lost = reason;
    this.members.delete(member.peer.toString('hex'));
    this.lostMembers.push(member);
    const inGroup = remove(this.byRank, member);
    const joining = remove(this.pendingJoiners, member);
    // A worker cut off but alive learns it is out (and exits) instead of waiting for a Welcome.
    this.send(member.peer, 'error', { code: Code.PEER_LOST, message: `this worker was declared lost: ${reason}`, rank: member.rank, host: member.host });
    if (member.local) this.ports.kill(member.slot);
    this.metrics.countWorkerLost(how);
    this.metrics.forgetWorker(member.rank);
    const log = member.local ? this.ports.logOf(member.slot) : undefined;
    this.ports.emit({ kind: 'lost', rank: member.rank, host: member.host, reason, logTail: logTail ?? log?.tail ?? [], logFile: logFile ?? log?.logFile ?? `its log on host ${member.host}`, remaining: this.byRank.length });
    if (!inGroup && joining) return;
    if (this.byRank.length === 0) return this.ports.fail(this.failedError(member, `${reason}; no workers are left`, logTail, logFile));
    // Once any member sent its final report, training is over: a worker finishes only after the
    // run's last collective, which every member (this one included) completed. Only this one's
    // final report is missing; there is nothing to roll back, and finished members cannot regroup.
    if (this.byRank.some((x) => x.final !== undefined)) {
      // Rank 0 writes the run's files after the last collective: they may be incomplete.
      if (member.rank === 0 && member.final === undefined) return this.ports.fail(this.lastFilesMissing(member, `${reason} after training completed`, logTail, logFile));
      return this.checkRemoteFinished();
    }
    this.startRegroup('rollback', `rank ${member.rank} on host ${member.host} was lost (${reason})`);
  }

  private refuseJoiners(why: string): void {
    for (const x of this.pendingJoiners.splice(0)) {
      this.members.delete(x.peer.toString('hex'));
      this.send(x.peer, 'error', { code: Code.REFUSED, message: why, rank: -1, host: x.host });
    }
  }

  private startRegroup(kind: 'rollback' | 'join', reason: string): void {
    if (this.ports.failed()) return;
    if (kind === 'join' && !this.regroup && this.byRank.some((x) => x.final !== undefined)) {
      return this.refuseJoiners('the run is finishing: its workers completed training; join the next run');
    }
    if (!this.regroup) {
      const timer = setTimeout(() => this.regroupTimedOut(), this.regroupDeadlineMs + (kind === 'join' ? this.o.timeoutMs : 0));
      timer.unref();
      this.regroup = { reasons: [], ready: new Map(), timer, rollback: false };
    }
    const st = this.regroup;
    st.reasons.push(reason);
    if (kind === 'rollback') st.rollback = true;
    for (const x of this.byRank) {
      if (!st.ready.has(x)) this.send(x.peer, 'command', { kind: kind === 'rollback' ? Kind.ROLLBACK : Kind.REGROUP, reason, generation: this.generation });
    }
    this.tryFinishRegroup();
  }

  private regroupTimedOut(): void {
    const st = this.regroup;
    if (!st) return;
    if (!st.rollback) {
      // Only joiners were waiting, and the group reached no step boundary in time (the run is in
      // its last evaluation, or finishing): they are turned away; nobody is lost.
      clearTimeout(st.timer);
      this.regroup = undefined;
      return this.refuseJoiners(`the run reached no step boundary within ${(this.regroupDeadlineMs + this.o.timeoutMs) / 1000} s (it may be finishing); try again`);
    }
    // Members that did not answer in time are lost too; the rest go on.
    for (const x of [...this.byRank]) if (!st.ready.has(x)) this.declareLost(x, `it did not answer the regroup within ${this.regroupDeadlineMs / 1000} s`, 'timeout');
    this.tryFinishRegroup();
  }

  /**
   * The run completed (a member sent its final report) but `member`'s copy of the last collective
   * failed, so it asks to regroup: nobody finished can answer, and there is nothing to redo. It
   * is stopped instead and leaves the group; the others' final reports stand. If it is rank 0,
   * which writes the run's last files after that collective, they are missing: the run fails.
   */
  private release(member: Member, why: string): void {
    if (member.released !== undefined || member.lost !== undefined) return;
    member.released = why;
    remove(this.byRank, member);
    this.send(member.peer, 'command', { kind: Kind.STOP, reason: `the run is complete: ${why}` });
    this.ports.emit({ kind: 'released', rank: member.rank, host: member.host, reason: why });
    if (member.rank === 0) return this.ports.fail(this.lastFilesMissing(member, why));
    this.checkRemoteFinished();
  }

  /** A member's regroup report (read by readRegroupReport): it left its group and is ready for the next. */
  regroupReport(member: Member, r: RegroupReport): void {
    if (r.generation !== this.generation || !this.byRank.includes(member)) return this.metrics.countMalformedMessages();
    const key = r.key;
    // With CURVE a member keeps the key it proved in its Hello: the others' rings admit the key
    // named here on their links to it.
    if (this.o.keys && key !== member.key) {
      process.stderr.write(`coordinator: ignored a regroup report of rank ${member.rank} on host ${member.host}: its ring key ${key.slice(0, 40) || '(none)'} is not the key it proved in its Hello (${member.key})\n`);
      return this.metrics.countMalformedMessages();
    }
    const why = r.reason;
    if (this.byRank.some((x) => x.final !== undefined)) return this.release(member, `its last collective failed after the others completed it (${why})`);
    // A worker whose ring failed (a neighbour died or went silent) regroups on its own, often
    // before this process has noticed anything: its report starts the regroup for everyone.
    if (!this.regroup) this.startRegroup('rollback', `rank ${member.rank} on host ${member.host} left the group: ${why}`);
    if (!this.regroup) return;
    member.endpoints = r.endpoints;
    member.key = key;
    member.lastHeard = Date.now();
    this.regroup.ready.set(member, r);
    this.tryFinishRegroup();
  }

  private tryFinishRegroup(): void {
    const st = this.regroup;
    if (!st || this.ports.failed() || this.byRank.length === 0 || !this.byRank.every((x) => st.ready.has(x))) return;
    clearTimeout(st.timer);
    this.regroup = undefined;
    const survivors = [...this.byRank].sort((a, b) => a.rank - b.rank);
    const joiners = this.pendingJoiners.splice(0).sort(byHostThenLocalRank);
    // The root is the survivor that got furthest: everyone adopts its state.
    const ahead = (a: RegroupReport, b: RegroupReport) => a.committed.epoch - b.committed.epoch || a.committed.done - b.committed.done || a.committed.step - b.committed.step;
    let root = survivors[0];
    for (const x of survivors) if (ahead(st.ready.get(x)!, st.ready.get(root)!) > 0) root = x;
    this.byRank.length = 0;
    this.byRank.push(...survivors, ...joiners);
    this.byRank.forEach((x, r) => {
      x.rank = r;
      x.lastHeard = Date.now();
      x.warned = false;
    });
    this.generation++;
    // Series are labelled by rank: ranks the smaller group no longer has are dropped.
    for (let r = this.byRank.length; r < this.worldSize; r++) this.metrics.forgetWorker(r);
    this.worldSize = this.byRank.length;
    const stop = this.worldSize < this.o.minWorkers;
    const regroup = { root: root.rank, stop, reason: st.reasons.join('; ') };
    this.welcomeRegrouped(joiners, regroup);
    this.tellAgents();
    this.metrics.setWorkers(this.worldSize, this.worldSize);
    this.metrics.countRegroup();
    this.ports.emit({ kind: 'regrouped', generation: this.generation, worldSize: this.worldSize, root: regroup.root, reason: regroup.reason, stop, hosts: this.groupHosts() });
  }

  /** The Welcome of a new generation: survivors get the regroup, joiners the run's config too. */
  private welcomeRegrouped(joiners: Member[], regroup: { root: number; stop: boolean; reason: string }): void {
    const { worldSize, generation } = this;
    const { heartbeatMs, timeoutMs } = this.o;
    const peers = this.peers();
    for (const x of this.byRank) {
      const config = joiners.includes(x) ? this.runConfig : { elastic: true };
      this.send(x.peer, 'welcome', { rank: x.rank, worldSize, generation, peers, heartbeatMs, timeoutMs, regroup, ...config });
    }
  }

  // ---- the end ---------------------------------------------------------------------------------

  /** Ranks of the group that sent no final report yet. */
  withoutFinal(): Member[] {
    return this.byRank.filter((x) => x.final === undefined);
  }

  /**
   * The run ends with an error: every machine's join process stops its workers and exits non-zero
   * with this message.
   */
  shutDownAgents(message: string): void {
    for (const node of this.nodes.values()) {
      if (node.agent) this.send(node.agent, 'error', { code: Code.SHUTDOWN, message, rank: -1, host: this.o.localHost });
    }
  }

  /**
   * Workers waiting for admission into an elastic run, and machines none of whose workers got in,
   * hear why the run ends without them (their join exits non-zero saying so), before the socket closes.
   */
  async tellNotAdmitted(why: string): Promise<void> {
    const host = this.o.localHost;
    const waiting = this.pendingJoiners.splice(0).map((x) => this.ports.send(x.peer, 'error', { code: Code.SHUTDOWN, message: `${why}: local rank ${x.localRank} of host ${x.host}`, rank: -1, host }));
    const outside = [...this.nodes.values()].filter((node) => node.agent && !this.byRank.some((x) => x.host === node.host));
    const agents = outside.map((node) => this.ports.send(node.agent!, 'error', { code: Code.SHUTDOWN, message: `${why}: host ${node.host}`, rank: -1, host }));
    await Promise.all([...waiting, ...agents].map((p) => p.catch(() => undefined)));
  }

  /** Stops the timers (the run ended). */
  stop(): void {
    clearTimeout(this.remoteGrace);
    if (this.regroup) clearTimeout(this.regroup.timer);
  }

  /** Why the rendezvous timed out: who is missing, on which machine, where their logs are. */
  joinTimeoutMessage(where: { endpoint: string; port: number; authRefused: number; address: string }): string {
    const { localWorkers: n, nodesExpected } = this.o;
    const logsOf = (ranks: number[]) => ranks.map((r) => this.ports.logOf(r).logFile).join(', ');
    let first = `only ${this.members.size} of ${this.expectedWorld()}${this.nodes.size < nodesExpected - 1 ? '+' : ''} workers joined the coordinator at ${where.endpoint} within ${this.o.joinTimeoutMs} ms` +
      (this.multi ? ` (${nodesExpected} machines expected)` : '');
    if (where.authRefused > 0) {
      first += `; ${where.authRefused} connection${where.authRefused === 1 ? ' was' : 's were'} refused at the CURVE handshake (a key not in ${this.o.keys?.dir ?? 'the'}/allowed_keys, or a wrong coordinator key: see the log lines above)`;
    }
    const missingLocal = Array.from({ length: n }, (_, r) => r).filter((r) => ![...this.members.values()].some((x) => x.local && x.rank === r));
    if (!this.multi) return `${first}; missing ranks ${missingLocal.join(', ')} (their logs: ${logsOf(missingLocal)})`;
    const lines = [first];
    lines.push(`  this machine (host ${this.o.localHost}): ${n - missingLocal.length} of ${n} workers` + (missingLocal.length ? `; missing ranks ${missingLocal.join(', ')} (logs: ${logsOf(missingLocal)})` : ''));
    for (const node of this.nodes.values()) {
      const have = [...this.members.values()].filter((x) => !x.local && x.host === node.host).map((x) => x.localRank);
      const missing = Array.from({ length: node.expected }, (_, i) => i).filter((i) => !have.includes(i));
      lines.push(`  host ${node.host}: ${have.length} of ${node.expected} workers${missing.length ? `; missing local ranks ${missing.join(', ')} (see the output of pnpm cli join on ${node.host})` : ''}`);
    }
    const absent = nodesExpected - 1 - this.nodes.size;
    if (absent > 0) {
      lines.push(
        `  ${absent} machine${absent === 1 ? ' has' : 's have'} not connected: run \`pnpm cli join ${where.address}:${where.port} --workers N\` there, ` +
          `and check that TCP port ${where.port} of ${where.address} is reachable from it`,
      );
    }
    return lines.join('\n');
  }
}

function byHostThenLocalRank(a: Member, b: Member): number {
  return a.host < b.host ? -1 : a.host > b.host ? 1 : a.localRank - b.localRank;
}

/** Removes `x` from `xs`; whether it was there. */
function remove<T>(xs: T[], x: T): boolean {
  const i = xs.indexOf(x);
  if (i >= 0) xs.splice(i, 1);
  return i >= 0;
}
