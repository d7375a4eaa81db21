// The receiving end of the data set transfer (dataset-fetch.ts) against a scripted coordinator: a
// real ControlServer on 127.0.0.1 that answers each FileRequest as the case says, and the real
// ControlClient. The two refusals a correct coordinator never provokes: a name that leaves the
// data directory, and a chunk with more bytes than the file was announced to hold.
import { createHash } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { ControlClient, ControlServer } from '@dtrain/transport';
import { checkOfferedFiles, DataTransferError, fetchOfferedFiles, type OfferedFile } from './dataset-fetch.js';
import { tempDir } from './testing/helpers.js';

const RUN = 'fetch-edges';
const CONTENT = Buffer.from('0123456789');
const OFFERED: OfferedFile = { name: 'set/f.bin', size: CONTENT.length, sha256: createHash('sha256').update(CONTENT).digest('hex') };

/** The bytes a scripted coordinator sends for a request at `offset` (its FileChunk says the offered name, size and hash). */
type Answer = (offset: number) => Buffer;

interface Scripted {
  client: ControlClient;
  requests: { name: string; offset: number }[];
}

const open: { server: ControlServer; client: ControlClient }[] = [];
afterEach(async () => {
  for (const { server, client } of open.splice(0)) {
    await client.close(0);
    await server.close();
  }
});

async function scriptedCoordinator(answer: Answer): Promise<Scripted> {
  const server = await ControlServer.bind({ runId: RUN, timeoutMs: 5000 });
  const requests: Scripted['requests'] = [];
  server.onMessage((e) => {
    if (e.message.kind !== 'fileRequest') return;
    const r = e.message.body as { name?: string; offset?: number | { toNumber(): number } };
    const offset = typeof r.offset === 'number' ? r.offset : (r.offset?.toNumber() ?? 0);
    requests.push({ name: r.name ?? '', offset });
    void server.send(e.peer, 'fileChunk', { name: r.name, offset, totalSize: OFFERED.size, sha256: OFFERED.sha256 }, [answer(offset)]);
  });
  const client = new ControlClient(server.endpoint, { runId: RUN, timeoutMs: 5000, who: 'rank 1 on host test-b' });
  open.push({ server, client });
  return { client, requests };
}

/** Files under `dir`, temporaries included (relative names). */
const filesIn = (dir: string) => fs.readdirSync(dir, { recursive: true, encoding: 'utf8' }).filter((f) => fs.statSync(path.join(dir, f)).isFile());

describe('fetchOfferedFiles: what a worker refuses from a coordinator', () => {
  it('a well-behaved coordinator: the file arrives in 4-byte chunks, verified (the harness the refusals below rely on)', async () => {
    const c = await scriptedCoordinator((offset) => CONTENT.subarray(offset, offset + 4));
    const dataDir = await tempDir();
    const got = await fetchOfferedFiles(c.client, [OFFERED], dataDir, { timeoutMs: 5000 });
    expect(got).toEqual({ fetched: ['set/f.bin'], cached: [] });
    expect(c.requests.map((r) => r.offset)).toEqual([0, 4, 8]);
    expect(fs.readFileSync(path.join(dataDir, 'set', 'f.bin'))).toEqual(CONTENT);
  });

  it.each([
    ['a parent folder', () => '../outside.bin'],
    ['a sibling folder whose name starts like the data directory', () => '../data-evil/f.bin'],
    ['a way back out from a sub-folder', () => 'set/../../outside.bin'],
    ['an absolute path', (root: string) => path.join(root, 'absolute.bin')],
  ])('a name that leaves the data directory (%s) is refused before anything is asked or written', async (_what, nameIn) => {
    const c = await scriptedCoordinator((offset) => CONTENT.subarray(offset));
    const root = await tempDir();
    const dataDir = path.join(root, 'data');
    fs.mkdirSync(dataDir);
    const name = nameIn(root);
    const err = await fetchOfferedFiles(c.client, [{ ...OFFERED, name }], dataDir, { timeoutMs: 5000 }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(DataTransferError);
    expect((err as DataTransferError).code).toBe('E_DATA_TRANSFER');
    expect((err as Error).message).toBe(`refusing offered file name '${name}': it leaves the data directory`);
    expect(c.requests).toEqual([]);
    expect(filesIn(root)).toEqual([]);
    expect(fs.existsSync(path.resolve(dataDir, name))).toBe(false);
  });

  it.each([
    ['the first chunk holds more bytes than the whole file', (offset: number) => Buffer.concat([CONTENT.subarray(offset), Buffer.from('extra')]), 0, 15],
    ['a later chunk runs past the announced size', (offset: number) => (offset === 0 ? CONTENT.subarray(0, 6) : Buffer.alloc(6, 0x41)), 6, 6],
    ['an empty chunk before the end (it would never finish)', (offset: number) => (offset === 0 ? CONTENT.subarray(0, 4) : Buffer.alloc(0)), 4, 0],
  ])('%s: refused naming the file and offset, nothing kept', async (_what, answer, offset, bytes) => {
    const c = await scriptedCoordinator(answer);
    const dataDir = await tempDir();
    const err = await fetchOfferedFiles(c.client, [OFFERED], dataDir, { timeoutMs: 5000 }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(DataTransferError);
    expect((err as Error).message).toBe(`set/f.bin: chunk at offset ${offset} of ${bytes} bytes does not fit the file size ${CONTENT.length}`);
    expect(c.requests.at(-1)).toEqual({ name: 'set/f.bin', offset });
    // Neither the file nor its temporary: the cache never holds a partial or unverified file.
    expect(filesIn(dataDir)).toEqual([]);
  }, 20_000);
});

describe('checkOfferedFiles: only the files of a data set, at sizes they can have', () => {
  const sha256 = OFFERED.sha256;
  it('accepts CIFAR-10 batches (whole records, at most 10,000) and its label names', () => {
    expect(() => checkOfferedFiles([
      { name: 'cifar-10-batches-bin/data_batch_1.bin', size: 30_730_000, sha256 },
      { name: 'cifar-10-batches-bin/test_batch.bin', size: 16 * 3073, sha256 },
      { name: 'cifar-10-batches-bin/batches.meta.txt', size: 61, sha256 },
    ])).not.toThrow();
  });

  it.each([
    ['a file no data set has', '.bashrc', 100, /^refusing offered file '\.bashrc': not a file of a data set this worker reads \(cifar-10-batches-bin\/data_batch_1\.bin, /],
    ['a batch larger than 10,000 records', 'cifar-10-batches-bin/data_batch_2.bin', 30_733_073, /^refusing offered file 'cifar-10-batches-bin\/data_batch_2\.bin' of 30733073 bytes: it holds at most 30730000 bytes in records of 3073$/],
    ['a batch of a partial record', 'cifar-10-batches-bin/data_batch_2.bin', 3074, /of 3074 bytes: it holds at most/],
    ['label names of 1 GB', 'cifar-10-batches-bin/batches.meta.txt', 1e9, /of 1000000000 bytes: it holds at most 4096 bytes$/],
  ])('refuses %s, naming it', (_what, name, size, says) => {
    expect(() => checkOfferedFiles([{ name, size, sha256 }])).toThrow(says);
  });
});
