// The shared-memory segments behind same-host links: what a receiver checks before it maps a
// peer's file, that both mappings see the same bytes, and that nothing is left behind.
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { sharedMemoryUnavailable, ShmSegment, shmDir } from './shm.js';

let dir: string;
const saved = process.env.DTRAIN_SHM_DIR;
beforeEach(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'shm-test-'));
  process.env.DTRAIN_SHM_DIR = dir;
});
afterEach(() => {
  if (saved === undefined) delete process.env.DTRAIN_SHM_DIR;
  else process.env.DTRAIN_SHM_DIR = saved;
  fs.rmSync(dir, { recursive: true, force: true });
});

describe('shared-memory segments', () => {
  it('are available on this machine (the native module was built by pnpm install)', () => {
    expect(sharedMemoryUnavailable()).toBeUndefined();
    expect(shmDir()).toBe(dir);
  });

  it('the opener sees what the creator writes, in place, also after the file is unlinked', () => {
    const out = ShmSegment.create(3, 1024, '0g1');
    expect(path.dirname(out.path)).toBe(dir);
    expect(fs.statSync(out.path).size).toBe(ShmSegment.bytes(3, 1024));
    expect(fs.statSync(out.path).mode & 0o777).toBe(0o600);
    const inn = ShmSegment.open(out.path, out.token, 3, 1024);
    out.unlink();
    expect(fs.existsSync(out.path)).toBe(false);
    const w = new Float32Array(out.slot(2, 1024).buffer, out.slot(2, 1024).byteOffset, 256);
    for (let i = 0; i < w.length; i++) w[i] = i * 0.5 - 3;
    const r = inn.slot(2, 1024);
    expect(Array.from(new Float32Array(r.buffer, r.byteOffset, 256))).toEqual(Array.from(w));
    expect(inn.slot(1, 1024).every((b) => b === 0)).toBe(true);
  });

  it('a receiver refuses an offer that is not exactly what it claims, saying why', () => {
    const seg = ShmSegment.create(2, 256, '1g0');
    const other = Buffer.from(seg.token);
    other[0] ^= 1;
    expect(() => ShmSegment.open(seg.path, other, 2, 256)).toThrow(/does not hold the announced token/);
    expect(() => ShmSegment.open(seg.path, seg.token, 3, 256)).toThrow(/has \d+ bytes, not the \d+ announced/);
    expect(() => ShmSegment.open(seg.path, seg.token, 2, 255)).toThrow(/bad slot size/);
    expect(() => ShmSegment.open(seg.path, seg.token, 5000, 256)).toThrow(/bad slot count/);
    expect(() => ShmSegment.open(seg.path, seg.token.subarray(0, 8), 2, 256)).toThrow(/bad token/);
    // Only files named dtrain-* directly in our own shared-memory directory.
    expect(() => ShmSegment.open('/etc/passwd', seg.token, 2, 256)).toThrow(/not a dtrain segment/);
    const renamed = path.join(dir, 'other-name');
    fs.copyFileSync(seg.path, renamed);
    expect(() => ShmSegment.open(renamed, seg.token, 2, 256)).toThrow(/not a dtrain segment/);
    // A symbolic link is not followed, even to a genuine segment.
    const link = path.join(dir, `dtrain-${process.pid}-link`);
    fs.symlinkSync(seg.path, link);
    expect(() => ShmSegment.open(link, seg.token, 2, 256)).toThrow(/ELOOP|symbolic link/);
    // The genuine offer still opens.
    expect(ShmSegment.open(seg.path, seg.token, 2, 256).slots).toBe(2);
    seg.unlink();
  });

  it('segments left by dead processes are removed when a new one is created; live ones stay', () => {
    // A process that has exited (spawnSync waits for it), by the pid the system gave it.
    const deadPid = spawnSync(process.execPath, ['-e', ''], { stdio: 'ignore' }).pid;
    expect(Number.isInteger(deadPid) && deadPid > 0).toBe(true);
    expect(() => process.kill(deadPid, 0)).toThrow(/ESRCH/);
    const stale = path.join(dir, `dtrain-${deadPid}-0g0-aaaaaaaaaaaa`);
    const live = path.join(dir, `dtrain-${process.ppid}-0g0-bbbbbbbbbbbb`);
    const unrelated = path.join(dir, 'notes.txt');
    for (const f of [stale, live, unrelated]) fs.writeFileSync(f, 'x');
    const seg = ShmSegment.create(1, 64, '2g0');
    expect(fs.existsSync(stale)).toBe(false);
    expect(fs.existsSync(live)).toBe(true);
    expect(fs.existsSync(unrelated)).toBe(true);
    seg.unlink();
  });

  it('DTRAIN_SHM=0 turns shared memory off, and a missing directory is named', () => {
    process.env.DTRAIN_SHM = '0';
    try {
      expect(sharedMemoryUnavailable()).toMatch(/DTRAIN_SHM=0/);
    } finally {
      delete process.env.DTRAIN_SHM;
    }
    process.env.DTRAIN_SHM_DIR = path.join(dir, 'absent');
    expect(sharedMemoryUnavailable()).toMatch(/absent does not exist/);
  });
});
