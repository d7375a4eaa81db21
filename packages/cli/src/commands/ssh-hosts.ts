// `launch --hosts a:2,b:2` / `--hostfile FILE`: the coordinator and this machine's workers run
// here; every other host gets `pnpm cli join` over the user's own ssh, its output streamed back
// labelled by host. Before anything starts, every host must accept ssh (a host that cannot be
// reached is named); when the launcher ends, so do its ssh sessions, and with them (a hang-up on
// their terminal) the remote joins and their workers.
import { execFile, spawn, type ChildProcess } from 'node:child_process';
import { hostname, networkInterfaces } from 'node:os';
import path from 'node:path';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';
import { isLoopback } from '@dtrain/transport';
import { UsageError } from '../errors.js';
import type { HostSlots } from '../hosts.js';
import { sshProbeArgv, sshRunArgv, type SshSettings } from '../ssh.js';
import { localAddressTowards } from './join.js';

/** The project's root here; by default the remote hosts have it at the same path. */
export const PROJECT_DIR = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..', '..', '..');

/** Whether `host` names this machine: localhost, the host name, or one of its addresses. */
export function isThisMachine(host: string): boolean {
  if (isLoopback(host) || host === hostname() || host === hostname().split('.')[0]) return true;
  return Object.values(networkInterfaces()).some((list) => list?.some((a) => a.address === host));
}

export interface HostsPlan {
  local: HostSlots;
  remote: HostSlots[];
  /** This machine's address that routes to the remote hosts: the coordinator listens there. */
  address: string;
}

export async function planHosts(hosts: HostSlots[], flag: string): Promise<HostsPlan> {
  const local = hosts.filter((h) => isThisMachine(h.host));
  if (local.length !== 1) {
    throw new UsageError(
      local.length === 0
        ? `${flag} does not list this machine (${hostname()}): the coordinator and rank 0 run where launch runs; add it (e.g. ${hostname()}:2), or start launch on one of the hosts`
        : `${flag} lists this machine ${local.length} times (${local.map((h) => h.host).join(', ')}): give it once`,
    );
  }
  const remote = hosts.filter((h) => h !== local[0]);
  if (remote.length === 0) throw new UsageError(`${flag} lists only this machine: use --workers ${local[0].slots}`);
  const address = await localAddressTowards(remote[0].host, 22);
  if (address === undefined) throw new UsageError(`${flag}: no local address routes to ${remote[0].host} (does the name resolve here?)`);
  return { local: local[0], remote, address };
}

/** Runs the ssh probe on every remote host at once; one line per host that fails, nothing started. */
export async function probeHosts(remote: HostSlots[], ssh: SshSettings): Promise<void> {
  const failures = await Promise.all(
    remote.map(
      (h) =>
        new Promise<string | undefined>((resolve) => {
          execFile('ssh', sshProbeArgv(h.host, ssh), { timeout: (ssh.connectTimeoutS + 10) * 1000, encoding: 'utf8' }, (err, _out, stderr) => {
            if (!err) return resolve(undefined);
            const why = stderr.trim().split('\n').filter(Boolean).at(-1) ?? (err.killed ? 'no answer' : err.message);
            resolve(`${h.host}: ${why}`);
          });
        }),
    ),
  );
  const bad = failures.filter((f): f is string => f !== undefined);
  if (bad.length > 0) {
    throw new UsageError(
      `cannot start workers over ssh (nothing was started):\n${bad.map((b) => `  ${b}`).join('\n')}\n` +
        'check that `ssh HOST true` works without a password (your key, ~/.ssh/config; --ssh-port, --ssh-identity, --ssh-config)',
    );
  }
}

export interface RemoteJoins {
  /** Ends every ssh session still open (the remote sides hang up). */
  stop(): void;
  /** Resolves when every session has ended, with each host's exit code. */
  done: Promise<{ host: string; code: number | null }[]>;
}

/** Starts `join` on each remote host over ssh; `joinArgs(h)` are its arguments after `join`. */
export function startRemoteJoins(remote: HostSlots[], dir: string, ssh: SshSettings, joinArgs: (h: HostSlots) => string[]): RemoteJoins {
  const children: ChildProcess[] = [];
  const done = Promise.all(
    remote.map((h) => {
      const argv = sshRunArgv(h.host, dir, ['node', '--import', 'tsx', 'packages/cli/src/main.ts', 'join', ...joinArgs(h)], ssh);
      const child = spawn('ssh', ['-o', 'LogLevel=ERROR', ...argv], { stdio: ['ignore', 'pipe', 'pipe'] });
      children.push(child);
      for (const stream of [child.stdout!, child.stderr!]) labelLines(stream.setEncoding('utf8'), `[${h.host}] `);
      return new Promise<{ host: string; code: number | null }>((resolve) => {
        child.on('error', (e) => {
          console.log(`[${h.host}] ssh did not start: ${e.message}`);
          resolve({ host: h.host, code: null });
        });
        child.on('exit', (code) => resolve({ host: h.host, code }));
      });
    }),
  );
  return {
    stop: () => {
      for (const c of children) if (c.exitCode === null && c.signalCode === null) c.kill('SIGTERM');
    },
    done,
  };
}

/** Prints each line of `stream` with `label` before it (readline ends lines at \n and \r\n, a remote terminal's). */
function labelLines(stream: NodeJS.ReadableStream, label: string): void {
  createInterface({ input: stream, crlfDelay: Infinity }).on('line', (l) => console.log(label + l));
}
