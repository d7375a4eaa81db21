// `launch --hosts` over real ssh: Debian's OpenSSH server in hosts b and c (network namespaces,
// testing/netns.ts), key-only authentication with a key made for the test; the launcher in host a
// starts `join` on b and c through the system's ssh client. Skipped, and reported as skipped,
// without root and network namespaces or without sshd.
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it, type TestContext } from 'vitest';
import { initKeyDir } from '@dtrain/transport';
import { makeNet, type Host, type Net } from './testing/netns.js';
import { startCli, testTimeoutFor } from './testing/processes.js';
import { until } from './testing/wait.js';

const SSHD = '/usr/sbin/sshd';
const tmp = () => fs.mkdtempSync(path.join(os.tmpdir(), 'dtrain-ssh-'));
const TRAIN = ['--synthetic-test-data', '48:32:12', '--batch-size', '8', '--seed', '5', '--metrics-port', '0', '--join-timeout-s', '60'];

let net: Net;
let dir = '';
let why = '';
const sshdPids: number[] = [];

/** An sshd on `h`'s address that accepts only `dir`/authorized_keys, logging to `dir`/sshd-h.log. */
function startSshd(h: Host): void {
  const config = path.join(dir, `sshd-${h}.conf`);
  fs.writeFileSync(
    config,
    [
      'Port 22', `ListenAddress ${net.addr[h]}`, `HostKey ${dir}/host_key`, `AuthorizedKeysFile ${dir}/authorized_keys`,
      'PermitRootLogin prohibit-password', 'PasswordAuthentication no', 'KbdInteractiveAuthentication no', 'UsePAM no',
      // The test's files live in a temporary folder that sshd's ownership checks would refuse.
      'StrictModes no', `PidFile ${dir}/sshd-${h}.pid`,
    ].join('\n') + '\n',
  );
  execFileSync('ip', ['netns', 'exec', net.ns[h], SSHD, '-f', config, '-E', path.join(dir, `sshd-${h}.log`)], { timeout: 10_000 });
  // sshd's parent returns before the daemon has written its pid file (and listens).
  const pidFile = path.join(dir, `sshd-${h}.pid`);
  const deadline = Date.now() + 10_000;
  while (!fs.existsSync(pidFile) || fs.readFileSync(pidFile, 'utf8').trim() === '') {
    if (Date.now() > deadline) throw new Error(`sshd in host ${h} wrote no pid file in 10 s: ${fs.readFileSync(path.join(dir, `sshd-${h}.log`), 'utf8')}`);
    Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, 50);
  }
  sshdPids.push(Number(fs.readFileSync(pidFile, 'utf8')));
}

beforeAll(() => {
  net = makeNet(`dtsh${process.pid}`, '10.213.9');
  if (net.kind !== 'netns') why = net.why ?? 'no network namespaces';
  else if (!fs.existsSync(SSHD)) why = 'no OpenSSH server (apt-get install openssh-server)';
  else {
    dir = tmp();
    fs.mkdirSync('/run/sshd', { recursive: true });
    execFileSync('ssh-keygen', ['-q', '-t', 'ed25519', '-N', '', '-f', path.join(dir, 'host_key')]);
    execFileSync('ssh-keygen', ['-q', '-t', 'ed25519', '-N', '', '-f', path.join(dir, 'id')]);
    execFileSync('ssh-keygen', ['-q', '-t', 'ed25519', '-N', '', '-f', path.join(dir, 'wrong_id')]);
    fs.copyFileSync(path.join(dir, 'id.pub'), path.join(dir, 'authorized_keys'));
    // The client side: a throwaway known_hosts, no questions, quiet; the key comes with --ssh-identity.
    fs.writeFileSync(path.join(dir, 'ssh_config'), 'Host *\n  User root\n  StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null\n  IdentitiesOnly yes\n  LogLevel ERROR\n');
    startSshd('b');
    startSshd('c');
  }
  if (why !== '') console.warn(`ssh tests: NO SSH HOSTS (${why}); they are skipped`);
}, 60_000);

afterAll(() => {
  // Also an sshd whose pid file came after its start failed the test (read again here).
  for (const h of ['b', 'c'] as const) {
    const file = path.join(dir, `sshd-${h}.pid`);
    if (dir !== '' && fs.existsSync(file)) sshdPids.push(Number(fs.readFileSync(file, 'utf8')));
  }
  for (const pid of new Set(sshdPids.filter((p) => p > 0))) {
    try {
      process.kill(pid, 'SIGTERM');
    } catch {
      // gone
    }
  }
  net?.remove();
});

const needsHosts = (ctx: TestContext) => {
  // CI installs OpenSSH and runs as root (.ci/run): there missing hosts are a failure, not a skip.
  if (why !== '' && process.env.CI) throw new Error(`CI must be able to start the ssh hosts: ${why}`);
  ctx.skip(why !== '', `needs ssh hosts in network namespaces (${why})`);
};

/** `launch --hosts` in host a with the test's ssh client settings. */
function launchHere(ctx: TestContext, args: string[], identity = 'id') {
  return startCli(ctx, ['launch', '--ssh-config', path.join(dir, 'ssh_config'), '--ssh-identity', path.join(dir, identity), ...args], {
    prefix: net.exec.a,
    env: { DTRAIN_HOST: 'host-a' },
  });
}

const hostList = (slots = 1) => (['a', 'b', 'c'] as const).map((h) => `${net.addr[h]}:${slots}`).join(',');

/** Processes in the hosts' namespaces besides their sshd: "HOST PID COMMAND LINE" lines. */
function hostProcesses(): string[] {
  const lines: string[] = [];
  for (const h of ['a', 'b', 'c'] as const) {
    const pids = execFileSync('ip', ['netns', 'pids', net.ns[h]], { encoding: 'utf8' }).split('\n').filter(Boolean);
    for (const pid of pids) {
      let cmd = '';
      try {
        cmd = fs.readFileSync(`/proc/${pid}/cmdline`, 'utf8').replace(/\0/g, ' ').trim();
      } catch {
        continue;
      }
      if (cmd !== '' && !cmd.startsWith(SSHD) && !cmd.startsWith('sshd:')) lines.push(`${h} ${pid} ${cmd}`);
    }
  }
  return lines;
}

describe('launch --hosts over ssh', () => {
  it('a 3-host run completes with CURVE, remote output labelled by host, identical replicas, nothing left', async (ctx) => {
    needsHosts(ctx);
    const keys = path.join(tmp(), 'keys');
    initKeyDir({ dir: keys, name: 'cluster' });
    const out = path.join(tmp(), 'run');
    const r = await launchHere(ctx, ['--hosts', hostList(), '--keys', keys, '--epochs', '1', '--out', out, ...TRAIN]).done;
    expect(r.code, r.out).toBe(0);
    expect(r.out).toContain(`hosts: ${net.addr.a} (1), ${net.addr.b} (1), ${net.addr.c} (1); this machine is ${net.addr.a}, the others start over ssh`);
    expect(r.out).toMatch(/^security: CURVE on the control socket and the rings/m);
    expect(r.out).toMatch(new RegExp(`^\\[${net.addr.b.replace(/\./g, '\\.')}\\] joined the coordinator at ${net.addr.a.replace(/\./g, '\\.')}:\\d+ as host ${net.addr.b.replace(/\./g, '\\.')} `, 'm'));
    expect(r.out).toMatch(/all 3 workers joined \(host-a: rank 0, 10\.213\.9\.2: rank 1, 10\.213\.9\.3: rank 2\)/);
    expect(r.out).toContain(`[${net.addr.c}] done: ranks 2 of 3 on host ${net.addr.c} completed (logs in ${out}/logs/${net.addr.c})`);
    expect(r.out).toMatch(/^replicas identical: state sha256 [0-9a-f]{16} on all 3 workers on 3 machines$/m);
    await until(() => hostProcesses().length === 0, 10_000, () => `processes left:\n${hostProcesses().join('\n')}`);
  }, testTimeoutFor(1));

  it('an unreachable host and a wrong key: one line per host before anything starts', async (ctx) => {
    needsHosts(ctx);
    const [gone, wrongKey] = await Promise.all([
      launchHere(ctx, ['--hosts', `${net.addr.a}:1,${net.addr.b}:1,10.213.9.9:1`, '--insecure', '--epochs', '1', ...TRAIN]).done,
      launchHere(ctx, ['--hosts', hostList(), '--insecure', '--epochs', '1', ...TRAIN], 'wrong_id').done,
    ]);
    expect(gone.code).toBe(2);
    expect(gone.stderr).toMatch(/^error: cannot start workers over ssh \(nothing was started\):\n {2}10\.213\.9\.9: ssh: connect to host 10\.213\.9\.9 port 22: (No route to host|Connection timed out)\n/);
    expect(gone.stderr).not.toContain(net.addr.b);
    expect(wrongKey.code).toBe(2);
    expect(wrongKey.stderr).toContain(`\n  ${net.addr.b}: root@${net.addr.b}: Permission denied (publickey).\n  ${net.addr.c}: root@${net.addr.c}: Permission denied (publickey).\n`);
    for (const r of [gone, wrongKey]) expect(r.stdout).not.toMatch(/coordinator|joined/);
  }, testTimeoutFor(1));

  it('Ctrl-C on the launcher, and a killed launcher: no process is left on any host', async (ctx) => {
    needsHosts(ctx);
    const times: string[] = [];
    for (const signal of ['SIGINT', 'SIGKILL'] as const) {
      const run = launchHere(ctx, ['--hosts', hostList(), '--insecure', '--epochs', '30', '--timeout-s', '10', '--out', path.join(tmp(), 'run'), ...TRAIN]);
      await until(() => /^all 3 workers joined/m.test(run.run.out), 90_000, () => `the workers did not join:\n${run.run.out}`);
      await new Promise((r) => setTimeout(r, 2000));
      const t0 = Date.now();
      // The launcher alone, not its process group: what is left must stop on its own.
      run.child.kill(signal);
      await until(() => hostProcesses().length === 0, 40_000, () => `${signal}: processes left on the hosts:\n${hostProcesses().join('\n')}`);
      times.push(`${signal} ${((Date.now() - t0) / 1000).toFixed(1)} s`);
    }
    console.log(`ssh: every process gone after ${times.join(', ')} (--timeout-s 10)`);
  }, testTimeoutFor(2));
});

describe('--hosts / --hostfile, bad input', () => {
  it('a malformed hostfile line, a list without this machine, an ssh flag without hosts: one line each', async (ctx) => {
    const file = path.join(tmp(), 'hostfile');
    fs.writeFileSync(file, '# workstations\nws1 slots=2\nws2 slots=two\n');
    const bad = await startCli(ctx, ['launch', '--hostfile', file, '--insecure', ...TRAIN]).done;
    expect(bad.code).toBe(2);
    expect(bad.stderr.trim()).toBe(`error: ${file}:3: slots must be an integer from 1 to 1024, got 'two'`);
    const notHere = await startCli(ctx, ['launch', '--hosts', 'ws1:2,ws2:2', '--insecure', ...TRAIN]).done;
    expect(notHere.code).toBe(2);
    expect(notHere.stderr).toMatch(/^error: --hosts does not list this machine \(.+\): the coordinator and rank 0 run where launch runs/);
    const stray = await startCli(ctx, ['launch', '--workers', '1', '--ssh-port', '2222', ...TRAIN]).done;
    expect(stray.stderr.trim()).toBe('error: --ssh-port applies to --hosts / --hostfile (workers started over ssh)');
  });
});
