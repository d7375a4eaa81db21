// The coordinator's data set file server (FileRequest -> FileChunk on the control socket), as a
// worker of another machine meets it: launch() with nodes 2 (one local fake worker,
// testing/second-machine.ts), and this test as the other machine's only worker, speaking the real protocol. It answers only for the files it
// offers, within their size; a name that leaves the offered folder gets nothing of the file.
import { createHash } from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { ControlClient, type ControlMessage } from '@dtrain/transport';
import { launchForSecondMachine } from './testing/second-machine.js';

const tmp = () => fs.mkdtempSync(path.join(os.tmpdir(), 'dtrain-files-'));
const num = (x: unknown) => (typeof x === 'number' ? x : ((x as { toNumber?: () => number } | undefined)?.toNumber?.() ?? 0));

/** The next message that is not a heartbeat. */
async function next(c: ControlClient, during: string): Promise<ControlMessage> {
  for (;;) {
    const m = await c.receive(during, 10_000);
    if (m.kind !== 'heartbeat') return m;
  }
}

/** Sends a FileRequest and returns the answer: a chunk (its header and bytes) or the error message. */
async function request(c: ControlClient, name: string, offset: number): Promise<{ chunk?: { name: string; offset: number; totalSize: number; sha256: string; bytes: Buffer }; error?: string }> {
  await c.send('fileRequest', { name, offset });
  const m = await next(c, `the answer for ${name}`);
  if (m.kind === 'error') return { error: (m.body as { message?: string }).message };
  expect(m.kind).toBe('fileChunk');
  const b = m.body as { name?: string; offset?: unknown; totalSize?: unknown; sha256?: string };
  return { chunk: { name: b.name ?? '', offset: num(b.offset), totalSize: num(b.totalSize), sha256: b.sha256 ?? '', bytes: m.payload[0] ?? Buffer.alloc(0) } };
}

describe("the coordinator's data set file server", () => {
  it('serves an offered file; refuses names it does not offer (one that leaves its folder too) and offsets past the end', async () => {
    const root = tmp();
    const offeredRoot = path.join(root, 'data');
    fs.mkdirSync(path.join(offeredRoot, 'set'), { recursive: true });
    const content = Buffer.from('the offered bytes\n');
    fs.writeFileSync(path.join(offeredRoot, 'set', 'f.bin'), content);
    // Next to the offered folder: what a traversing name would reach.
    fs.writeFileSync(path.join(root, 'secret.txt'), 'not offered\n');

    // A file of two full chunks: each request for it costs the server a 4 MiB read and send.
    const big = Buffer.alloc(8 << 20, 7);
    fs.writeFileSync(path.join(offeredRoot, 'set', 'big.bin'), big);
    const { endpoint, run } = await launchForSecondMachine(root, { offerFiles: { root: offeredRoot, names: ['set/f.bin', 'set/big.bin'] }, joinTimeoutMs: 20_000 });

    const c = new ControlClient(endpoint, { timeoutMs: 10_000, who: 'local rank 0 on host host-b' });
    try {
      await c.send('hello', { host: 'host-b', pid: process.pid, localRank: 0, localWorldSize: 1, requestedRank: -1, dataEndpoints: ['tcp://127.0.0.1:1'], curvePublicKey: '' });
      const w = await next(c, 'the Welcome');
      expect(w.kind).toBe('welcome');
      c.runId = w.runId;
      const offered = (w.body as { offeredFiles?: unknown }).offeredFiles;
      const sha256 = createHash('sha256').update(content).digest('hex');
      expect(offered).toEqual([{ name: 'set/f.bin', size: content.length, sha256 }, { name: 'set/big.bin', size: big.length, sha256: createHash('sha256').update(big).digest('hex') }]);

      // Not offered: refused by name, and no byte of the file it would reach comes back.
      for (const name of ['../secret.txt', 'set/../../secret.txt', path.join(root, 'secret.txt'), 'set/other.bin']) {
        expect(await request(c, name, 0), name).toEqual({ error: `this coordinator does not offer '${name}'` });
      }
      expect(await request(c, 'set/f.bin', content.length + 1)).toEqual({ error: `offset ${content.length + 1} is beyond the ${content.length} bytes of set/f.bin` });

      // Offered: from any offset up to its end, never more than its size.
      expect(await request(c, 'set/f.bin', 4)).toEqual({ chunk: { name: 'set/f.bin', offset: 4, totalSize: content.length, sha256, bytes: content.subarray(4) } });
      expect((await request(c, 'set/f.bin', content.length)).chunk?.bytes.length).toBe(0);

      // 20 requests back to back: one in flight per peer, the others refused (each would make the
      // server read and queue 4 MiB); whatever is served is right.
      for (let i = 0; i < 20; i++) await c.send('fileRequest', { name: 'set/big.bin', offset: i });
      const answers: ControlMessage[] = [];
      while (answers.length < 20) answers.push(await next(c, 'an answer of the 20'));
      const refused = answers.filter((m) => m.kind === 'error').map((m) => (m.body as { message?: string }).message);
      expect(refused.length).toBeGreaterThan(0);
      for (const why of refused) expect(why).toMatch(/^one file request at a time: 'set\/big\.bin' at \d+ came before the chunk of the previous one was sent$/);
      for (const m of answers.filter((x) => x.kind !== 'error')) {
        expect(m.kind).toBe('fileChunk');
        const offset = num((m.body as { offset?: unknown }).offset);
        expect(m.payload[0].equals(big.subarray(offset, offset + (4 << 20)))).toBe(true);
      }

      await c.send('stepReport', { rank: 1, final: { rank: 1, host: 'host-b', stateSha256: 'same' } });
      expect((await next(c, 'the acknowledgement')).kind).toBe('command');
    } finally {
      await c.close();
    }
    const r = await run;
    expect(r.hosts).toEqual(['fakehost', 'host-b']);
  });
});
