// The machines of a `launch --hosts` / `--hostfile` run and their worker slots, in horovodrun's
// formats: `--hosts a:2,b:2` and a hostfile of `host slots=N` lines.
import fs from 'node:fs';
import { UsageError } from './errors.js';

export interface HostSlots {
  host: string;
  slots: number;
}

/** A host name or IPv4 address (what ssh and ZeroMQ accept; no user@, no port). */
const HOST = /^[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?$/;
const MAX_SLOTS = 1024;

function checkHost(host: string, where: string): void {
  if (!HOST.test(host)) throw new UsageError(`${where}: '${host}' is not a host name or address (letters, digits, '.', '-', '_'; user and port go in ~/.ssh/config or --ssh-port)`);
}

function checkSlots(v: string, where: string): number {
  const n = Number(v);
  if (!/^\d+$/.test(v) || n < 1 || n > MAX_SLOTS) throw new UsageError(`${where}: slots must be an integer from 1 to ${MAX_SLOTS}, got '${v}'`);
  return n;
}

function checkUnique(hosts: HostSlots[], where: (i: number) => string): HostSlots[] {
  const seen = new Map<string, number>();
  hosts.forEach((h, i) => {
    const first = seen.get(h.host);
    if (first !== undefined) throw new UsageError(`${where(i)}: host ${h.host} is listed twice (also ${where(first)}): give it once, with all its slots`);
    seen.set(h.host, i);
  });
  return hosts;
}

/** `--hosts a:2,b:2` (slots default 1, as horovodrun's -H). */
export function parseHosts(spec: string): HostSlots[] {
  const items = spec.split(',').map((s) => s.trim());
  if (items.some((s) => s === '')) throw new UsageError(`--hosts '${spec}': an empty entry; give HOST[:SLOTS],... (e.g. a:2,b:2)`);
  const hosts = items.map((item) => {
    const [host, slots, extra] = item.split(':');
    if (extra !== undefined) throw new UsageError(`--hosts entry '${item}': give HOST[:SLOTS] (user and port go in ~/.ssh/config or --ssh-port)`);
    checkHost(host, `--hosts entry '${item}'`);
    return { host, slots: slots === undefined ? 1 : checkSlots(slots, `--hosts entry '${item}'`) };
  });
  return checkUnique(hosts, (i) => `--hosts entry '${items[i]}'`);
}

/** horovodrun's hostfile: `host slots=N` per line (slots default 1), `#` comments, blank lines. */
export function parseHostfileText(text: string, file: string): HostSlots[] {
  const hosts: HostSlots[] = [];
  const lines: number[] = [];
  text.split('\n').forEach((raw, i) => {
    const line = raw.replace(/#.*/, '').trim();
    if (line === '') return;
    const where = `${file}:${i + 1}`;
    const m = /^(\S+)(?:\s+slots\s*=\s*(\S+))?$/.exec(line);
    if (!m) throw new UsageError(`${where}: '${raw.trim()}' is not 'HOST slots=N'`);
    checkHost(m[1], where);
    hosts.push({ host: m[1], slots: m[2] === undefined ? 1 : checkSlots(m[2], where) });
    lines.push(i + 1);
  });
  if (hosts.length === 0) throw new UsageError(`${file}: no hosts (one 'HOST slots=N' per line)`);
  return checkUnique(hosts, (i) => `${file}:${lines[i]}`);
}

export function readHostfile(file: string): HostSlots[] {
  let text: string;
  try {
    text = fs.readFileSync(file, 'utf8');
  } catch (e) {
    throw new UsageError(`--hostfile ${file}: cannot read it (${(e as NodeJS.ErrnoException).code ?? (e as Error).message})`);
  }
  return parseHostfileText(text, file);
}
