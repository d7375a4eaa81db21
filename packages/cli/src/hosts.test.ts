import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { parseHostfileText, parseHosts, readHostfile } from './hosts.js';

describe('parseHosts (horovodrun -H)', () => {
  it('reads HOST[:SLOTS], slots default 1', () => {
    expect(parseHosts('a:2,b:2')).toEqual([{ host: 'a', slots: 2 }, { host: 'b', slots: 2 }]);
    expect(parseHosts('10.0.0.1, gpu-node7:8 ,c')).toEqual([{ host: '10.0.0.1', slots: 1 }, { host: 'gpu-node7', slots: 8 }, { host: 'c', slots: 1 }]);
  });
  it.each([
    ['a:2,,b', "--hosts 'a:2,,b': an empty entry; give HOST[:SLOTS],... (e.g. a:2,b:2)"],
    ['a:0', "--hosts entry 'a:0': slots must be an integer from 1 to 1024, got '0'"],
    ['a:x', "--hosts entry 'a:x': slots must be an integer from 1 to 1024, got 'x'"],
    ['me@a:2', "--hosts entry 'me@a:2': 'me@a' is not a host name or address (letters, digits, '.', '-', '_'; user and port go in ~/.ssh/config or --ssh-port)"],
    ['a:2:22', "--hosts entry 'a:2:22': give HOST[:SLOTS] (user and port go in ~/.ssh/config or --ssh-port)"],
    ['a:1,b,a:2', "--hosts entry 'a:2': host a is listed twice (also --hosts entry 'a:1'): give it once, with all its slots"],
  ])('refuses %j in one line', (spec, message) => {
    expect(() => parseHosts(spec)).toThrow(message);
  });
});

describe('hostfile (horovodrun format)', () => {
  it('reads "HOST slots=N" lines, comments and blank lines', () => {
    expect(parseHostfileText('# lab\nws1 slots=4\n\nws2   slots = 2  # the old one\nws3\n', 'hosts')).toEqual([
      { host: 'ws1', slots: 4 },
      { host: 'ws2', slots: 2 },
      { host: 'ws3', slots: 1 },
    ]);
  });
  it('names the file and line of what it refuses', () => {
    expect(() => parseHostfileText('ws1 slots=4\nws2 gpus=2\n', 'hosts')).toThrow("hosts:2: 'ws2 gpus=2' is not 'HOST slots=N'");
    expect(() => parseHostfileText('ws1 slots=4\n\nws1 slots=2\n', 'hosts')).toThrow('hosts:3: host ws1 is listed twice (also hosts:1): give it once, with all its slots');
    expect(() => parseHostfileText('# nothing\n', 'hosts')).toThrow("hosts: no hosts (one 'HOST slots=N' per line)");
    const missing = path.join(os.tmpdir(), 'no-such-hostfile');
    expect(() => readHostfile(missing)).toThrow(`--hostfile ${missing}: cannot read it (ENOENT)`);
    const file = path.join(fs.mkdtempSync(path.join(os.tmpdir(), 'hf-')), 'hosts');
    fs.writeFileSync(file, 'a slots=2\nb slots=2\n');
    expect(readHostfile(file)).toHaveLength(2);
  });
});
