// CURVE + ZAP on real sockets (127.0.0.1): strangers without keys or with keys not in the
// allow-list cannot join a ring or the control socket, cannot inject gradients, and the
// all-reduce between the legitimate ranks stays bitwise right. Key files: modes, atomic, errors.
import { chmodSync, mkdtempSync, readFileSync, readdirSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import * as zmq from 'zeromq';
import { ControlClient, ControlServer } from './control.js';
import { addAllowedKey, curveClientSecurity, curveServerSecurity, initKeyDir, KeyFileError, loadKeyDir } from './keys.js';
import { encodeMessage, transportCounters } from './protocol.js';
import { Ring, type PeerInfo } from './ring.js';
import { curveKeyPair, isCurveKey, SecurityError, z85Decode, z85Encode, zapReply, type Security } from './security.js';
import { makeData, ringReference } from './testing/data.js';
import { captureTransportLog, cleanupAfterEach, until } from './testing/wait.js';

const cleanup = cleanupAfterEach();
const logLines = captureTransportLog();

/** A stranger's socket: sends `frames` repeatedly (best effort) and records anything it receives. */
function stranger(endpoint: string, opts: Record<string, unknown>, frames: Buffer[]): { got: number; stop: () => void } {
  const d = new zmq.Dealer({ linger: 0, sendTimeout: 50, reconnectInterval: 50, ...opts });
  d.connect(endpoint);
  const s = { got: 0, stop: () => d.close() };
  let stopped = false;
  s.stop = () => {
    stopped = true;
    d.close();
  };
  void (async () => {
    for (let i = 0; i < 200 && !stopped; i++) {
      await d.send(frames).catch(() => undefined);
      await new Promise((r) => setTimeout(r, 10));
    }
  })();
  void (async () => {
    d.receiveTimeout = 10_000;
    while (!stopped) {
      try {
        await d.receive();
        s.got++;
      } catch {
        return;
      }
    }
  })();
  cleanup.push(() => s.stop());
  return s;
}

describe('CURVE keys', () => {
  it('z85 round-trips and matches libzmq keys', () => {
    const kp = curveKeyPair();
    expect(isCurveKey(kp.publicKey) && isCurveKey(kp.secretKey)).toBe(true);
    expect(z85Encode(z85Decode(kp.publicKey)!)).toBe(kp.publicKey);
    expect(z85Encode(Buffer.from([0x86, 0x4f, 0xd2, 0x6f, 0xb5, 0x59, 0xf7, 0x5b]))).toBe('HelloWorld'); // RFC 32's example
    expect(isCurveKey('x'.repeat(39))).toBe(false);
    expect(isCurveKey('"'.repeat(40))).toBe(false);
  });

  it('keys init writes the secret 0600 and the rest 0644, atomically; load checks modes; add-peer validates', () => {
    const dir = mkdtempSync(join(tmpdir(), 'dtrain-keys-'));
    cleanup.push(() => rmSync(dir, { recursive: true, force: true }));
    const k = initKeyDir({ dir, name: 'host-a' });
    expect(statSync(join(dir, 'host.key')).mode & 0o777).toBe(0o600);
    expect(statSync(join(dir, 'host.pub')).mode & 0o777).toBe(0o644);
    expect(statSync(join(dir, 'allowed_keys')).mode & 0o777).toBe(0o644);
    expect(readdirSync(dir).sort()).toEqual(['allowed_keys', 'host.key', 'host.pub']); // no temporaries left
    expect(readFileSync(join(dir, 'host.pub'), 'utf8')).toBe(`${k.publicKey} host-a\n`);
    const loaded = loadKeyDir(dir);
    expect(loaded).toMatchObject({ publicKey: k.publicKey, secretKey: k.secretKey, name: 'host-a', allowed: [{ publicKey: k.publicKey, name: 'host-a' }] });
    expect(() => initKeyDir({ dir })).toThrow(/already exists.*--force/);

    const other = curveKeyPair();
    const pubFile = join(dir, 'b.pub');
    writeFileSync(pubFile, `${other.publicKey} host-b\n`);
    expect(addAllowedKey(pubFile, { dir })).toMatchObject({ added: true, key: { name: 'host-b' } });
    expect(addAllowedKey(`${other.publicKey} again`, { dir }).added).toBe(false);
    expect(loadKeyDir(dir).allowed.map((a) => a.name)).toEqual(['host-a', 'host-b']);
    expect(() => addAllowedKey('not-a-key host-c', { dir })).toThrow(KeyFileError);

    // As ssh's StrictModes: who can write the allow-list or its directory could add a key.
    chmodSync(join(dir, 'allowed_keys'), 0o666);
    expect(() => loadKeyDir(dir)).toThrow(/the allow-list .*allowed_keys is writable by other users \(mode 666\).*chmod go-w/);
    chmodSync(join(dir, 'allowed_keys'), 0o644);
    chmodSync(dir, 0o777);
    expect(() => loadKeyDir(dir)).toThrow(/the key directory .* is writable by other users \(mode 777\).*chmod go-w/);
    chmodSync(dir, 0o700);
    writeFileSync(join(dir, 'allowed_keys'), `${other.publicKey} ok\nbroken line\n`);
    expect(() => loadKeyDir(dir)).toThrow(/allowed_keys line 2/);
    chmodSync(join(dir, 'host.key'), 0o644);
    expect(() => loadKeyDir(dir)).toThrow(/chmod 600/);
    expect(() => loadKeyDir(join(dir, 'missing'))).toThrow(/keys init/);
  });

  it('answers ZAP requests as RFC 27 says', () => {
    const bad = zapReply([Buffer.from('1.0'), Buffer.from('7'), Buffer.from('no-such-domain'), Buffer.from('1.2.3.4'), Buffer.alloc(0), Buffer.from('CURVE'), Buffer.alloc(32)]);
    expect(bad.accepted).toBe(false);
    expect(bad.reply!.map(String).slice(0, 3)).toEqual(['1.0', '7', '400']);
    const wrongVersion = zapReply([Buffer.from('2.0'), Buffer.from('8'), Buffer.from('d'), Buffer.from('a'), Buffer.alloc(0), Buffer.from('CURVE'), Buffer.alloc(32)]);
    expect(wrongVersion.reply!.map(String).slice(0, 3)).toEqual(['1.0', '8', '500']);
  });

  it('refuses misconfigured security with a clear error', async () => {
    const kp = curveKeyPair();
    await expect(ControlServer.bind({ security: { kind: 'curve', ...kp, allowedClientKeys: [] } })).rejects.toThrow(/non-empty allow-list/);
    await expect(Ring.create({ rank: 0, worldSize: 1, security: { kind: 'curve', ...kp, allowedClientKeys: ['nope'] } })).rejects.toThrow(SecurityError);
    // A CURVE ring must know its next rank's key.
    const sec: Security = { kind: 'curve', ...kp, allowedClientKeys: [kp.publicKey] };
    const rings = await Promise.all([0, 1].map((rank) => Ring.create({ rank, worldSize: 2, security: sec, timeoutMs: 2000, ipc: false })));
    cleanup.push(() => Promise.all(rings.map((r) => r.close())));
    const peers: PeerInfo[] = rings.map((r) => ({ rank: r.rank, host: r.host, endpoints: r.endpoints }));
    await expect(rings[0].connect(peers)).rejects.toThrow(/server's public key/);
  });

  it('a server socket without CURVE binds beyond loopback only when no security was chosen explicitly', async () => {
    const refused = /refusing to listen on 0\.0\.0\.0 without CURVE: .*--insecure; DTRAIN_INSECURE=1/;
    await expect(ControlServer.bind({ listen: '0.0.0.0' })).rejects.toThrow(refused);
    await expect(Ring.create({ rank: 0, worldSize: 1, listen: '0.0.0.0', ipc: false })).rejects.toThrow(refused);
    const server = await ControlServer.bind({ listen: '0.0.0.0', security: { kind: 'none' } });
    const ring = await Ring.create({ rank: 0, worldSize: 1, listen: '0.0.0.0', ipc: false, security: { kind: 'none' } });
    await Promise.all([server.close(), ring.close()]);
    expect(logLines.filter((l) => /listening on 0\.0\.0\.0 without CURVE/.test(l))).toHaveLength(2);
  });

  it("a ring's ipc socket lies in a directory only this user can enter, removed with the ring", async () => {
    const ring = await Ring.create({ rank: 0, worldSize: 1 });
    const ipc = ring.endpoints.find((e) => e.startsWith('ipc://'))!.slice('ipc://'.length);
    const dir = ipc.slice(0, ipc.lastIndexOf('/'));
    expect(statSync(dir).mode & 0o777).toBe(0o700);
    await ring.close();
    expect(() => statSync(dir)).toThrow(/ENOENT/);
  });
});

describe('CURVE ring and control socket', () => {
  it('strangers without keys or with keys not allowed are refused and counted; the all-reduce stays bitwise right', async () => {
    const keys = [curveKeyPair(), curveKeyPair()];
    const allowed = keys.map((k) => k.publicKey);
    const runId = 'curve-run';
    const rings = await Promise.all(
      [0, 1].map((rank) =>
        Ring.create({ rank, worldSize: 2, runId, generation: 3, timeoutMs: 10_000, pieceBytes: 4096, ipc: rank === 0, security: { kind: 'curve', ...keys[rank], allowedClientKeys: allowed } }),
      ),
    );
    cleanup.push(() => Promise.all(rings.map((r) => r.close())));
    expect(rings[1].publicKey).toBe(keys[1].publicKey);
    const before = transportCounters().authRefused;

    // Strangers connect first, claiming rank 0's routing id, and send a RingHello and gradient chunks.
    const target = rings[1].endpoints[0];
    const rid = `dtrain:${runId}:3:0`;
    const ringHello = [encodeMessage('ringHello', { rank: 0, worldSize: 2, generation: 3, host: 'evil' }, runId)];
    const chunk = [
      encodeMessage('ringChunk', { generation: 3, opId: 1, rank: 0, phase: 1, step: 0, chunk: 1, piece: 0, offset: 5001, count: 4, dtype: 1 }, runId),
      Buffer.from(new Float32Array([1e30, 1e30, 1e30, 1e30]).buffer),
    ];
    const noKeys = stranger(target, { routingId: rid }, ringHello);
    const wrong = curveKeyPair();
    const wrongKey = stranger(target, { routingId: rid, curveServerKey: keys[1].publicKey, curvePublicKey: wrong.publicKey, curveSecretKey: wrong.secretKey }, chunk);
    // The public half of rank 0's key with a secret that does not belong to it cannot finish the handshake either.
    const forged = stranger(target, { routingId: rid, curveServerKey: keys[1].publicKey, curvePublicKey: keys[0].publicKey, curveSecretKey: wrong.secretKey }, ringHello);
    const reasons = () => Object.keys(transportCounters().authByReason).join(' | ');
    // No CURVE at all, a key not in the allow-list, a secret key that does not match its public key.
    await until(`three kinds of refusal on rank 1 (seen: ${reasons()})`, () =>
      /MECHANISM_MISMATCH/.test(reasons()) && /key not allowed/.test(reasons()) && /CRYPTOGRAPHIC/.test(reasons()));

    const peers: PeerInfo[] = rings.map((r) => ({ rank: r.rank, host: r.host, endpoints: r.endpoints, publicKey: r.publicKey }));
    await Promise.all(rings.map((r) => r.connect(peers)));
    const spec = { len: 10_001, seed: 11 };
    for (const opts of [{}, { average: true }, { fp16: true }]) {
      const data = [0, 1].map((r) => makeData(spec, r));
      const want = ringReference([0, 1].map((r) => makeData(spec, r)), opts);
      // Chunks from the strangers keep arriving during the collectives.
      const more = stranger(target, {}, [encodeMessage('ringChunk', { generation: 3, opId: 1, rank: 0, phase: 1, count: 4, dtype: 1 }, runId), Buffer.alloc(16)]);
      await Promise.all(rings.map((r, i) => r.allReduce(data[i], opts)));
      more.stop();
      for (const d of data) expect(Buffer.from(d.buffer).equals(Buffer.from(want.buffer))).toBe(true);
    }
    expect(noKeys.got + wrongKey.got + forged.got).toBe(0);
    expect(rings[1].stats().rejected).toEqual({}); // nothing from a stranger ever reached the ring's parser
    expect(transportCounters().authRefused - before).toBeGreaterThanOrEqual(3);
    expect(logLines.some((l) => l.includes("rank 1's data socket refused a connection from address 127.0.0.1"))).toBe(true);
  });

  it('once connected, a ring link admits only its previous rank\'s key, not every key of the allow-list', async () => {
    const keys = [curveKeyPair(), curveKeyPair(), curveKeyPair()];
    const allowed = keys.map((k) => k.publicKey);
    const rings = await Promise.all([0, 1, 2].map((rank) => Ring.create({ rank, worldSize: 3, runId: 'links', generation: 1, timeoutMs: 10_000, ipc: false, security: { kind: 'curve', ...keys[rank], allowedClientKeys: allowed } })));
    cleanup.push(() => Promise.all(rings.map((r) => r.close())));
    const peers: PeerInfo[] = rings.map((r) => ({ rank: r.rank, host: r.host, endpoints: r.endpoints, publicKey: r.publicKey }));
    await Promise.all(rings.map((r) => r.connect(peers)));
    // Rank 2's key is in everyone's allow-list; rank 1's previous rank is rank 0.
    const before = transportCounters().authByReason;
    const posing = stranger(rings[1].endpoints[0], { routingId: 'dtrain:links:1:0', curveServerKey: keys[1].publicKey, curvePublicKey: keys[2].publicKey, curveSecretKey: keys[2].secretKey }, [
      encodeMessage('ringHello', { rank: 0, worldSize: 3, generation: 1, host: 'posing' }, 'links'),
    ]);
    const why = 'key not allowed on this link';
    await until('the refusal of a key allowed in the cluster on a link that is not its own', () => (transportCounters().authByReason[why] ?? 0) > (before[why] ?? 0));
    posing.stop();
    const data = [0, 1, 2].map((r) => makeData({ len: 5000, seed: 4 }, r));
    const want = ringReference([0, 1, 2].map((r) => makeData({ len: 5000, seed: 4 }, r)), {});
    await Promise.all(rings.map((r, i) => r.allReduce(data[i])));
    for (const d of data) expect(Buffer.from(d.buffer).equals(Buffer.from(want.buffer))).toBe(true);
    expect(posing.got).toBe(0);
  });

  it('a CURVE ring carries full pieces (the encrypted frame is larger than the piece: maxMessageSize leaves room)', async () => {
    const keys = [curveKeyPair(), curveKeyPair()];
    const allowed = keys.map((k) => k.publicKey);
    const pieceBytes = 64 * 1024; // the floor of maxMessageSize: every piece below is exactly this size
    const rings = await Promise.all(
      [0, 1].map((rank) =>
        Ring.create({ rank, worldSize: 2, runId: 'curve-full', generation: 1, timeoutMs: 10_000, pieceBytes, ipc: false, security: { kind: 'curve', ...keys[rank], allowedClientKeys: allowed } }),
      ),
    );
    cleanup.push(() => Promise.all(rings.map((r) => r.close())));
    const peers: PeerInfo[] = rings.map((r) => ({ rank: r.rank, host: r.host, endpoints: r.endpoints, publicKey: r.publicKey }));
    await Promise.all(rings.map((r) => r.connect(peers)));
    const spec = { len: 2 * 3 * (pieceBytes / 4), seed: 5 };
    const data = [0, 1].map((r) => makeData(spec, r));
    const want = ringReference([0, 1].map((r) => makeData(spec, r)), {});
    await Promise.all(rings.map((r, i) => r.allReduce(data[i])));
    for (const d of data) expect(Buffer.from(d.buffer).equals(Buffer.from(want.buffer))).toBe(true);
  });

  it('the control socket admits allow-listed workers only', async () => {
    const coord = curveKeyPair();
    const worker = curveKeyPair();
    const server = await ControlServer.bind({ runId: 'c', timeoutMs: 5000, security: { kind: 'curve', ...coord, allowedClientKeys: [worker.publicKey] } });
    cleanup.push(() => server.close());
    const hellos: string[] = [];
    server.onMessage((e) => {
      if (e.message.kind === 'hello') {
        hellos.push((e.message.body as { host?: string }).host ?? '');
        void server.send(e.peer, 'welcome', { rank: 0, worldSize: 1 });
      }
    });
    const hello = (host: string) => encodeMessage('hello', { host, pid: 1, requestedRank: -1 }, '');
    const noKeys = stranger(server.endpoint, {}, [hello('no-keys')]);
    const other = curveKeyPair();
    const wrongKey = stranger(server.endpoint, { curveServerKey: coord.publicKey, ...{ curvePublicKey: other.publicKey, curveSecretKey: other.secretKey } }, [hello('wrong-key')]);
    const wrongServer = stranger(server.endpoint, { curveServerKey: other.publicKey, curvePublicKey: worker.publicKey, curveSecretKey: worker.secretKey }, [hello('wrong-server')]);
    await until('refusals', () => server.stats().authRefused >= 3);

    const sec = curveClientSecurity({ dir: '', name: 'w', ...worker, allowed: [] }, coord.publicKey);
    const client = new ControlClient(server.endpoint, { timeoutMs: 5000, security: sec, who: 'rank 0' });
    cleanup.push(() => client.close(0));
    await client.send('hello', { host: 'good', pid: 2, requestedRank: -1 });
    const m = await client.receive('the welcome');
    expect(m.kind).toBe('welcome');
    expect(hellos).toEqual(['good']);
    expect(noKeys.got + wrongKey.got + wrongServer.got).toBe(0);
    expect(server.stats().rejected).toBe(0);
    // The key-file helpers build the same options.
    expect(curveServerSecurity({ dir: '', name: 'c', ...coord, allowed: [{ publicKey: worker.publicKey, name: 'w' }] })).toEqual({ kind: 'curve', ...coord, allowedClientKeys: [worker.publicKey] });
  });
});
