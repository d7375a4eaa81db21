import { execFileSync } from 'node:child_process';
import { describe, expect, it } from 'vitest';
import { shellWord, sshProbeArgv, sshRunArgv } from './ssh.js';

describe('ssh command lines', () => {
  it('quotes words for the remote shell so that they arrive unchanged', () => {
    const words = ['plain', 'with space', "it's", '$HOME', 'a;b', '`x`', '', 'key=@D+1Z<J>'];
    // Through a real shell, as sshd runs the command.
    const out = execFileSync('sh', ['-c', `printf '%s\\n' ${words.map(shellWord).join(' ')}`], { encoding: 'utf8' });
    expect(out.split('\n').slice(0, -1)).toEqual(words);
    expect(shellWord('/work/dtrain')).toBe('/work/dtrain');
  });
  it('never asks for a password and bounds every wait; passes the user\'s port, key and config', () => {
    const s = { port: 2222, identity: '/k/id', config: '/k/cfg', connectTimeoutS: 10 };
    expect(sshProbeArgv('ws1', s)).toEqual(['-F', '/k/cfg', '-p', '2222', '-i', '/k/id', '-o', 'BatchMode=yes', '-o', 'ConnectTimeout=10', '-o', 'ServerAliveInterval=5', '-o', 'ServerAliveCountMax=3', 'ws1', 'true']);
    const run = sshRunArgv('ws1', '/my project', ['node', 'main.ts', 'join', 'a:1', '--coordinator-key', "x'y"], { connectTimeoutS: 5 });
    expect(run.slice(-3)).toEqual(['-tt', 'ws1', `cd '/my project' && exec node main.ts join a:1 --coordinator-key 'x'\\''y'`]);
  });
});
