// launch() with real worker processes and sockets; the workers speak the real protocol but train
// nothing (testing/fake-worker.ts). Training runs end to end are tested in packages/cli.
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { describe, expect, it, type TestContext } from 'vitest';
import { ControlClient, curveKeyPair, initKeyDir, loadKeyDir, transportCounters, type Security } from '@dtrain/transport';
import { GpuSelectionError, JoinTimeoutError, launch, TrainingMetrics, WorkerFailedError, type RunEvent } from './index.js';
import { killWorkersAtEnd } from './testing/workers.js';

const FAKE = fileURLToPath(new URL('./testing/fake-worker.ts', import.meta.url));
const tmp = () => fs.mkdtempSync(path.join(os.tmpdir(), 'dtrain-coord-'));

/** launch()'s onEvent: records the events, and kills the workers when the test ends (testing/workers.ts). */
function recorded(ctx: TestContext, events: RunEvent[] = []): (e: RunEvent) => void {
  const kill = killWorkersAtEnd(ctx);
  return (e) => {
    events.push(e);
    kill(e);
  };
}

describe('launch', () => {
  it('3 workers: torchrun env, ranks and config handed out, reports collected, logs prefixed by rank', async (ctx) => {
    const runDir = tmp();
    const events: RunEvent[] = [];
    const r = await launch({ workers: 3, entry: FAKE, runDir, config: { hello: 'workers' }, onEvent: recorded(ctx, events), env: { FAKE_MODE: 'ok' } });
    expect(r.worldSize).toBe(3);
    expect(r.finals.map((f) => f.rank)).toEqual([0, 1, 2]);
    expect(events.filter((e) => e.kind === 'joined')).toHaveLength(3);
    const log1 = fs.readFileSync(path.join(runDir, 'logs', 'rank-1.log'), 'utf8');
    expect(log1).toMatch(/^\[rank 1\] rank 1 welcomed with config \{"hello":"workers"\}$/m);
    // Neither keys nor insecure: CURVE with keys made for the run, in a directory only this user
    // enters, removed at the end.
    const keysDir = /keys dir (\S+) mode (\d+)$/m.exec(log1);
    expect(keysDir?.[2]).toBe('700');
    expect(fs.existsSync(keysDir![1])).toBe(false);
  });

  it('without keys or insecure, a stranger on loopback (no key, or one of its own) cannot take the rank a worker has not claimed yet', async (ctx) => {
    const events: RunEvent[] = [];
    const record = recorded(ctx, events);
    let listening!: (endpoint: string) => void;
    const endpoint = new Promise<string>((r) => (listening = r));
    const run = launch({
      workers: 2, entry: FAKE, runDir: tmp(), config: {}, joinTimeoutMs: 6000, env: { FAKE_MODE: 'silent', FAKE_RANK: '1' },
      onEvent: (e) => {
        record(e);
        if (e.kind === 'listening') listening(e.endpoint);
      },
    }).catch((e: unknown) => e);
    // What the review demonstrated: a Hello asking for rank 1 before the real rank 1 says it.
    const claim = async (security: Security | undefined) => {
      const c = new ControlClient(await endpoint, { timeoutMs: 2000, who: 'a stranger', security });
      try {
        await c.send('hello', { host: 'evil', pid: process.pid, localRank: 1, localWorldSize: 2, requestedRank: 1, dataEndpoints: ['tcp://127.0.0.1:1'], curvePublicKey: '' });
        return (await c.receive('the answer to a Hello')).kind;
      } catch (e) {
        return (e as Error).message;
      } finally {
        await c.close();
      }
    };
    const own = curveKeyPair();
    expect(await claim(undefined)).toMatch(/the CURVE handshake failed/);
    // With a server key guessed wrong the handshake never completes: the client hears nothing.
    expect(await claim({ kind: 'curve', ...own, serverPublicKey: curveKeyPair().publicKey })).toMatch(/a stranger heard nothing from the coordinator/);
    const err = await run;
    expect(err).toBeInstanceOf(JoinTimeoutError);
    expect((err as Error).message).toMatch(/only 1 of 2 workers joined .*; missing ranks 1/);
    expect(events.filter((e) => e.kind === 'joined')).toHaveLength(1);
  });

  it("--gpus: worker i gets the i-th GPU of the user's CUDA_VISIBLE_DEVICES, not GPU i", async (ctx) => {
    const runDir = tmp();
    await launch({ workers: 2, gpus: true, entry: FAKE, runDir, config: {}, onEvent: recorded(ctx), env: { FAKE_MODE: 'ok', CUDA_VISIBLE_DEVICES: '2,3' } });
    const sees = (r: number) => /sees CUDA_VISIBLE_DEVICES=(.*)$/m.exec(fs.readFileSync(path.join(runDir, 'logs', `rank-${r}.log`), 'utf8'))?.[1];
    expect([sees(0), sees(1)]).toEqual(['2', '3']);
  });

  it('--gpus with fewer GPUs visible than workers: refused before any worker starts', async (ctx) => {
    const events: RunEvent[] = [];
    const err = await launch({ workers: 2, gpus: true, entry: FAKE, runDir: tmp(), config: {}, onEvent: recorded(ctx, events), env: { FAKE_MODE: 'ok', CUDA_VISIBLE_DEVICES: '5' } }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(GpuSelectionError);
    expect((err as Error).message).toMatch(/^--gpus 2: CUDA_VISIBLE_DEVICES="5" makes 1 GPU visible; use --gpus 1/);
    expect(events).toEqual([]);
  });

  it('elastic with CURVE: a regroup report naming a ring key other than the one proven in the Hello is ignored and counted', async (ctx) => {
    const metrics = new TrainingMetrics({ defaultMetrics: false });
    const events: RunEvent[] = [];
    const r = await launch({ workers: 2, elastic: true, entry: FAKE, runDir: tmp(), config: {}, metrics, env: { FAKE_MODE: 'regroupKey', FAKE_RANK: '1' }, onEvent: recorded(ctx, events) });
    expect(r.finals).toHaveLength(2);
    // (The coordinator also says so on stderr, naming rank, host and both keys.)
    expect(await metrics.registry.metrics()).toMatch(/^dtrain_malformed_messages_rejected_total 1$/m);
    expect(events.filter((e) => e.kind === 'regrouped' || e.kind === 'lost')).toEqual([]);
  });

  it('a worker that exits non-zero ends the run: rank, host, exit code and its last log lines', async (ctx) => {
    const runDir = tmp();
    const t0 = Date.now();
    const err = await launch({ workers: 2, entry: FAKE, runDir, config: {}, env: { FAKE_MODE: 'crash', FAKE_RANK: '1' }, onEvent: recorded(ctx) }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(WorkerFailedError);
    const e = err as WorkerFailedError;
    expect(e.code).toBe('E_WORKER_FAILED');
    expect(e.rank).toBe(1);
    expect(e.exitCode).toBe(3);
    expect(e.message).toMatch(/^rank 1 on host fakehost exited with code 3/);
    expect(e.message).toMatch(/computing step 1\n {2}Error: out of memory in the fake forward pass/);
    expect(e.message).toContain(path.join(runDir, 'logs', 'rank-1.log'));
    expect(Date.now() - t0).toBeLessThan(30_000);
  });

  it('a worker that never joins: JoinTimeoutError names the missing rank, and no process is left', async (ctx) => {
    const runDir = tmp();
    const events: RunEvent[] = [];
    const err = await launch({ workers: 2, entry: FAKE, runDir, config: {}, joinTimeoutMs: 4000, env: { FAKE_MODE: 'silent', FAKE_RANK: '0' }, onEvent: recorded(ctx, events) }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(JoinTimeoutError);
    expect((err as Error).message).toMatch(/only 1 of 2 workers joined .* within 4000 ms; missing ranks 0/);
    for (const e of events) {
      if (e.kind !== 'spawned') continue;
      expect(() => process.kill(e.pid, 0), `pid ${e.pid} still alive`).toThrow();
    }
  });

  it('with keys: CURVE control socket, workers get the coordinator key by env, Welcome.peers carry their keys', async (ctx) => {
    const runDir = tmp();
    const keys = initKeyDir({ dir: path.join(tmp(), 'keys'), name: 'fakehost' });
    const r = await launch({ workers: 2, entry: FAKE, runDir, config: {}, env: { FAKE_MODE: 'ok' }, keys: loadKeyDir(keys.dir), onEvent: recorded(ctx) });
    expect(r.worldSize).toBe(2);
    const log1 = fs.readFileSync(path.join(runDir, 'logs', 'rank-1.log'), 'utf8');
    expect(log1).toContain(`peer keys ${keys.publicKey},${keys.publicKey}`);
  });

  it('with keys: a Hello naming a key that is not allow-listed is refused (key and host named, counted)', async (ctx) => {
    const runDir = tmp();
    const keys = loadKeyDir(initKeyDir({ dir: path.join(tmp(), 'keys'), name: 'fakehost' }).dir);
    const before = transportCounters().authByReason['hello key not allowed'] ?? 0;
    const err = await launch({ workers: 2, entry: FAKE, runDir, config: {}, joinTimeoutMs: 15_000, env: { FAKE_MODE: 'claim', FAKE_RANK: '1' }, keys, onEvent: recorded(ctx) }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(WorkerFailedError);
    expect((err as Error).message).toMatch(/^rank 1 on host \S+ exited with code 4/);
    expect((err as Error).message).toMatch(/refused: host fakehost is not allowed: its key \S{40} is not in the coordinator's allow-list \(.*allowed_keys\)/);
    expect(transportCounters().authByReason['hello key not allowed']).toBe(before + 1);
  });
});
