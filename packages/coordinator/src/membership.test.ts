// The membership state machine driven by messages alone: no sockets, no processes. What it sends,
// emits, kills and fails with is recorded by fake ports; the end-to-end runs (coordinator.test.ts,
// the cli's launch, faults and multi-machine tests) check the same rules over real sockets.
import { dtrain, type RegroupReport } from '@dtrain/transport';
import { afterEach, describe, expect, it, vi } from 'vitest';
import type { RunEvent } from './events.js';
import { Membership, NODE_AGENT_RANK, type MembershipOptions, type MembershipPorts } from './membership.js';
import { TrainingMetrics } from './metrics.js';
import { remoteRootCause } from './remote-failures.js';
import { lateness } from './stall.js';

const Kind = dtrain.Command.Kind;
const Code = dtrain.Error.Code;

interface Sent {
  to: string;
  kind: string;
  body: Record<string, unknown>;
}

function harness(opts: Partial<MembershipOptions> = {}) {
  const sent: Sent[] = [];
  const events: RunEvent[] = [];
  const killed: number[] = [];
  let failure: Error | undefined;
  const ports: MembershipPorts = {
    send: async (peer, kind, body) => void sent.push({ to: peer.toString(), kind, body: body as Record<string, unknown> }),
    logOf: (slot) => ({ tail: [`last line of ${slot}`], logFile: `logs/rank-${slot}.log` }),
    kill: (slot) => void killed.push(slot),
    emit: (e) => void events.push(e),
    fail: (e) => void (failure ??= e),
    failed: () => failure !== undefined,
  };
  const options: MembershipOptions = { localWorkers: 2, nodesExpected: 1, localHost: 'here', elastic: false, minWorkers: 1, heartbeatMs: 100, timeoutMs: 1000, joinTimeoutMs: 2000, ...opts };
  const metrics = new TrainingMetrics({ defaultMetrics: false });
  const m = new Membership(options, ports, metrics);
  const to = (name: string, kind?: string) => sent.filter((x) => x.to === name && (kind === undefined || x.kind === kind));
  return { m, sent, events, killed, to, failure: () => failure, metrics };
}

const peer = (name: string) => Buffer.from(name);
/** A worker's Hello: requestedRank is its RANK (this machine) or -1 (another machine's worker). */
const hello = (host: string, requestedRank: number, localRank = Math.max(requestedRank, 0), localWorldSize?: number) => ({ host, requestedRank, localRank, localWorldSize, dataEndpoints: [`tcp://${host}:${5000 + localRank}`] });
const regroupReport = (generation: number, epoch: number, step: number, name: string): RegroupReport => ({ kind: 'regroup', generation, committed: { epoch, done: step * 8, step }, endpoints: [`tcp://new-${name}:1`], key: '', reason: 'rollback' });
const joinedYet = (m: Membership) => Promise.race([m.joined.then(() => true), new Promise((r) => setTimeout(() => r(false), 10))]);

/** Welcomes `n` local workers named w0..w{n-1}; returns the harness. */
async function welcomed(n: number, opts: Partial<MembershipOptions> = {}, config: unknown = { lr: 0.01 }) {
  const h = harness({ localWorkers: n, ...opts });
  for (let r = n - 1; r >= 0; r--) h.m.hello(peer(`w${r}`), hello('here', r), undefined);
  await h.m.joined;
  await h.m.welcome(config);
  return h;
}

afterEach(() => vi.useRealTimers());

describe('rendezvous', () => {
  it('the group forms when every local worker said Hello; the Welcome numbers ranks and names every peer', async () => {
    const h = harness();
    h.m.hello(peer('w1'), hello('here', 1), undefined);
    expect(await joinedYet(h.m)).toBe(false);
    h.m.hello(peer('w0'), hello('here', 0), undefined);
    expect(await joinedYet(h.m)).toBe(true);
    await h.m.welcome({ lr: 0.01 });
    const w = h.to('w1', 'welcome')[0].body;
    expect(w).toMatchObject({ rank: 1, worldSize: 2, generation: 1, heartbeatMs: 100, timeoutMs: 1000, configJson: '{"lr":0.01}', offeredFiles: [], elastic: false });
    expect(w.peers).toEqual([
      { rank: 0, host: 'here', dataEndpoints: ['tcp://here:5000'], curvePublicKey: '' },
      { rank: 1, host: 'here', dataEndpoints: ['tcp://here:5001'], curvePublicKey: '' },
    ]);
    expect(h.events.map((e) => e.kind)).toEqual(['joined', 'joined', 'welcomed']);
  });

  it('refuses, in one line each: a RANK out of range, a rank taken, a host that is no name, another machine in a one-machine run, a Hello after the start', async () => {
    const h = harness();
    h.m.hello(peer('x1'), hello('here', 2), undefined);
    h.m.hello(peer('w0'), hello('here', 0), undefined);
    h.m.hello(peer('x2'), hello('here', 0), undefined);
    h.m.hello(peer('x3'), hello('bad host', 1), undefined);
    h.m.hello(peer('x4'), hello('other', -1), undefined);
    const refusal = (name: string) => {
      const e = h.to(name, 'error')[0]?.body;
      expect(e?.code).toBe(Code.REFUSED);
      return e?.message as string;
    };
    expect(refusal('x1')).toBe('RANK 2 is not in 0..1');
    expect(refusal('x2')).toBe('rank 0 already joined from host here');
    expect(refusal('x3')).toMatch(/^a Hello's host must be a host name: .*got "bad host"/);
    expect(refusal('x4')).toMatch(/^this coordinator runs on one machine \(2 workers\); start it with --nodes M/);
    h.m.hello(peer('w1'), hello('here', 1), undefined);
    await h.m.welcome({});
    h.m.hello(peer('x5'), hello('here', 1), undefined);
    expect(refusal('x5')).toBe('the run already started with 2 workers (start it with --elastic to admit workers while it runs)');
    expect(h.m.members.size).toBe(2);
  });

  it('several machines: each join process registers its workers; ranks follow this machine, then hosts by name and local rank; each agent hears its ranks', async () => {
    const h = harness({ localWorkers: 1, nodesExpected: 3 });
    h.m.hello(peer('agent-b'), { ...hello('hostb', NODE_AGENT_RANK, 0, 2), dataEndpoints: [] }, undefined);
    h.m.hello(peer('agent-a'), { ...hello('hosta', NODE_AGENT_RANK, 0, 1), dataEndpoints: [] }, undefined);
    expect(h.to('agent-b', 'command')[0].body).toMatchObject({ kind: Kind.START, elastic: false });
    h.m.hello(peer('b1'), hello('hostb', -1, 1), undefined);
    h.m.hello(peer('b0'), hello('hostb', -1, 0), undefined);
    h.m.hello(peer('a0'), hello('hosta', -1, 0), undefined);
    expect(await joinedYet(h.m)).toBe(false);
    h.m.hello(peer('extra'), hello('hostc', NODE_AGENT_RANK, 0, 1), undefined);
    expect(h.to('extra', 'error')[0].body.message).toMatch(/expects 3 machines and all have joined .* host hostc is one too many/);
    h.m.hello(peer('w0'), hello('here', 0), undefined);
    expect(await joinedYet(h.m)).toBe(true);
    await h.m.welcome({});
    expect(['w0', 'a0', 'b0', 'b1'].map((x) => h.to(x, 'welcome')[0].body.rank)).toEqual([0, 1, 2, 3]);
    expect(h.to('agent-a', 'rankAssignment')[0].body).toEqual({ generation: 1, worldSize: 4, ranks: [1] });
    expect(h.to('agent-b', 'rankAssignment')[0].body).toEqual({ generation: 1, worldSize: 4, ranks: [2, 3] });
    expect(h.m.groupHosts()).toEqual([{ host: 'here', ranks: [0] }, { host: 'hosta', ranks: [1] }, { host: 'hostb', ranks: [2, 3] }]);
  });

  it('the join timeout names the missing ranks and their logs', () => {
    const h = harness({ localWorkers: 3 });
    h.m.hello(peer('w1'), hello('here', 1), undefined);
    expect(h.m.joinTimeoutMessage({ endpoint: 'tcp://127.0.0.1:9', port: 9, authRefused: 0, address: '127.0.0.1' })).toBe(
      'only 1 of 3 workers joined the coordinator at tcp://127.0.0.1:9 within 2000 ms; missing ranks 0, 2 (their logs: logs/rank-0.log, logs/rank-2.log)',
    );
  });
});

describe('failures without --elastic', () => {
  it('a silent worker is named late first, and fails the run after the timeout', async () => {
    const h = await welcomed(2);
    const [w0] = h.m.byRank;
    w0.started = true;
    const now = Date.now();
    w0.lastHeard = now - 400; // warnAfter = max(5 x 100, 2 x 0, 1000 / 4) = 500 ms
    h.m.inspect(now);
    w0.lastHeard = now - 600;
    h.m.inspect(now);
    h.m.inspect(now); // named once
    expect(h.events.filter((e) => e.kind === 'stall')).toEqual([{ kind: 'stall', rank: 0, host: 'here', silentSec: 0.6, activity: 'idle', step: 0, timeoutSec: 1 }]);
    expect(h.failure()).toBeUndefined();
    w0.lastHeard = now - 1100;
    h.m.inspect(now);
    expect(h.failure()?.message).toMatch(/^rank 0 on host here failed: no heartbeat for 1\.1 s \(timeout 1 s; last activity: idle at step 0\).*logs\/rank-0\.log/s);
    expect(h.to('w1', 'heartbeat').length).toBe(4);
  });

  it('a local worker that exits 0 without a final report fails the run (after the report had 2 s to arrive)', async () => {
    vi.useFakeTimers();
    const h = await welcomed(2);
    const exited = h.m.localExited(1, { code: 0, signal: null });
    await vi.advanceTimersByTimeAsync(2000);
    await exited;
    expect(h.failure()?.message).toMatch(/^rank 1 on host here exited with code 0: it exited before sending its final report\. Last lines of its log \(logs\/rank-1\.log\)/);
  });

  it('a clean exit after the final report is no failure; the report is acknowledged', async () => {
    const h = await welcomed(2);
    h.m.finalReport(h.m.byRank[1], { kind: 'done', stateSha256: 'ab' });
    await h.m.localExited(1, { code: 0, signal: null });
    expect(h.failure()).toBeUndefined();
    expect(h.to('w1', 'command')[0].body).toEqual({ kind: Kind.STOP, reason: 'done' });
    expect(h.m.withoutFinal().map((x) => x.rank)).toEqual([0]);
  });
});

describe('elastic', () => {
  it('a lost rank: the others roll back, and the survivor that got furthest is the root of generation 2', async () => {
    const h = await welcomed(3, { elastic: true, minWorkers: 2 });
    const [w0, w1, w2] = h.m.byRank;
    h.m.declareLost(w1, 'was killed by SIGKILL', 'signal');
    expect(h.to('w1', 'error')[0].body).toMatchObject({ code: Code.PEER_LOST, message: 'this worker was declared lost: was killed by SIGKILL' });
    expect(h.killed).toEqual([1]);
    for (const x of ['w0', 'w2']) expect(h.to(x, 'command')[0].body).toEqual({ kind: Kind.ROLLBACK, reason: 'rank 1 on host here was lost (was killed by SIGKILL)', generation: 1 });
    h.m.regroupReport(w0, regroupReport(1, 2, 30, 'w0'));
    expect(h.to('w0', 'welcome').length).toBe(1); // not yet: w2 has not answered
    h.m.regroupReport(w2, regroupReport(1, 2, 31, 'w2'));
    const welcome = h.to('w2', 'welcome')[1].body;
    expect(welcome).toMatchObject({ rank: 1, worldSize: 2, generation: 2 });
    expect(welcome.regroup).toEqual({ root: 1, stop: false, reason: 'rank 1 on host here was lost (was killed by SIGKILL)' });
    expect(welcome.configJson).toBeUndefined(); // a survivor has the run's config
    expect(welcome.peers).toEqual([
      { rank: 0, host: 'here', dataEndpoints: ['tcp://new-w0:1'], curvePublicKey: '' },
      { rank: 1, host: 'here', dataEndpoints: ['tcp://new-w2:1'], curvePublicKey: '' },
    ]);
    expect(h.events.at(-1)).toMatchObject({ kind: 'regrouped', generation: 2, worldSize: 2, root: 1, stop: false });
    expect(h.m.lostMembers.map((x) => x.lost)).toEqual(['was killed by SIGKILL']);
    expect(h.failure()).toBeUndefined();
  });

  it('a survivor that does not answer the regroup within 1.5 timeouts is lost too; fewer than --min-workers left: the group is told to stop', async () => {
    vi.useFakeTimers();
    const h = await welcomed(3, { elastic: true, minWorkers: 2 });
    const [w0, w1] = h.m.byRank;
    h.m.declareLost(w1, 'exited with code 1', 'exit');
    h.m.regroupReport(w0, regroupReport(1, 1, 5, 'w0'));
    await vi.advanceTimersByTimeAsync(1499);
    expect(h.m.lostMembers.length).toBe(1);
    await vi.advanceTimersByTimeAsync(1);
    expect(h.m.lostMembers.map((x) => x.lost)).toEqual(['exited with code 1', 'it did not answer the regroup within 1.5 s']);
    expect(h.to('w0', 'welcome')[1].body.regroup).toMatchObject({ root: 0, stop: true });
  });

  it("after a regroup renumbered the ranks, a survivor's exit still counts down the connected workers", async () => {
    const h = await welcomed(3, { elastic: true });
    const [w0, w1, w2] = h.m.byRank;
    h.m.declareLost(w1, 'was killed by SIGKILL', 'signal');
    h.m.regroupReport(w0, regroupReport(1, 1, 3, 'w0'));
    h.m.regroupReport(w2, regroupReport(1, 1, 3, 'w2'));
    expect(w2.rank).toBe(1); // slot 2 is rank 1 of generation 2
    const connected = async () => Number(/^dtrain_workers_connected (\S+)$/m.exec(await h.metrics.registry.metrics())?.[1]);
    expect(await connected()).toBe(2);
    h.m.localClosed(2);
    expect(await connected()).toBe(1);
  });

  it('rank 0 lost after another rank sent its final report: the run fails, its last files may be missing', async () => {
    const h = await welcomed(2, { elastic: true });
    h.m.finalReport(h.m.byRank[1], { kind: 'done' });
    h.m.declareLost(h.m.byRank[0], 'was killed by SIGKILL', 'signal');
    expect(h.failure()?.message).toMatch(/^rank 0 on host here failed: was killed by SIGKILL after training completed, before confirming the run's last files \(summary\.json, the final checkpoint\)/);
  });

  it("a joiner waits for the group's step boundary, then gets its rank and the run's config", async () => {
    const h = await welcomed(2, { elastic: true }, { lr: 0.01 });
    h.m.hello(peer('agent-c'), { ...hello('hostc', NODE_AGENT_RANK, 0, 1), dataEndpoints: [] }, undefined);
    expect(h.to('agent-c', 'command')[0].body).toMatchObject({ kind: Kind.START, elastic: true });
    h.m.hello(peer('c0'), hello('hostc', -1, 0), undefined);
    expect(h.to('w0', 'command')[0].body).toEqual({ kind: Kind.REGROUP, reason: 'host hostc joins with local rank 0', generation: 1 });
    const [w0, w1] = h.m.byRank;
    h.m.regroupReport(w0, regroupReport(1, 1, 7, 'w0'));
    h.m.regroupReport(w1, regroupReport(1, 1, 7, 'w1'));
    const joiner = h.to('c0', 'welcome')[0].body;
    expect(joiner).toMatchObject({ rank: 2, worldSize: 3, generation: 2 });
    const regroup = { root: 0, stop: false, reason: 'host hostc joins with local rank 0' };
    expect(joiner).toMatchObject({ configJson: '{"lr":0.01}', elastic: true, regroup });
    expect(h.to('w1', 'welcome')[1].body).toMatchObject({ elastic: true, regroup });
    expect(h.to('w1', 'welcome')[1].body.configJson).toBeUndefined();
    expect(h.to('agent-c', 'rankAssignment').at(-1)?.body).toEqual({ generation: 2, worldSize: 3, ranks: [2] });
  });
});

describe('the stall rule', () => {
  const t = { heartbeatMs: 1000, timeoutMs: 60_000, joinTimeoutMs: 120_000 };
  it('late past max(5 heartbeats, 2 steps, a quarter of the timeout); gone past the timeout; a worker still starting is held to the join timeout', () => {
    const at = (silentMs: number, stepMs = 0, started = true) => lateness({ lastHeard: 0, stepMs, started }, silentMs, t).verdict;
    expect(at(15_000)).toBe('on time');
    expect(at(15_001)).toBe('late');
    expect(at(15_001, 8000)).toBe('on time'); // two 8 s steps
    expect(at(60_001)).toBe('gone');
    expect(at(100_000, 0, false)).toBe('starting');
    expect(at(120_001, 0, false)).toBe('gone');
  });
});

describe('the root cause of failures on other machines', () => {
  it('a rank that could not reach its neighbour comes before ranks that only waited; an exit report alone names the local rank', () => {
    const exits = [{ host: 'b', report: { localRank: 0, exitCode: 1, signal: null, logTail: ['x'], logFile: 'local-0.log' } }];
    const cause = remoteRootCause(
      [
        { host: 'a', localRank: 0, rank: 1, error: 'timed out waiting for rank 0' },
        { host: 'b', localRank: 0, rank: 2, error: 'could not reach rank 3 on host c at tcp://c:1' },
      ],
      exits,
    );
    expect(cause?.message).toMatch(/^rank 2 on host b exited with code 1: could not reach rank 3 on host c at tcp:\/\/c:1\. Last lines of its log \(local-0\.log on host b\)/);
    expect(remoteRootCause([{ host: 'b', localRank: 0 }], exits)?.message).toMatch(/^local rank 0 on host b exited with code 1\./);
    expect(remoteRootCause([{ host: 'b', localRank: 0 }], [])).toBeUndefined();
  });
});
