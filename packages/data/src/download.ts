import { createHash, randomBytes } from 'node:crypto';
import { createWriteStream } from 'node:fs';
import fs from 'node:fs/promises';
import http from 'node:http';
import https from 'node:https';
import path from 'node:path';
import { Transform } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { fileURLToPath } from 'node:url';
import * as tar from 'tar';
import { CIFAR10_ALL_FILES, CIFAR10_DIRNAME, hasCifar10 } from './cifar10.js';
import { ChecksumMismatchError, DataFormatError, DownloadError } from './errors.js';

export const CIFAR10_URL = 'https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz';
export const CIFAR10_MD5 = 'c32a1d4ab5d03f1284b67883e8d87530';

/** Temporary files and folders in the data directory start with this; nothing else there does. */
const TMP_PREFIX = '.dtrain-tmp-';

export interface DownloadProgress {
  phase: 'download' | 'verify' | 'extract' | 'done';
  receivedBytes: number;
  /** From Content-Length; undefined when the server does not say. */
  totalBytes?: number;
}

export interface DownloadCifar10Options {
  /** The data directory; the files end up in `<dir>/cifar-10-batches-bin/`. */
  dir: string;
  onProgress?: (p: DownloadProgress) => void;
  /** Injectable for tests (a local server); defaults to the official URL. */
  url?: string;
  /** Expected MD5 of the archive, lower-case hex. */
  md5?: string;
  /** Give up when no byte arrives (connect, headers or body) for this long. Default 30 s. */
  idleTimeoutMs?: number;
  /** Download again even when the files are already there. */
  force?: boolean;
  signal?: AbortSignal;
}

export interface DownloadResult {
  /** `<dir>/cifar-10-batches-bin`. */
  path: string;
  /** True when the files were already there and nothing was downloaded. */
  skipped: boolean;
  bytes: number;
}

function manualHint(url: string, md5: string, dir: string): string {
  const unpack = (archive: string) => `run 'tar xzf ${archive} -C ${dir}' so that ${path.join(dir, CIFAR10_DIRNAME, 'data_batch_1.bin')} exists`;
  const local = localArchive(url);
  if (local !== undefined) return `Only http:// and https:// addresses are downloaded; to use the archive ${local}: check that its MD5 is ${md5} and ${unpack(local)}`;
  return `To place the files by hand: download ${url} on a machine with internet, check that its MD5 is ${md5}, copy it to this machine and ${unpack('cifar-10-binary.tar.gz')}`;
}

/** An archive already on this machine given as the URL (a file: URL or a path): its path. */
function localArchive(url: string): string | undefined {
  if (/^file:/i.test(url)) {
    try {
      return fileURLToPath(url);
    } catch {
      return undefined;
    }
  }
  // Any other scheme (http:, ftp:) names a server, not a file here.
  return /^[a-z][a-z0-9+.-]*:/i.test(url) ? undefined : path.resolve(url);
}

/**
 * Downloads the CIFAR-10 binary archive into a temporary file next to its destination, verifies its
 * MD5, unpacks it into a temporary folder, checks the expected files are there and renames the folder
 * into place. Whatever happens, `<dir>/cifar-10-batches-bin` is either the complete old one or the
 * complete new one; temporaries are removed on failure, and ones left by a killed process are removed
 * by the next call.
 */
export async function downloadCifar10(options: DownloadCifar10Options): Promise<DownloadResult> {
  const url = options.url ?? CIFAR10_URL;
  const md5 = (options.md5 ?? CIFAR10_MD5).toLowerCase();
  const dir = path.resolve(options.dir);
  const idleMs = options.idleTimeoutMs ?? 30_000;
  const report = options.onProgress ?? (() => {});
  const target = path.join(dir, CIFAR10_DIRNAME);
  const hint = manualHint(url, md5, dir);

  if (!options.force && (await hasCifar10(dir))) {
    report({ phase: 'done', receivedBytes: 0 });
    return { path: target, skipped: true, bytes: 0 };
  }
  await fs.mkdir(dir, { recursive: true });
  await removeStaleTemporaries(dir);

  const tag = `${TMP_PREFIX}${process.pid}-${randomBytes(4).toString('hex')}`;
  const archive = path.join(dir, `${tag}-cifar-10-binary.tar.gz`);
  const unpackDir = path.join(dir, `${tag}-unpack`);
  const oldDir = path.join(dir, `${tag}-old`);
  try {
    const { bytes, digest } = await fetchToFile(url, archive, { idleMs, signal: options.signal, hint, report });
    report({ phase: 'verify', receivedBytes: bytes, totalBytes: bytes });
    if (digest !== md5) throw new ChecksumMismatchError(url, md5, digest, hint);

    report({ phase: 'extract', receivedBytes: bytes, totalBytes: bytes });
    await fs.mkdir(unpackDir);
    try {
      await tar.x({ file: archive, cwd: unpackDir, strict: true });
    } catch (err) {
      throw new DataFormatError(archive, `cannot unpack the archive from ${url} (${(err as Error).message})`, hint);
    }
    const unpacked = path.join(unpackDir, CIFAR10_DIRNAME);
    for (const f of CIFAR10_ALL_FILES) {
      try {
        await fs.access(path.join(unpacked, f));
      } catch {
        throw new DataFormatError(archive, `the archive from ${url} has no ${CIFAR10_DIRNAME}/${f}`, hint);
      }
    }
    options.signal?.throwIfAborted();
    // rename() cannot replace a non-empty folder: move the old one aside first, then drop it.
    let movedOld = false;
    try {
      await fs.rename(target, oldDir);
      movedOld = true;
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw err;
    }
    await fs.rename(unpacked, target);
    if (movedOld) await fs.rm(oldDir, { recursive: true, force: true });
    report({ phase: 'done', receivedBytes: bytes, totalBytes: bytes });
    return { path: target, skipped: false, bytes };
  } finally {
    await fs.rm(archive, { force: true });
    await fs.rm(unpackDir, { recursive: true, force: true });
  }
}

/** Removes temporaries whose process is gone (a download killed half-way). */
async function removeStaleTemporaries(dir: string): Promise<void> {
  for (const name of await fs.readdir(dir)) {
    if (!name.startsWith(TMP_PREFIX)) continue;
    const pid = Number(name.slice(TMP_PREFIX.length).split('-')[0]);
    // Ours (a concurrent call) or a live process's: not stale.
    if (pid === process.pid || (Number.isInteger(pid) && pid > 0 && isAlive(pid))) continue;
    await fs.rm(path.join(dir, name), { recursive: true, force: true });
  }
}

function isAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EPERM';
  }
}

interface FetchOptions {
  idleMs: number;
  signal?: AbortSignal;
  hint: string;
  report: (p: DownloadProgress) => void;
}

async function fetchToFile(url: string, file: string, o: FetchOptions): Promise<{ bytes: number; digest: string }> {
  let current = url;
  for (let redirects = 0; ; redirects++) {
    const res = await get(current, url, o);
    const status = res.statusCode ?? 0;
    if (status >= 300 && status < 400 && res.headers.location) {
      res.resume();
      if (redirects >= 5) throw new DownloadError(url, 'too many redirects', o.hint);
      current = new URL(res.headers.location, current).toString();
      continue;
    }
    if (status !== 200) {
      res.resume();
      throw new DownloadError(url, `the server answered HTTP ${status}${current !== url ? ` (at ${current})` : ''}`, o.hint);
    }
    const lengthHeader = Number(res.headers['content-length']);
    const totalBytes = Number.isFinite(lengthHeader) && lengthHeader > 0 ? lengthHeader : undefined;
    const hash = createHash('md5');
    let bytes = 0;
    let timer: NodeJS.Timeout | undefined;
    const arm = () => {
      clearTimeout(timer);
      timer = setTimeout(() => res.destroy(new TimeoutError(o.idleMs)), o.idleMs);
    };
    const onAbort = () => res.destroy(o.signal?.reason instanceof Error ? o.signal.reason : new Error('aborted'));
    o.signal?.addEventListener('abort', onAbort, { once: true });
    arm();
    const meter = new Transform({
      transform(chunk: Buffer, _enc, done) {
        arm();
        hash.update(chunk);
        bytes += chunk.length;
        o.report({ phase: 'download', receivedBytes: bytes, totalBytes });
        done(null, chunk);
      },
    });
    try {
      await pipeline(res, meter, createWriteStream(file, { flags: 'wx' }));
    } catch (err) {
      if (o.signal?.aborted) throw o.signal.reason ?? err;
      throw new DownloadError(url, `the transfer failed after ${bytes} bytes (${describe(err)})`, o.hint, { cause: err });
    } finally {
      clearTimeout(timer);
      o.signal?.removeEventListener('abort', onAbort);
    }
    if (totalBytes !== undefined && bytes !== totalBytes) {
      throw new DownloadError(url, `the server closed the connection after ${bytes} of ${totalBytes} bytes`, o.hint);
    }
    return { bytes, digest: hash.digest('hex') };
  }
}

class TimeoutError extends Error {
  constructor(ms: number) {
    super(`no data for ${ms} ms`);
  }
}

function describe(err: unknown): string {
  const e = err as NodeJS.ErrnoException;
  return e?.code ? `${e.code}: ${e.message}` : String(e?.message ?? err);
}

/** One GET with a timeout covering DNS, connect and the response headers. */
function get(current: string, original: string, o: FetchOptions): Promise<http.IncomingMessage> {
  o.signal?.throwIfAborted();
  return new Promise((resolve, reject) => {
    let parsed: URL;
    try {
      parsed = new URL(current);
    } catch {
      reject(new DownloadError(original, `'${current}' is not a valid URL`, o.hint));
      return;
    }
    const lib = parsed.protocol === 'https:' ? https : parsed.protocol === 'http:' ? http : undefined;
    if (!lib) {
      reject(new DownloadError(original, `unsupported protocol ${parsed.protocol}`, o.hint));
      return;
    }
    const req = lib.get(parsed, { headers: { 'user-agent': 'dtrain' } });
    const timer = setTimeout(() => req.destroy(new TimeoutError(o.idleMs)), o.idleMs);
    const onAbort = () => req.destroy(new Error('aborted'));
    o.signal?.addEventListener('abort', onAbort, { once: true });
    const done = () => {
      clearTimeout(timer);
      o.signal?.removeEventListener('abort', onAbort);
    };
    req.on('response', (res) => {
      done();
      resolve(res);
    });
    req.on('error', (err) => {
      done();
      if (o.signal?.aborted) {
        reject(o.signal.reason ?? err);
        return;
      }
      const offline = ['ENOTFOUND', 'EAI_AGAIN', 'ECONNREFUSED', 'ENETUNREACH', 'EHOSTUNREACH'].includes(
        (err as NodeJS.ErrnoException).code ?? '',
      );
      const detail = offline
        ? `${describe(err)} (is this machine offline, or is the host blocked?)`
        : err instanceof TimeoutError
          ? `${err.message} while connecting (is this machine offline, or is the host blocked?)`
          : describe(err);
      reject(new DownloadError(original, detail, o.hint, { cause: err }));
    });
  });
}
