// Trust on the control channel over real sockets (127.0.0.1): a Hello must prove the CURVE key it
// claims (issue 7 §3), and a replayed or reordered control message is dropped, logged once per peer
// and counted (issue 7 §4), while the normal flow goes on.
import { describe, expect, it } from 'vitest';
import * as zmq from 'zeromq';
import { ControlClient, ControlServer, HELLO_KEY_NOT_PROVEN, REPLAY_REASONS, type ControlEnvelope } from './control.js';
import { decodeMessage, encodeMessage, PROTOCOL_VERSION, transportCounters } from './protocol.js';
import { curveKeyPair, helloKeyProof, verifyHelloKeyProof, z85Encode, type Security } from './security.js';
import { captureTransportLog, cleanupAfterEach, until } from './testing/wait.js';

const cleanup = cleanupAfterEach();
const logLines = captureTransportLog();

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** Replaces `obj[prop]` (a sealed zeromq.js socket) by a proxy that records every frame list sent. */
function tapSends(obj: object, prop: string): { sent: Buffer[][]; raw: zmq.Socket & { send(f: Buffer[] | Buffer): Promise<void> } } {
  const holder = obj as Record<string, zmq.Socket & { send(f: Buffer[] | Buffer): Promise<void> }>;
  const raw = holder[prop];
  const sent: Buffer[][] = [];
  holder[prop] = new Proxy(raw, {
    get(t, p) {
      if (p === 'send') {
        return (frames: Buffer | Buffer[]) => {
          sent.push((Array.isArray(frames) ? frames : [frames]).map((f) => Buffer.from(f)));
          return t.send(frames);
        };
      }
      const v: unknown = Reflect.get(t, p, t);
      return typeof v === 'function' ? (v as (...a: unknown[]) => unknown).bind(t) : v;
    },
    set(t, p, v) {
      return Reflect.set(t, p, v, t);
    },
  });
  return { sent, raw };
}

const reasonCount = (reason: string) => transportCounters().byReason[reason] ?? 0;
const authCount = (reason: string) => transportCounters().authByReason[reason] ?? 0;

describe('the key a Hello claims', () => {
  it('a proof verifies only for the key pair, server key and run it was made for', () => {
    const server = curveKeyPair();
    const a = curveKeyPair();
    const b = curveKeyPair();
    const proof = helloKeyProof(a.publicKey, a.secretKey, server.publicKey, 'run-1');
    expect(proof).toHaveLength(32);
    expect(verifyHelloKeyProof(a.publicKey, proof, server.publicKey, server.secretKey, 'run-1')).toBe(true);
    expect(verifyHelloKeyProof(b.publicKey, proof, server.publicKey, server.secretKey, 'run-1')).toBe(false);
    expect(verifyHelloKeyProof(a.publicKey, proof, server.publicKey, server.secretKey, 'run-2')).toBe(false);
    // A holder of a's secret claiming b: the X25519 secret is a's, so the proof is not b's.
    expect(verifyHelloKeyProof(b.publicKey, helloKeyProof(b.publicKey, a.secretKey, server.publicKey, 'run-1'), server.publicKey, server.secretKey, 'run-1')).toBe(false);
    const other = curveKeyPair();
    expect(verifyHelloKeyProof(a.publicKey, proof, other.publicKey, other.secretKey, 'run-1')).toBe(false);
    // Garbage and a low-order point (all-zero shared secret) are false, never a throw.
    expect(verifyHelloKeyProof(a.publicKey, undefined, server.publicKey, server.secretKey, 'run-1')).toBe(false);
    expect(verifyHelloKeyProof(a.publicKey, proof.subarray(1), server.publicKey, server.secretKey, 'run-1')).toBe(false);
    expect(verifyHelloKeyProof('not a key', proof, server.publicKey, server.secretKey, 'run-1')).toBe(false);
    expect(verifyHelloKeyProof(z85Encode(new Uint8Array(32)), Buffer.alloc(32), server.publicKey, server.secretKey, 'run-1')).toBe(false);
  });

  it('a client with an allow-listed key claiming another allow-listed key in its Hello is refused at the transport and counted', async () => {
    const coord = curveKeyPair();
    const a = curveKeyPair();
    const b = curveKeyPair();
    const server = await ControlServer.bind({ runId: 'trust', timeoutMs: 5000, security: { kind: 'curve', ...coord, allowedClientKeys: [a.publicKey, b.publicKey] } });
    cleanup.push(() => server.close());
    const delivered: ControlEnvelope[] = [];
    server.onMessage((e) => {
      delivered.push(e);
      if (e.message.kind === 'hello') void server.send(e.peer, 'welcome', { rank: 0, worldSize: 1 });
    });
    const refusedBefore = authCount(HELLO_KEY_NOT_PROVEN);
    const sec = (k: { publicKey: string; secretKey: string }): Security => ({ kind: 'curve', ...k, serverPublicKey: coord.publicKey });

    // A ControlClient holding a's key pair, claiming b's key: it cannot prove b, so no proof goes.
    const liar = new ControlClient(server.endpoint, { timeoutMs: 5000, security: sec(a), who: 'liar' });
    cleanup.push(() => liar.close(0));
    await liar.send('hello', { host: 'liar', pid: 1, requestedRank: -1, curvePublicKey: b.publicKey });
    const answer = await liar.receive('the answer');
    expect(answer.kind).toBe('error');
    expect(answer.body).toMatchObject({ code: 3, host: 'liar' });
    expect((answer.body as { message?: string }).message).toMatch(new RegExp(`host liar is not allowed: its Hello claims the CURVE key ${b.publicKey.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')} but does not prove`));

    // A raw socket with a's keys sending b's claim with proofs it can make: a's own proof, and one
    // made with a's secret for b's key. Both refused.
    const raw = new zmq.Dealer({ linger: 0, receiveTimeout: 5000, curveServerKey: coord.publicKey, curvePublicKey: a.publicKey, curveSecretKey: a.secretKey });
    cleanup.push(() => raw.close());
    raw.connect(server.endpoint);
    for (const proof of [helloKeyProof(a.publicKey, a.secretKey, coord.publicKey, ''), helloKeyProof(b.publicKey, a.secretKey, coord.publicKey, '')]) {
      await raw.send(encodeMessage('hello', { host: 'raw', pid: 2, requestedRank: -1, curvePublicKey: b.publicKey, curveKeyProof: proof }));
      const [frame] = await raw.receive();
      const r = decodeMessage(frame);
      expect(r.ok && r.message.kind).toBe('error');
    }
    expect(server.stats().helloRefused).toBe(3);
    expect(authCount(HELLO_KEY_NOT_PROVEN) - refusedBefore).toBe(3);
    expect(delivered).toEqual([]);
    expect(logLines.some((l) => l.includes('refused a Hello from') && l.includes(HELLO_KEY_NOT_PROVEN))).toBe(true);

    // The same client claiming its own key gets in, with the key it proved.
    await liar.send('hello', { host: 'honest', pid: 1, requestedRank: -1, curvePublicKey: a.publicKey });
    expect((await liar.receive('the welcome')).kind).toBe('welcome');
    expect(delivered.map((e) => [(e.message.body as { host?: string }).host, e.authenticatedKey])).toEqual([['honest', a.publicKey]]);
    // A claim of a key not in the allow-list is the coordinator's to refuse: delivered, unproven.
    await liar.send('hello', { host: 'stranger-key', pid: 1, requestedRank: -1, curvePublicKey: curveKeyPair().publicKey });
    await until('the third hello', () => delivered.length === 2);
    expect(delivered[1].authenticatedKey).toBeUndefined();
    expect(server.stats()).toMatchObject({ helloRefused: 3, authRefused: 0, replayed: 0 });
  });

  it('without CURVE nothing is proven or refused', async () => {
    const server = await ControlServer.bind({ runId: 'plain', timeoutMs: 5000 });
    cleanup.push(() => server.close());
    const got = new Promise<ControlEnvelope>((resolve) => server.onMessage(resolve));
    const client = new ControlClient(server.endpoint, { timeoutMs: 5000 });
    cleanup.push(() => client.close(0));
    await client.send('hello', { host: 'h', curvePublicKey: curveKeyPair().publicKey });
    const e = await got;
    expect(e.authenticatedKey).toBeUndefined();
    expect(server.stats().helloRefused).toBe(0);
  });
});

describe('replays on the control channel', () => {
  it('a captured worker message sent again byte for byte is dropped, logged once and counted; the normal flow goes on', async () => {
    const runId = 'replay';
    const server = await ControlServer.bind({ runId, timeoutMs: 5000 });
    cleanup.push(() => server.close());
    const steps: number[] = [];
    const seqs: number[] = [];
    let worker: Buffer | undefined;
    server.onMessage((e) => {
      seqs.push(e.message.seq);
      if (e.message.kind === 'hello') worker = e.peer;
      if (e.message.kind === 'stepReport') steps.push((e.message.body as { step?: number }).step ?? -1);
    });
    const client = new ControlClient(server.endpoint, { runId, timeoutMs: 5000, who: 'rank 0' });
    cleanup.push(() => client.close(0));
    const tap = tapSends(client, 'dealer');
    await client.send('hello', { host: 'h', pid: 1, requestedRank: 0 });
    for (let step = 1; step <= 3; step++) await client.send('stepReport', { rank: 0, step, loss: 0.5 });
    await until('three reports', () => steps.length === 3);
    expect(tap.sent).toHaveLength(4);
    expect(seqs).toEqual([1, 2, 3, 4]);

    const before = reasonCount(REPLAY_REASONS.replayed);
    const linesBefore = logLines.length;
    // The report of step 1 again, byte for byte, three times; the Hello again; then step 4.
    for (let i = 0; i < 3; i++) await tap.raw.send(tap.sent[1][0]);
    await tap.raw.send(tap.sent[0][0]);
    await client.send('stepReport', { rank: 0, step: 4, loss: 0.5 });
    await until('step 4', () => steps.length === 4);
    expect(steps).toEqual([1, 2, 3, 4]);
    expect(reasonCount(REPLAY_REASONS.replayed) - before).toBe(4);
    expect(server.stats().replayed).toBe(4);
    const replayLines = logLines.slice(linesBefore).filter((l) => l.includes(REPLAY_REASONS.replayed));
    expect(replayLines).toHaveLength(1);
    expect(replayLines[0]).toMatch(/the control socket rejected a message from routing id/);

    // The coordinator's messages to the worker: a replay of an earlier one is dropped too.
    const stap = tapSends(server, 'router');
    await server.send(worker!, 'command', { kind: 1, epoch: 1, step: 0 });
    await server.send(worker!, 'command', { kind: 3, epoch: 1, step: 10 });
    expect((await client.receive('command 1')).body).toMatchObject({ kind: 1 });
    expect((await client.receive('command 2')).body).toMatchObject({ kind: 3 });
    const clientBefore = reasonCount(REPLAY_REASONS.replayed);
    await stap.raw.send(stap.sent[0]);
    await server.send(worker!, 'command', { kind: 6, epoch: 1, step: 20, reason: 'done' });
    const next = await client.receive('command 3');
    expect(next.body).toMatchObject({ kind: 6, reason: 'done' });
    expect(next.seq).toBe(3);
    expect(reasonCount(REPLAY_REASONS.replayed) - clientBefore).toBe(1);
    expect(logLines.some((l) => l.startsWith('rank 0 rejected a message from the coordinator at') && l.includes(REPLAY_REASONS.replayed))).toBe(true);
  });

  it('out-of-order and unnumbered messages from a numbering peer are dropped; an unnumbered (older) peer passes', async () => {
    const server = await ControlServer.bind({ runId: 'order', timeoutMs: 5000 });
    cleanup.push(() => server.close());
    const got: string[] = [];
    server.onMessage((e) => got.push(`${(e.message.body as { host?: string; step?: number }).host ?? (e.message.body as { step?: number }).step}`));
    const numbered = new zmq.Dealer({ linger: 0 });
    const older = new zmq.Dealer({ linger: 0 });
    cleanup.push(() => numbered.close(), () => older.close());
    numbered.connect(server.endpoint);
    older.connect(server.endpoint);
    const report = (step: number, seq: number) => encodeMessage('stepReport', { rank: 0, step }, 'order', PROTOCOL_VERSION, seq);
    const unnumberedBefore = reasonCount(REPLAY_REASONS.unnumbered);
    await numbered.send(encodeMessage('hello', { host: 'numbered' }, '', PROTOCOL_VERSION, 5));
    await numbered.send(report(1, 7));
    await numbered.send(report(2, 6)); // overtaken: dropped
    await numbered.send(report(3, 7)); // same number again: dropped
    await numbered.send(report(4, 0)); // unnumbered after numbered: dropped
    await numbered.send(report(5, 9)); // a gap is fine
    await older.send(encodeMessage('hello', { host: 'older' }, ''));
    await older.send(report(11, 0));
    await older.send(report(12, 0));
    await until('all messages', () => got.length === 6);
    await sleep(50);
    expect(got.filter((x) => !['older', '11', '12'].includes(x))).toEqual(['numbered', '1', '5']);
    expect(got.filter((x) => ['older', '11', '12'].includes(x))).toEqual(['older', '11', '12']);
    expect(server.stats().replayed).toBe(3);
    expect(reasonCount(REPLAY_REASONS.unnumbered) - unnumberedBefore).toBe(1);
  });

  it('a sequence number beyond 2^53 is an invalid envelope', () => {
    const r = decodeMessage(encodeMessage('heartbeat', { rank: 0 }, 'r', PROTOCOL_VERSION, 2 ** 53 + 2));
    expect(r).toEqual({ ok: false, reason: 'invalid envelope' });
  });
});
