// The control channel over real sockets (127.0.0.1), in one process.
import * as zmq from 'zeromq';
import { afterEach, describe, expect, it } from 'vitest';
import { ControlClient, ControlServer, ControlTimeoutError } from './control.js';
import { decodeMessage, encodeMessage, PROTOCOL_VERSION } from './protocol.js';

const cleanup: (() => Promise<void> | void)[] = [];
afterEach(async () => {
  for (const f of cleanup.splice(0)) await f();
});

describe('control channel', () => {
  it('Hello reaches the server; its answer (with the detail JSON of a StepReport) reaches the worker', async () => {
    const server = await ControlServer.bind({ runId: 'r1' });
    cleanup.push(() => server.close());
    expect(server.port).toBeGreaterThan(0);
    const got = new Promise<Buffer>((resolve) =>
      server.onMessage((e) => {
        expect(e.message.kind).toBe('hello');
        expect(e.message.body).toMatchObject({ host: 'h', requestedRank: 1, dataEndpoints: ['tcp://127.0.0.1:1'] });
        resolve(e.peer);
      }),
    );
    const client = new ControlClient(server.endpoint, { timeoutMs: 5000 });
    cleanup.push(() => client.close(0));
    await client.send('hello', { host: 'h', pid: 1, localRank: 0, requestedRank: 1, dataEndpoints: ['tcp://127.0.0.1:1'] });
    const peer = await got;
    await server.send(peer, 'stepReport', { rank: 0, regroup: { generation: 3, committed: { epoch: 2, done: 0, step: 7 }, endpoints: ['tcp://a:1'], reason: 'why' } });
    const m = await client.receive('test');
    expect(m.kind).toBe('stepReport');
    expect(m.runId).toBe('r1');
    // Plain objects of the fields on the wire: proto3 leaves the zero `done` off, and the key was not given.
    expect((m.body as { regroup?: unknown }).regroup).toEqual({ generation: 3, committed: { epoch: 2, step: 7 }, endpoints: ['tcp://a:1'], reason: 'why' });
  });

  it('a Hello of another protocol version is answered with Error{PROTOCOL_VERSION}, garbage is dropped', async () => {
    const server = await ControlServer.bind();
    cleanup.push(() => server.close());
    const seen: string[] = [];
    server.onMessage((e) => seen.push(e.message.kind));
    const d = new zmq.Dealer({ linger: 0, receiveTimeout: 5000 });
    cleanup.push(() => d.close());
    d.connect(server.endpoint);
    await d.send(Buffer.from('not a protobuf at all \xff\xff'));
    await d.send(encodeMessage('hello', { host: 'old' }, '', PROTOCOL_VERSION + 1));
    const [frame] = await d.receive();
    const r = decodeMessage(frame);
    expect(r.ok).toBe(true);
    if (!r.ok) return;
    expect(r.message.kind).toBe('error');
    expect((r.message.body as { code?: number; message?: string }).code).toBe(1);
    expect((r.message.body as { message?: string }).message).toMatch(/protocol version/);
    expect(seen).toEqual([]);
  });

  it('receive() fails with a clear ControlTimeoutError when nobody answers', async () => {
    const client = new ControlClient('tcp://127.0.0.1:9', { timeoutMs: 300, who: 'rank 3 on host x' });
    cleanup.push(() => client.close(0));
    const t0 = Date.now();
    const err = await client.receive('the rendezvous').catch((e: unknown) => e);
    expect(err).toBeInstanceOf(ControlTimeoutError);
    expect((err as Error).message).toMatch(/rank 3 on host x heard nothing from the coordinator at tcp:\/\/127\.0\.0\.1:9 for 300 ms during the rendezvous/);
    expect(Date.now() - t0).toBeLessThan(3000);
  });
});
