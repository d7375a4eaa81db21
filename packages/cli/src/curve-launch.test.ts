// CURVE wired into launch/join (issue 7 §3), on loopback with real processes and sockets: a run
// with --keys trains to identical replicas while a machine whose key is not allow-listed tries to
// join and is refused at the handshake (the run goes on without it: a stranger cannot take the
// place of an expected machine); and runs that reach beyond loopback refuse to start without
// --keys or --insecure. The same wiring across network namespaces: multi-machine.test.ts.
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { describe, expect, it, type TestContext } from 'vitest';
import { addAllowedKey, initKeyDir } from '@dtrain/transport';
import { freePort } from '../../coordinator/src/testing/metrics-fixtures.js';
import { runCli, testTimeoutFor } from './testing/processes.js';

const tmp = () => fs.mkdtempSync(path.join(os.tmpdir(), 'dtrain-curve-'));

const cli = (ctx: TestContext, args: string[], env: NodeJS.ProcessEnv = {}) => runCli(ctx, args, { env });

describe('launch/join with CURVE keys', () => {
  it('a run with --keys completes with identical replicas; a join whose key is not allow-listed is refused, named and counted', async (ctx) => {
    const root = tmp();
    const a = initKeyDir({ dir: path.join(root, 'a'), name: 'host-a' });
    const b = initKeyDir({ dir: path.join(root, 'b'), name: 'host-b' });
    // The stranger knows the coordinator's public key (it is public), but nobody allowed its own.
    const s = initKeyDir({ dir: path.join(root, 's'), name: 'host-s' });
    addAllowedKey(`${b.publicKey} host-b`, { dir: a.dir });
    addAllowedKey(`${a.publicKey} host-a`, { dir: b.dir });
    addAllowedKey(`${a.publicKey} host-a`, { dir: s.dir });
    const port = await freePort();
    const out = path.join(tmp(), 'run');
    const coordinator = cli(
      ctx,
      ['launch', '--workers', '1', '--nodes', '2', '--listen', `127.0.0.1:${port}`, '--keys', a.dir,
        '--synthetic-test-data', '48:32:12', '--batch-size', '8', '--epochs', '1', '--seed', '2', '--metrics-port', '0', '--out', out, '--join-timeout-s', '60', '--timeout-s', '30'],
      { DTRAIN_HOST: 'host-a' },
    );
    const stranger = await cli(ctx, ['join', `127.0.0.1:${port}`, '--workers', '1', '--host', 'host-s', '--keys', s.dir, '--log-dir', path.join(tmp(), 's'), '--join-timeout-s', '6']);
    const joined = cli(ctx, ['join', `127.0.0.1:${port}`, '--workers', '1', '--host', 'host-b', '--keys', b.dir, '--coordinator-key', `${a.publicKey} host-a`, '--log-dir', path.join(tmp(), 'b'), '--join-timeout-s', '60', '--timeout-s', '30']);
    const [c, j] = await Promise.all([coordinator, joined]);

    expect(stranger.code).toBe(2);
    expect(stranger.stderr).toMatch(/dtrain join on host host-s heard nothing from the coordinator at tcp:\/\/127\.0\.0\.1:\d+ for 6000 ms/);
    expect(stranger.stderr).toMatch(/the coordinator refused this machine's CURVE key: it is not in the coordinator's allowed_keys/);
    // The coordinator named the stranger's key in its log and went on with the machines it allows.
    expect(c.stderr).toContain(`the control socket refused a connection from address 127.0.0.1`);
    expect(c.stderr).toContain(`client key ${s.publicKey} not in the allow-list`);
    expect(c.code, c.stdout + c.stderr).toBe(0);
    expect(j.code, j.stdout + j.stderr).toBe(0);
    expect(c.stdout).toMatch(new RegExp(`^security: CURVE on the control socket and the rings \\(tcp://127\\.0\\.0\\.1:${port}\\) \\(encrypted; public key ${a.publicKey.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')}; 2 allowed client keys\\)`, 'm'));
    expect(j.stdout).toContain(`coordinator key ${a.publicKey}`);
    expect(c.stdout).toMatch(/all 2 workers joined \(host-a: rank 0, host-b: rank 1\)/);
    expect(c.stdout).toMatch(/replicas identical: state sha256 [0-9a-f]{16} on all 2 workers on 2 machines/);
    const log0 = fs.readFileSync(path.join(out, 'logs', 'rank-0.log'), 'utf8');
    // The two "machines" have different host names: their links are sockets, not shared memory.
    expect(log0).toContain(`CURVE, key ${a.publicKey}; link to the next rank: socket, from the previous: socket)`);
  }, testTimeoutFor(1));

  it('a run that reaches beyond loopback refuses to start without --keys or --insecure, in one line', async (ctx) => {
    // Refused before anything binds or connects: 10.213.9.x is never contacted.
    const [l, j, both] = await Promise.all([
      cli(ctx, ['launch', '--workers', '1', '--nodes', '2', '--listen', '10.213.9.1:29500', '--synthetic-test-data', '16:8:12', '--metrics-port', '0', '--out', path.join(tmp(), 'never')]),
      cli(ctx, ['join', '10.213.9.1:29500', '--workers', '1', '--advertise', '10.213.9.2']),
      cli(ctx, ['launch', '--workers', '1', '--keys', tmp(), '--insecure', '--synthetic-test-data', '16:8:12', '--metrics-port', '0']),
    ]);
    expect(l.code).toBe(2);
    expect(l.stderr).toBe(
      'error: launch on 10.213.9.1 reaches beyond this machine and needs encryption: run `pnpm cli keys init` on every machine (and `pnpm cli keys add-peer` for each other one), then pass --keys [DIR]; or pass --insecure to run without it on a network you trust\n',
    );
    expect(j.code).toBe(2);
    expect(j.stderr).toMatch(/^error: join on 10\.213\.9\.1, 10\.213\.9\.2 reaches beyond this machine and needs encryption: run `pnpm cli keys init`/);
    expect(j.stderr.trim().split('\n')).toHaveLength(1);
    expect(both.code).toBe(2);
    expect(both.stderr).toBe('error: give --keys DIR or --insecure, not both\n');
  }, 60_000);
});
