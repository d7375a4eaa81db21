import { createHash } from 'node:crypto';
import fs from 'node:fs/promises';
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import os from 'node:os';
import path from 'node:path';
import * as tar from 'tar';
import { afterAll, afterEach, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { CIFAR10_ALL_FILES, CIFAR10_DIRNAME } from './cifar10.js';
import { downloadCifar10, type DownloadProgress } from './download.js';
import { ChecksumMismatchError, DataFormatError, DownloadError } from './errors.js';

let work: string;
let archive: Buffer;
let archiveMd5: string;
let noDataArchive: Buffer;
let server: http.Server;
let base: string;
const sockets = new Set<import('node:net').Socket>();

const md5 = (b: Buffer) => createHash('md5').update(b).digest('hex');

async function makeArchive(files: readonly string[], tag: string): Promise<Buffer> {
  const src = await fs.mkdtemp(path.join(work, 'src-'));
  await fs.mkdir(path.join(src, CIFAR10_DIRNAME));
  for (const f of files) await fs.writeFile(path.join(src, CIFAR10_DIRNAME, f), `${tag}:${f}`);
  const file = path.join(src, 'a.tar.gz');
  await tar.c({ gzip: true, file, cwd: src }, [CIFAR10_DIRNAME]);
  return fs.readFile(file);
}

beforeAll(async () => {
  work = await fs.mkdtemp(path.join(os.tmpdir(), 'dtrain-dl-'));
  archive = await makeArchive(CIFAR10_ALL_FILES, 'new');
  archiveMd5 = md5(archive);
  noDataArchive = await makeArchive(['batches.meta.txt'], 'partial');
  server = http.createServer((req, res) => {
    switch (req.url) {
      case '/cifar.tar.gz':
        res.writeHead(200, { 'content-length': archive.length });
        // Two chunks, so progress is reported more than once.
        res.write(archive.subarray(0, 100));
        setTimeout(() => res.end(archive.subarray(100)), 20);
        return;
      case '/moved':
        res.writeHead(302, { location: '/cifar.tar.gz' });
        res.end();
        return;
      case '/partial.tar.gz':
        res.writeHead(200, { 'content-length': noDataArchive.length });
        res.end(noDataArchive);
        return;
      case '/not-a-tar':
        res.writeHead(200);
        res.end('hello, not gzip');
        return;
      case '/stall':
        res.writeHead(200, { 'content-length': archive.length });
        res.write(archive.subarray(0, 50)); // then nothing: the idle timeout must fire
        return;
      case '/no-headers':
        return; // accepts the connection, never answers
      case '/cut':
        res.writeHead(200, { 'content-length': archive.length });
        res.write(archive.subarray(0, 50), () => res.socket?.destroy());
        return;
      default:
        res.writeHead(404);
        res.end();
    }
  });
  server.on('connection', (s) => {
    sockets.add(s);
    s.on('close', () => sockets.delete(s));
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  base = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
});

afterAll(async () => {
  for (const s of sockets) s.destroy();
  await new Promise((r) => server.close(r));
  await fs.rm(work, { recursive: true, force: true });
});

let dir: string;
beforeEach(async () => {
  dir = await fs.mkdtemp(path.join(work, 'data-'));
});
afterEach(async () => {
  await fs.rm(dir, { recursive: true, force: true });
});

async function leftovers(): Promise<string[]> {
  return (await fs.readdir(dir)).sort();
}

describe('downloadCifar10', () => {
  it('downloads, verifies, unpacks and renames into place, reporting progress', async () => {
    const seen: DownloadProgress[] = [];
    const res = await downloadCifar10({ dir, url: `${base}/cifar.tar.gz`, md5: archiveMd5, onProgress: (p) => seen.push({ ...p }) });
    expect(res).toEqual({ path: path.join(dir, CIFAR10_DIRNAME), skipped: false, bytes: archive.length });
    for (const f of CIFAR10_ALL_FILES) expect(await fs.readFile(path.join(res.path, f), 'utf8')).toBe(`new:${f}`);
    expect(await leftovers()).toEqual([CIFAR10_DIRNAME]);
    const downloads = seen.filter((p) => p.phase === 'download');
    expect(downloads.length).toBeGreaterThanOrEqual(2);
    expect(downloads.at(-1)).toEqual({ phase: 'download', receivedBytes: archive.length, totalBytes: archive.length });
    expect(seen.map((p) => p.phase).filter((p, i, a) => a.indexOf(p) === i)).toEqual(['download', 'verify', 'extract', 'done']);

    // Present now: nothing downloaded again unless forced.
    const again = await downloadCifar10({ dir, url: `${base}/does-not-exist`, md5: archiveMd5 });
    expect(again.skipped).toBe(true);
  });

  it('follows a redirect and replaces an existing incomplete copy when forced', async () => {
    await fs.mkdir(path.join(dir, CIFAR10_DIRNAME));
    await fs.writeFile(path.join(dir, CIFAR10_DIRNAME, 'data_batch_1.bin'), 'old');
    const res = await downloadCifar10({ dir, url: `${base}/moved`, md5: archiveMd5, force: true });
    expect(await fs.readFile(path.join(res.path, 'data_batch_1.bin'), 'utf8')).toBe('new:data_batch_1.bin');
    expect(await leftovers()).toEqual([CIFAR10_DIRNAME]);
  });

  it('deletes the download and keeps the old files on a checksum mismatch', async () => {
    await fs.mkdir(path.join(dir, CIFAR10_DIRNAME));
    await fs.writeFile(path.join(dir, CIFAR10_DIRNAME, 'keep'), 'old');
    const wrong = '0'.repeat(32);
    const err = await downloadCifar10({ dir, url: `${base}/cifar.tar.gz`, md5: wrong }).catch((e) => e);
    expect(err).toBeInstanceOf(ChecksumMismatchError);
    expect(err.code).toBe('DATA_CHECKSUM_MISMATCH');
    expect(err.message).toContain(`${base}/cifar.tar.gz has MD5 ${archiveMd5}, expected ${wrong}`);
    expect(await leftovers()).toEqual([CIFAR10_DIRNAME]);
    expect(await fs.readdir(path.join(dir, CIFAR10_DIRNAME))).toEqual(['keep']);
  });

  it('says the server is unreachable, names the URL and how to place the files by hand', async () => {
    const closed = http.createServer();
    await new Promise<void>((r) => closed.listen(0, '127.0.0.1', r));
    const port = (closed.address() as AddressInfo).port;
    await new Promise((r) => closed.close(r));
    const url = `http://127.0.0.1:${port}/cifar-10-binary.tar.gz`;
    const err = await downloadCifar10({ dir, url, md5: archiveMd5 }).catch((e) => e);
    expect(err).toBeInstanceOf(DownloadError);
    expect(err.code).toBe('DATA_DOWNLOAD_FAILED');
    expect(err.message).toContain(`could not download ${url}: ECONNREFUSED`);
    expect(err.message).toContain('offline');
    expect(err.message).toContain(`tar xzf cifar-10-binary.tar.gz -C ${dir}`);
    expect(await leftovers()).toEqual([]);
  });

  it('an archive already on this machine, given as a file: URL or a path: the message says how to unpack that file', async () => {
    const local = path.join(work, 'copied', 'cifar-10-binary.tar.gz');
    for (const url of [`file://${local}`, local]) {
      const err = await downloadCifar10({ dir, url, md5: archiveMd5 }).catch((e) => e);
      expect(err, url).toBeInstanceOf(DownloadError);
      expect(err.message, url).toMatch(url === local ? /is not a valid URL/ : /unsupported protocol file:/);
      expect(err.message, url).toContain(`to use the archive ${local}: check that its MD5 is ${archiveMd5} and run 'tar xzf ${local} -C ${dir}'`);
      expect(err.message, url).not.toContain('on a machine with internet');
    }
    expect(await leftovers()).toEqual([]);
  });

  it('times out when the server stops sending, or never answers, and leaves nothing behind', async () => {
    const t0 = Date.now();
    const stall = await downloadCifar10({ dir, url: `${base}/stall`, md5: archiveMd5, idleTimeoutMs: 300 }).catch((e) => e);
    expect(stall).toBeInstanceOf(DownloadError);
    expect(stall.message).toMatch(/transfer failed after 50 bytes \(no data for 300 ms\)/);
    const silent = await downloadCifar10({ dir, url: `${base}/no-headers`, md5: archiveMd5, idleTimeoutMs: 300 }).catch((e) => e);
    expect(silent).toBeInstanceOf(DownloadError);
    expect(silent.message).toContain('no data for 300 ms while connecting');
    expect(Date.now() - t0).toBeLessThan(5_000);
    expect(await leftovers()).toEqual([]);
  });

  it('reports a connection cut mid-transfer, an HTTP error, and archives that are not CIFAR-10', async () => {
    const cut = await downloadCifar10({ dir, url: `${base}/cut`, md5: archiveMd5 }).catch((e) => e);
    expect(cut).toBeInstanceOf(DownloadError);
    expect(cut.message).toMatch(/after 50 (of \d+ )?bytes/);
    await expect(downloadCifar10({ dir, url: `${base}/gone`, md5: archiveMd5 })).rejects.toThrow(/HTTP 404/);
    const partial = await downloadCifar10({ dir, url: `${base}/partial.tar.gz`, md5: md5(noDataArchive) }).catch((e) => e);
    expect(partial).toBeInstanceOf(DataFormatError);
    expect(partial.message).toContain(`has no ${CIFAR10_DIRNAME}/data_batch_1.bin`);
    const garbage = await downloadCifar10({ dir, url: `${base}/not-a-tar`, md5: md5(Buffer.from('hello, not gzip')) }).catch((e) => e);
    expect(garbage).toBeInstanceOf(DataFormatError);
    expect(await leftovers()).toEqual([]);
  });

  it('cleans temporaries left by a killed download, and stops when aborted', async () => {
    const stale = path.join(dir, '.dtrain-tmp-999999999-deadbeef-unpack');
    await fs.mkdir(stale);
    const ac = new AbortController();
    setTimeout(() => ac.abort(new Error('user pressed ^C')), 100);
    const err = await downloadCifar10({ dir, url: `${base}/stall`, md5: archiveMd5, signal: ac.signal }).catch((e) => e);
    expect(err.message).toBe('user pressed ^C');
    expect(await leftovers()).toEqual([]);
  });
});
