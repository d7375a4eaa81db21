// More machines, on one machine: three "hosts" made as Linux network namespaces joined by veth
// links to a bridge (in a fourth namespace), addresses 10.213.7.1-3/24 that exist only inside
// them, a distinct host name per namespace (so workers use TCP between hosts). The coordinator and
// its worker run in host a (`pnpm cli launch --nodes 3 --listen 10.213.7.1:PORT`), `pnpm cli join`
// in b and c. Nothing here touches an address outside the namespaces or 127.0.0.0/8; every
// namespace and process is removed afterwards, also on failure. Where namespaces cannot be made
// (not root, no iproute2, no CAP_NET_ADMIN), the same scenario runs on 127.0.0.2-4 and the test
// says so; the cases that need a network of their own are then reported as skipped.
// Also across these hosts: --resume of a 3-machine run on 2 machines, a machine joining an
// --elastic run in progress, and a machine whose link goes down (namespaces only; the measured
// detection time is printed as a `fault:` line, like faults.test.ts).
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it, type TestContext } from 'vitest';
import { addAllowedKey, initKeyDir } from '@dtrain/transport';
import { HOSTS, ip, makeNet, type Host, type Net } from './testing/netns.js';
import { runCli, testTimeoutFor, type Line, type ProcessRun } from './testing/processes.js';

const tmp = () => fs.mkdtempSync(path.join(os.tmpdir(), 'dtrain-mm-'));
const prefix = `dtmm${process.pid}`;

type CliRun = ProcessRun;

/**
 * Runs the CLI on a host (under `ip netns exec` with namespaces), in a process group of its own
 * that is killed with its workers when the test ends (testing/processes.ts); workers left behind
 * when it ends are reported (`leftBehind`) and killed then. `onLine` sees each line as it comes.
 */
function cliOn(ctx: TestContext, h: Host, args: string[], onLine?: (l: Line) => void): Promise<CliRun> {
  return runCli(ctx, args, { prefix: net.exec[h], env: { DTRAIN_HOST: `host-${h}` }, onLine });
}

let net: Net;
beforeAll(() => {
  net = makeNet(prefix, '10.213.7');
  if (net.kind === 'loopback') {
    console.warn(`multi-machine test: NO NETWORK NAMESPACES (${net.why}); running the same scenario on loopback addresses 127.0.0.2-4 instead`);
  }
});
afterAll(() => {
  net?.remove();
});

/** Skips (reported as skipped, not passed) a case that needs a network of its own. */
const needsNamespaces = (ctx: TestContext) => ctx.skip(net.kind !== 'netns', `needs network namespaces (${net.why})`);

// Ports inside the namespaces (or on 127.0.0.x): fixed, so --ring-port-base is exercised too.
const PORT = 29_500 + (process.pid % 200);
const RING = 30_000 + (process.pid % 200) * 4;

/** A key directory per host (`pnpm cli keys init`), each allow-listing all three (`keys add-peer`). */
function clusterKeys(): Record<Host, string> {
  const root = tmp();
  const dirs = Object.fromEntries(HOSTS.map((h) => [h, path.join(root, h)])) as Record<Host, string>;
  const pubs = HOSTS.map((h) => `${initKeyDir({ dir: dirs[h], name: `host-${h}` }).publicKey} host-${h}`);
  for (const h of HOSTS) for (const p of pubs) addAllowedKey(p, { dir: dirs[h] });
  return dirs;
}

describe('three machines: launch --nodes 3 in one, join in the others', () => {
  it('a short run with CURVE keys completes, ranks grouped by host, TCP between hosts, identical replicas', async (ctx) => {
    const out = path.join(tmp(), 'run');
    const logs = tmp();
    const keys = clusterKeys();
    const coordinator = cliOn(ctx, 'a', [
      'launch', '--workers', '1', '--nodes', '3', '--listen', `${net.addr.a}:${PORT}`, '--ring-port-base', String(RING), '--keys', keys.a,
      '--synthetic-test-data', '48:32:12', '--batch-size', '8', '--epochs', '1', '--seed', '5', '--metrics-port', '0',
      '--out', out, '--join-timeout-s', '90', '--timeout-s', '60',
    ]);
    // Host c finds its address itself (the local address that routes to the coordinator), where it can.
    const advertise = (h: Host) => (net.kind === 'netns' && h === 'c' ? [] : ['--advertise', net.addr[h]]);
    const joins = (['b', 'c'] as const).map((h) =>
      cliOn(ctx, h, ['join', `${net.addr.a}:${PORT}`, '--workers', '1', '--host', `host-${h}`, ...advertise(h), '--ring-port-base', String(RING), '--keys', keys[h], '--coordinator-key', 'host-a', '--log-dir', path.join(logs, h), '--join-timeout-s', '90', '--timeout-s', '60']),
    );
    const [c, b, cc] = await Promise.all([coordinator, ...joins]);
    expect(c.out).toMatch(/all 3 workers joined \(host-a: rank 0, host-b: rank 1, host-c: rank 2\)/);
    expect(c.out).toMatch(/^security: CURVE on the control socket and the rings .*3 allowed client keys/m);
    expect(b.out).toMatch(/^security: CURVE on the links to /m);
    expect(c.code, c.out).toBe(0);
    expect(b.code, b.out).toBe(0);
    expect(cc.code, cc.out).toBe(0);
    expect(c.out).toMatch(/done: 1 epochs, 2 steps, test accuracy .* on 32 images/);
    expect(c.out).toMatch(/replicas identical: state sha256 [0-9a-f]{16} on all 3 workers on 3 machines/);
    expect(b.out).toMatch(/local worker 0: rank 1 of 3/);
    expect(b.out).toMatch(/done: ranks 1 of 3 on host host-b completed/);
    expect(cc.out).toMatch(/done: ranks 2 of 3 on host host-c completed/);
    // Each joined worker bound its ring socket on its own host's address and the fixed port, and
    // all three final states (each rank's own log) are the same.
    const hashes: string[] = [];
    for (const [h, rank] of [['b', 1], ['c', 2]] as const) {
      const log = fs.readFileSync(path.join(logs, h, 'local-0.log'), 'utf8');
      expect(log).toContain(`ring socket bound on ${net.addr[h]}:${RING} (CURVE), advertised as tcp://${net.addr[h]}:${RING} `);
      expect(log).toMatch(/ring of 3 connected \(protocol \d+, run [0-9a-f]+, CURVE, key /);
      hashes.push(new RegExp(`^\\[rank ${rank}\\] rank ${rank} on host host-${h}: done, state sha256 ([0-9a-f]{64})$`, 'm').exec(log)![1]);
    }
    const log0 = fs.readFileSync(path.join(out, 'logs', 'rank-0.log'), 'utf8');
    expect(log0).toContain(`ring socket bound on ${net.addr.a}:${RING} (CURVE), advertised as tcp://${net.addr.a}:${RING} `);
    hashes.push(/rank 0 on host host-a: done, state sha256 ([0-9a-f]{64})$/m.exec(log0)![1]);
    expect(new Set(hashes).size).toBe(1);
  }, testTimeoutFor(1));

  it('a machine that never joins: the join timeout names it and what did join; every process ends', async (ctx) => {
    const out = path.join(tmp(), 'run');
    const coordinator = cliOn(ctx, 'a', [
      'launch', '--workers', '1', '--nodes', '3', '--listen', `${net.addr.a}:${PORT + 1}`,
      '--synthetic-test-data', '48:32:12', '--batch-size', '8', '--epochs', '1', '--metrics-port', '0', '--out', out, '--join-timeout-s', '15', '--insecure',
    ]);
    const joined = cliOn(ctx, 'b', ['join', `${net.addr.a}:${PORT + 1}`, '--workers', '2', '--host', 'host-b', '--log-dir', path.join(tmp(), 'b'), '--join-timeout-s', '60', '--insecure']);
    const [c, b] = await Promise.all([coordinator, joined]);
    expect(c.code).toBe(2);
    expect(c.out).toMatch(/only 3 of 3\+ workers joined the coordinator at tcp:\/\/[\d.]+:\d+ within 15000 ms \(3 machines expected\)/);
    expect(c.out).toMatch(/this machine \(host host-a\): 1 of 1 workers/);
    expect(c.out).toMatch(/host host-b: 2 of 2 workers/);
    expect(c.out).toMatch(/1 machine has not connected: run `pnpm cli join [\d.]+:\d+ --workers N` there/);
    // The join process hears the end from the coordinator and exits non-zero, naming it.
    expect(b.code).not.toBe(0);
    expect(b.out).toMatch(/the coordinator at [\d.]+:\d+ ended the run: only 3 of 3\+ workers joined/);
  }, testTimeoutFor(1));
  // The connectivity preflight (a ring port the others cannot reach, named with both hosts and the
  // port) is tested across the nodes of a real Slurm cluster: slurm-cluster.test.ts.
});

// Across the namespace hosts: --resume with fewer machines, a machine joining an --elastic run in
// progress, and a machine whose link goes down (its switch port: the others see silence, no reset).
describe('three machines: resume, elastic join, link down', () => {
  const SYN = ['--synthetic-test-data', '96:48:12', '--batch-size', '8', '--seed', '5', '--metrics-port', '0'];
  const FAST = ['--timeout-s', '10', '--heartbeat-ms', '250'];
  const stateLine = (stdout: string) => /replicas identical: state sha256 ([0-9a-f]{16}) on all (\d+) workers(?: on (\d+) machines)?/.exec(stdout);
  const at = (r: CliRun, re: RegExp) => r.lines.find((l) => re.test(l.text));
  const joinOn = (ctx: TestContext, h: Host, port: number, ring: number, logs: string, extra: string[] = [], onLine?: (l: Line) => void) =>
    cliOn(ctx, h, ['join', `${net.addr.a}:${port}`, '--workers', '1', '--host', `host-${h}`, '--advertise', net.addr[h], '--ring-port-base', String(ring), '--log-dir', path.join(logs, h), '--join-timeout-s', '90', '--insecure', ...extra], onLine);

  it('--resume of a 3-machine run as a 2-machine run completes epoch 2 with identical replicas', async (ctx) => {
    const out = path.join(tmp(), 'run');
    const logs = tmp();
    const port = PORT + 3;
    const ring = RING + 200;
    const common = ['--listen', `${net.addr.a}:${port}`, '--ring-port-base', String(ring), '--join-timeout-s', '90', '--timeout-s', '60', '--insecure'];
    const first = await Promise.all([
      cliOn(ctx, 'a', ['launch', '--workers', '1', '--nodes', '3', ...common, ...SYN, '--epochs', '1', '--out', out]),
      joinOn(ctx, 'b', port, ring, logs, ['--timeout-s', '60']),
      joinOn(ctx, 'c', port, ring, logs, ['--timeout-s', '60']),
    ]);
    expect(first[0].code, first[0].out).toBe(0);
    expect(first[1].code, first[1].out).toBe(0);
    expect(first[2].code, first[2].out).toBe(0);
    expect(stateLine(first[0].out)?.slice(2)).toEqual(['3', '3']);
    expect(fs.existsSync(path.join(out, 'checkpoint-e0001.ckpt'))).toBe(true);
    // The run folder is on host a: the resumed run's coordinator is there again, with one machine less.
    const logs2 = tmp();
    const [c, b] = await Promise.all([
      cliOn(ctx, 'a', ['launch', '--workers', '1', '--nodes', '2', ...common, ...SYN, '--epochs', '2', '--resume', out]),
      joinOn(ctx, 'b', port, ring, logs2, ['--timeout-s', '60']),
    ]);
    expect(c.code, c.out).toBe(0);
    expect(b.code, b.out).toBe(0);
    expect(c.out).toMatch(/resuming \S+ from checkpoint-e0001\.ckpt \(epoch 1, written by 3 workers\)/);
    expect(c.out).toMatch(/all 2 workers joined \(host-a: rank 0, host-b: rank 1\)/);
    expect(c.out).not.toMatch(/^epoch 1\/2 /m);
    expect(c.out).toMatch(/^epoch 2\/2 .*world 2/m);
    expect(stateLine(c.out)?.slice(2)).toEqual(['2', '2']);
    expect(b.out).toMatch(/done: ranks 1 of 2 on host host-b completed/);
    expect(fs.existsSync(path.join(out, 'checkpoint-e0002.ckpt'))).toBe(true);
    console.log(`multi-machine: 3-machine run of 1 epoch ${((first[0].t1 - first[0].t0) / 1000).toFixed(1)}s, --resume on 2 machines (epoch 2) ${((c.t1 - c.t0) / 1000).toFixed(1)}s (${net.kind})`);
  }, testTimeoutFor(2));

  it('a machine joins an --elastic run in progress: admitted at a step boundary, the run completes with 3 workers, identical replicas', async (ctx) => {
    const out = path.join(tmp(), 'run');
    const logs = tmp();
    const port = PORT + 4;
    const ring = RING + 300;
    let late: Promise<CliRun> | undefined;
    let lateAt = 0;
    const [c, b] = await Promise.all([
      cliOn(ctx, 'a', ['launch', '--workers', '1', '--nodes', '2', '--elastic', '--listen', `${net.addr.a}:${port}`, '--ring-port-base', String(ring), '--join-timeout-s', '90', '--insecure', ...FAST, ...SYN, '--synthetic-test-data', '480:48:12', '--epochs', '3', '--out', out], (l) => {
        if (!late && /^epoch 1\/3 /.test(l.text)) {
          lateAt = Date.now();
          late = joinOn(ctx, 'c', port, ring, logs, FAST.slice(0, 2));
        }
      }),
      joinOn(ctx, 'b', port, ring, logs, FAST.slice(0, 2)),
    ]);
    expect(late, c.out).toBeDefined();
    const j = await late!;
    expect(c.code, c.out).toBe(0);
    expect(b.code, b.out).toBe(0);
    expect(j.code, j.out).toBe(0);
    expect(c.out).toMatch(/all 2 workers joined \(host-a: rank 0, host-b: rank 1\); ring starting \(elastic/);
    const regrouped = at(c, /^regrouped: generation 2, 3 workers \(host-a: 1, host-b: 1, host-c: 1\)/);
    expect(regrouped, c.out).toBeDefined();
    expect(c.out).toMatch(/^epoch 3\/3 .*world 3/m);
    expect(stateLine(c.out)?.slice(2)).toEqual(['3', '3']);
    expect(j.out).toMatch(/local worker 0: rank 2 of 3/);
    expect(j.out).toMatch(/done: ranks 2 of 3 on host host-c completed/);
    expect(j.leftBehind || b.leftBehind || c.leftBehind).toBe(false);
    console.log(`multi-machine: elastic join from host c (${net.kind}): started ${((lateAt - c.t0) / 1000).toFixed(1)}s into the run, admitted (generation 2) ${((regrouped!.t - lateAt) / 1000).toFixed(1)}s later; run ${((c.t1 - c.t0) / 1000).toFixed(1)}s`);
  }, testTimeoutFor(2));

  // Only with namespaces: a link to take down needs a network of its own.
  it('a machine cut off (its link down) in an --elastic run: late, then lost after --timeout-s; the others finish; its join and workers stop on their own', async (ctx) => {
    needsNamespaces(ctx);
    const out = path.join(tmp(), 'run');
    const logs = tmp();
    const port = PORT + 5;
    const ring = RING + 400;
    let cutAt = 0;
    const cut = (l: Line) => {
      if (cutAt === 0 && /^epoch 1\/2 /.test(l.text)) {
        // Host c's port on the bridge: c's eth0 loses its carrier, nobody gets a reset.
        try {
          ip('-n', net.ns.sw, 'link', 'set', 'pc', 'down');
          cutAt = Date.now();
        } catch (e) {
          console.warn(`multi-machine link-down test: could not take host c's link down: ${String(e)}`);
          cutAt = -1;
        }
      }
    };
    try {
      const [c, b, cc] = await Promise.all([
        cliOn(ctx, 'a', ['launch', '--workers', '1', '--nodes', '3', '--elastic', '--listen', `${net.addr.a}:${port}`, '--ring-port-base', String(ring), '--join-timeout-s', '90', '--insecure', ...FAST, ...SYN, '--epochs', '2', '--out', out], cut),
        joinOn(ctx, 'b', port, ring, logs, FAST.slice(0, 2)),
        joinOn(ctx, 'c', port, ring, logs, FAST.slice(0, 2)),
      ]);
      expect(cutAt, c.out).toBeGreaterThan(0);
      expect(c.code, c.out).toBe(0);
      expect(b.code, b.out).toBe(0);
      // The first warning after the cut: a loaded machine can also be late (and recover) before it.
      const late = c.lines.find((l) => l.t >= cutAt && /^warning: rank 2 on host host-c is late: no heartbeat for/.test(l.text));
      const lost = at(c, /^lost rank 2 on host host-c: no heartbeat for [\d.]+ s/);
      expect(late, c.out).toBeDefined();
      expect(lost, c.out).toBeDefined();
      expect(late!.t).toBeLessThan(lost!.t);
      const detect = (lost!.t - cutAt) / 1000;
      expect(detect).toBeGreaterThanOrEqual(9);
      expect(detect).toBeLessThan(16);
      expect(at(c, /^regrouped: generation 2, 2 workers \(host-a: 1, host-b: 1\)/), c.out).toBeDefined();
      expect(c.out).toMatch(/^epoch 2\/2 .*world 2/m);
      expect(stateLine(c.out)?.slice(2)).toEqual(['2', '2']);
      // The cut-off machine: its join stops (non-zero, saying why) with its workers, within 2 x the timeout.
      const stopped = (cc.t1 - cutAt) / 1000;
      expect(cc.code, cc.out).not.toBe(0);
      const said = cc.lines.find((l) => /silent for [\d.]+ s/.test(l.text));
      expect(said, cc.out).toBeDefined();
      expect(stopped, cc.out).toBeLessThan(22);
      expect(cc.leftBehind, 'a worker outlived the join process of the cut-off machine').toBe(false);
      expect(b.leftBehind || c.leftBehind).toBe(false);
      console.log(`fault: link of host c down (elastic, 3 machines, timeout 10 s, heartbeat 250 ms): warned after ${((late!.t - cutAt) / 1000).toFixed(1)}s, declared lost after ${detect.toFixed(1)}s; run completed with 2 workers; host c's join and workers stopped ${stopped.toFixed(1)}s after the cut (exit ${cc.code}: ${said!.text.slice(0, 160)})`);
    } finally {
      ip('-n', net.ns.sw, 'link', 'set', 'pc', 'up');
    }
  }, testTimeoutFor(2));
});
