// Three "machines" a, b, c for tests that need more than one host: a network namespace each (its
// own address, eth0 on a bridge in a fourth namespace), or loopback addresses where namespaces
// are not available (not root). Both ends of every link are created inside the namespaces: the
// root namespace never sees them.
import { execFileSync } from 'node:child_process';

export const HOSTS = ['a', 'b', 'c'] as const;
export type Host = (typeof HOSTS)[number];

export interface Net {
  kind: 'netns' | 'loopback';
  addr: Record<Host, string>;
  /** Command prefix that runs a program on that host. */
  exec: Record<Host, string[]>;
  /** The namespace of each host, and of the switch (`sw`): for `ip -n`. */
  ns: Record<Host | 'sw', string>;
  /** Why there are no namespaces. */
  why?: string;
  /** Removes the namespaces (nothing for loopback). */
  remove(): void;
}

export function ip(...args: string[]): void {
  execFileSync('ip', args, { stdio: ['ignore', 'ignore', 'pipe'], timeout: 10_000 });
}

/** Namespaces `<prefix>a`, `<prefix>b`, `<prefix>c` at `<subnet>.1-3` (e.g. subnet '10.213.7'). */
export function makeNet(prefix: string, subnet: string): Net {
  const ns = { a: `${prefix}a`, b: `${prefix}b`, c: `${prefix}c`, sw: `${prefix}sw` };
  const remove = () => {
    for (const n of Object.values(ns)) {
      try {
        ip('netns', 'del', n);
      } catch {
        // not created
      }
    }
  };
  const loopback: Net = {
    kind: 'loopback',
    addr: { a: '127.0.0.2', b: '127.0.0.3', c: '127.0.0.4' },
    exec: { a: [], b: [], c: [] },
    ns,
    remove: () => {},
  };
  if (process.platform !== 'linux' || process.getuid?.() !== 0) return { ...loopback, why: 'not running as root' };
  try {
    ip('netns', 'add', ns.sw);
    ip('-n', ns.sw, 'link', 'add', 'br0', 'type', 'bridge');
    ip('-n', ns.sw, 'link', 'set', 'br0', 'up');
    HOSTS.forEach((h, i) => {
      ip('netns', 'add', ns[h]);
      ip('-n', ns.sw, 'link', 'add', `p${h}`, 'type', 'veth', 'peer', 'name', 'eth0', 'netns', ns[h]);
      ip('-n', ns.sw, 'link', 'set', `p${h}`, 'master', 'br0');
      ip('-n', ns.sw, 'link', 'set', `p${h}`, 'up');
      ip('-n', ns[h], 'addr', 'add', `${subnet}.${i + 1}/24`, 'dev', 'eth0');
      ip('-n', ns[h], 'link', 'set', 'eth0', 'up');
      ip('-n', ns[h], 'link', 'set', 'lo', 'up');
    });
    return {
      kind: 'netns',
      addr: { a: `${subnet}.1`, b: `${subnet}.2`, c: `${subnet}.3` },
      exec: { a: ['ip', 'netns', 'exec', ns.a], b: ['ip', 'netns', 'exec', ns.b], c: ['ip', 'netns', 'exec', ns.c] },
      ns,
      remove,
    };
  } catch (e) {
    remove();
    return { ...loopback, why: `ip netns failed: ${String((e as { stderr?: Buffer }).stderr ?? (e as Error).message).trim()}` };
  }
}
