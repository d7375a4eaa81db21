// Data set files sent from the coordinator to a worker of another machine that lacks them
// (FileRequest/FileChunk on the control socket): real coordinator, real `join`, real worker
// processes on 127.0.0.1 (two host names), a small generated file set in the CIFAR-10 binary
// layout (full CIFAR-10 is 170 MB and not on CI machines). The workers train on synthetic data
// afterwards (12x12, one step) so each run costs seconds.
import { createHash } from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { describe, expect, it, type TestContext } from 'vitest';
import { join, launch, WorkerFailedError } from '@dtrain/coordinator';
import { CIFAR10_DIRNAME, CIFAR10_META_FILE, CIFAR10_RECORD_BYTES, CIFAR10_TEST_FILES, CIFAR10_TRAIN_FILES, readCifar10Batch, readCifar10ClassNames } from '@dtrain/data';
import { WORKER_ENTRY, type DistributedConfig } from '@dtrain/worker';
import { killWorkersAtEnd, testTimeoutFor } from './testing/processes.js';

const tmp = () => fs.mkdtempSync(path.join(os.tmpdir(), 'dtrain-xfer-'));
const RECORDS = 20;
const NAMES = [...CIFAR10_TRAIN_FILES, ...CIFAR10_TEST_FILES, CIFAR10_META_FILE].map((f) => `${CIFAR10_DIRNAME}/${f}`);
const sha = (f: string) => createHash('sha256').update(fs.readFileSync(f)).digest('hex');

/** CIFAR-10's binary layout with RECORDS records per batch file (label byte, then 3x1024 planes). */
function makeCifarLike(dataDir: string): void {
  const dir = path.join(dataDir, CIFAR10_DIRNAME);
  fs.mkdirSync(dir, { recursive: true });
  let seed = 7;
  const next = () => ((seed = (seed * 1103515245 + 12345) >>> 0) >>> 16) & 0xff;
  for (const f of [...CIFAR10_TRAIN_FILES, ...CIFAR10_TEST_FILES]) {
    const buf = Buffer.alloc(RECORDS * CIFAR10_RECORD_BYTES);
    for (let r = 0; r < RECORDS; r++) {
      buf[r * CIFAR10_RECORD_BYTES] = r % 10;
      for (let i = 1; i < CIFAR10_RECORD_BYTES; i++) buf[r * CIFAR10_RECORD_BYTES + i] = next();
    }
    fs.writeFileSync(path.join(dir, f), buf);
  }
  fs.writeFileSync(path.join(dir, CIFAR10_META_FILE), 'airplane\nautomobile\nbird\ncat\ndeer\ndog\nfrog\nhorse\nship\ntruck\n');
}

/**
 * One run: coordinator (host-a, 1 worker) and a join (host-b, 1 worker) caching into `cache`, both in
 * this process; their workers are killed when the test ends.
 */
async function run(ctx: TestContext, source: string, cache: string, onOffered?: () => void) {
  const spawned = killWorkersAtEnd(ctx);
  const runDir = tmp();
  const logDir = path.join(tmp(), 'b');
  const config: DistributedConfig = { settings: { batchSize: 8, epochs: 1 }, out: path.join(runDir, 'run'), synthetic: { train: 16, test: 8, size: 12 } };
  let endpoint = '';
  let listening!: () => void;
  const ready = new Promise<void>((r) => (listening = r));
  const coordinator = launch({
    workers: 1,
    nodes: 2,
    entry: WORKER_ENTRY,
    runDir,
    config,
    listen: '127.0.0.1',
    insecure: true,
    env: { DTRAIN_HOST: 'host-a' },
    offerFiles: { root: source, names: NAMES },
    joinTimeoutMs: 60_000,
    timeoutMs: 60_000,
    onEvent: (e) => {
      spawned(e);
      if (e.kind === 'offered') onOffered?.();
      if (e.kind === 'listening') {
        endpoint = e.endpoint;
        listening();
      }
    },
  });
  coordinator.catch(() => undefined);
  await ready;
  const port = Number(endpoint.slice(endpoint.lastIndexOf(':') + 1));
  const joined = join({ masterAddr: '127.0.0.1', masterPort: port, workers: 1, entry: WORKER_ENTRY, host: 'host-b', advertise: '127.0.0.1', logDir, dataDir: cache, joinTimeoutMs: 60_000, timeoutMs: 60_000, insecure: true, onEvent: spawned });
  const [c, j] = await Promise.allSettled([coordinator, joined]);
  return { c, j, log: fs.readFileSync(path.join(logDir, 'local-0.log'), 'utf8') };
}

describe('a worker on another machine receives the data set from the coordinator', () => {
  const source = tmp();
  makeCifarLike(source);
  const cache = tmp();

  it('missing files are sent, sha256-verified, cached in its data dir and readable; a damaged cached file is sent again, the rest kept', async (ctx) => {
    const first = await run(ctx, source, cache);
    expect(first.c.status, String((first.c as PromiseRejectedResult).reason)).toBe('fulfilled');
    expect(first.j.status).toBe('fulfilled');
    for (const name of NAMES) expect(sha(path.join(cache, name)), name).toBe(sha(path.join(source, name)));
    expect(first.log).toMatch(/received cifar-10-batches-bin\/data_batch_1\.bin from the coordinator \(0\.1 MB in [\d.]+ s, sha256 verified\)/);
    expect(first.log).toMatch(/data files in .*: 0 cached, 7 received from the coordinator/);
    // What arrived is a CIFAR-10 batch the data package reads.
    const b = await readCifar10Batch(path.join(cache, CIFAR10_DIRNAME, 'test_batch.bin'), { recordsPerFile: RECORDS });
    expect(Array.from(b.labels.slice(0, 12))).toEqual([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]);
    expect(await readCifar10ClassNames(path.join(cache, CIFAR10_DIRNAME, CIFAR10_META_FILE))).toHaveLength(10);
    expect(fs.readdirSync(path.join(cache, CIFAR10_DIRNAME)).filter((f) => f.includes('.tmp-'))).toEqual([]);

    // A damaged cached file (same size) is noticed by its checksum and sent again; the rest is kept.
    const damaged = path.join(cache, CIFAR10_DIRNAME, 'data_batch_3.bin');
    const bytes = fs.readFileSync(damaged);
    bytes[100] ^= 0xff;
    fs.writeFileSync(damaged, bytes);
    const second = await run(ctx, source, cache);
    expect(second.c.status).toBe('fulfilled');
    expect(second.log).toMatch(/data files in .*: 6 cached, 1 received from the coordinator/);
    expect(second.log).toContain('received cifar-10-batches-bin/data_batch_3.bin');
    expect(sha(damaged)).toBe(sha(path.join(source, CIFAR10_DIRNAME, 'data_batch_3.bin')));
  }, testTimeoutFor(2));

  it('bytes that do not match the checksum are discarded and the run fails naming the file', async (ctx) => {
    const src = tmp();
    makeCifarLike(src);
    const fresh = tmp();
    // The file changes after the coordinator hashed it: what the worker receives cannot match.
    const r = await run(ctx, src, fresh, () => {
      const f = path.join(src, CIFAR10_DIRNAME, 'data_batch_1.bin');
      const bytes = fs.readFileSync(f);
      bytes[5] ^= 1;
      fs.writeFileSync(f, bytes);
    });
    expect(r.c.status).toBe('rejected');
    const err = (r.c as PromiseRejectedResult).reason as WorkerFailedError;
    expect(err).toBeInstanceOf(WorkerFailedError);
    expect(err.message).toMatch(/rank 1 on host host-b .*cifar-10-batches-bin\/data_batch_1\.bin arrived with sha256 [0-9a-f]{64}, the coordinator's file has [0-9a-f]{64}: the copy was discarded/s);
    expect(r.j.status).toBe('rejected');
    expect(fs.existsSync(path.join(fresh, CIFAR10_DIRNAME, 'data_batch_1.bin'))).toBe(false);
    expect(fs.readdirSync(path.join(fresh, CIFAR10_DIRNAME)).filter((f) => f.includes('.tmp-'))).toEqual([]);
  }, testTimeoutFor(1));
});
