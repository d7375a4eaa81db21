// Shared memory for the ring's same-host links (README "Same-host links").
//
// A piece sent over a socket costs its sender a copy into the kernel and its receiver a copy out,
// a fresh buffer per piece (which V8 frees only in full collections) and several thread wake-ups;
// on our 2-core machines that made the all-reduce CPU-bound. Between two processes of one host a
// link can instead be a file on a tmpfs (/dev/shm) that both map: the sender computes a piece
// straight into a slot of it and sends only the header over ZeroMQ; the receiver reads the slot
// in place and gives it back with a RingCredit. Node cannot map a file, so the mapping comes from
// a native module of one function (native/shm.c), built at install by node-gyp; where it is
// missing, or the directory is absent or full, links stay sockets and say why once.
import { randomBytes, timingSafeEqual } from 'node:crypto';
import fs from 'node:fs';
import { createRequire } from 'node:module';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

/** Bytes before the first slot: the magic and the token (a page, so slots stay aligned). */
export const SHM_HEADER_BYTES = 4096;
const MAGIC = Buffer.from('dtrain-shm-v1\0\0\0', 'latin1'); // 16 bytes
const TOKEN_BYTES = 16;
const NAME = /^dtrain-\d+-[A-Za-z0-9-]+$/;
/** Bounds a peer's offer must respect (a hostile offer cannot make us map gigabytes). */
export const SHM_MAX_SLOTS = 1024;
const MAX_SEGMENT_BYTES = 1 << 30;

interface Addon {
  map(fd: number, length: number, writable: boolean): ArrayBuffer;
}

let addon: Addon | undefined;
let addonError: string | undefined;
let addonTried = false;

function loadAddon(): Addon | undefined {
  if (!addonTried) {
    addonTried = true;
    const file = path.join(path.dirname(fileURLToPath(import.meta.url)), '..', 'native', 'build', 'Release', 'dtrain_shm.node');
    try {
      addon = createRequire(import.meta.url)(file) as Addon;
    } catch (e) {
      addonError = `${file} did not load: ${(e as Error).message.split('\n')[0]}`;
    }
  }
  return addon;
}

/** Where segments are created: $DTRAIN_SHM_DIR, else /dev/shm. */
export function shmDir(): string {
  return path.resolve(process.env.DTRAIN_SHM_DIR || '/dev/shm');
}

/**
 * Why this process cannot use shared-memory links, or undefined when it can. DTRAIN_SHM=0
 * turns them off (every link is then a socket, as before they existed).
 */
export function sharedMemoryUnavailable(): string | undefined {
  if (process.env.DTRAIN_SHM === '0') return 'turned off by DTRAIN_SHM=0';
  if (loadAddon() === undefined) {
    return `the native module is missing (${addonError}); \`pnpm install\` builds it (node-gyp, a C compiler and Python are needed)`;
  }
  const dir = shmDir();
  try {
    if (!fs.statSync(dir).isDirectory()) return `${dir} is not a directory`;
  } catch {
    return `${dir} does not exist (set DTRAIN_SHM_DIR to a tmpfs directory)`;
  }
  return undefined;
}

/** A shared file of `slots` slots of `slotBytes`, mapped into this process. */
export class ShmSegment {
  private unlinked: boolean;

  private constructor(
    readonly path: string,
    readonly token: Buffer,
    readonly slots: number,
    readonly slotBytes: number,
    private readonly memory: ArrayBuffer,
    owned: boolean,
  ) {
    this.unlinked = !owned;
  }

  /** File size of a segment of this layout. */
  static bytes(slots: number, slotBytes: number): number {
    return SHM_HEADER_BYTES + slots * slotBytes;
  }

  /**
   * Creates, fills and maps a new segment (the sending side of a link). Every page is written
   * once here, so a full tmpfs fails now with ENOSPC instead of killing the process with SIGBUS
   * at its first write through the mapping. `tag` goes into the file name (rank, generation).
   */
  static create(slots: number, slotBytes: number, tag: string): ShmSegment {
    const native = loadAddon();
    if (native === undefined) throw new Error(addonError ?? 'native module missing');
    const dir = shmDir();
    removeStale(dir);
    const size = ShmSegment.bytes(slots, slotBytes);
    const file = path.join(dir, `dtrain-${process.pid}-${tag.replace(/[^A-Za-z0-9]/g, '')}-${randomBytes(6).toString('hex')}`);
    const { O_RDWR, O_CREAT, O_EXCL } = fs.constants;
    const fd = fs.openSync(file, O_RDWR | O_CREAT | O_EXCL, 0o600);
    try {
      const zeros = Buffer.alloc(Math.min(size, 1 << 20));
      for (let o = 0; o < size; o += zeros.length) fs.writeSync(fd, zeros, 0, Math.min(zeros.length, size - o), o);
      const token = randomBytes(TOKEN_BYTES);
      fs.writeSync(fd, Buffer.concat([MAGIC, token]), 0, MAGIC.length + TOKEN_BYTES, 0);
      const memory = native.map(fd, size, true);
      return new ShmSegment(file, token, slots, slotBytes, memory, true);
    } catch (e) {
      fs.rmSync(file, { force: true });
      throw e;
    } finally {
      fs.closeSync(fd);
    }
  }

  /**
   * Maps a peer's segment read-only (the receiving side), after checking everything the offer
   * claims: a regular file named dtrain-* directly in our own shared-memory directory, owned by
   * this user, of exactly the layout's size, starting with the magic and `token`. Throws an
   * Error saying which check failed.
   */
  static open(file: string, token: Uint8Array, slots: number, slotBytes: number): ShmSegment {
    const native = loadAddon();
    if (native === undefined) throw new Error(addonError ?? 'native module missing');
    if (!Number.isInteger(slots) || slots < 1 || slots > SHM_MAX_SLOTS) throw new Error(`bad slot count ${slots}`);
    if (!Number.isInteger(slotBytes) || slotBytes < 64 || slotBytes % 4 !== 0) throw new Error(`bad slot size ${slotBytes}`);
    const size = ShmSegment.bytes(slots, slotBytes);
    if (size > MAX_SEGMENT_BYTES) throw new Error(`segment of ${size} bytes is larger than ${MAX_SEGMENT_BYTES}`);
    if (token.length !== TOKEN_BYTES) throw new Error('bad token');
    if (path.dirname(file) !== shmDir() || !NAME.test(path.basename(file))) {
      throw new Error(`${file} is not a dtrain segment in ${shmDir()}`);
    }
    const fd = fs.openSync(file, fs.constants.O_RDONLY | fs.constants.O_NOFOLLOW);
    try {
      const st = fs.fstatSync(fd);
      if (!st.isFile()) throw new Error(`${file} is not a regular file`);
      if (process.getuid !== undefined && st.uid !== process.getuid()) throw new Error(`${file} belongs to another user`);
      if (st.size !== size) throw new Error(`${file} has ${st.size} bytes, not the ${size} announced`);
      const head = Buffer.alloc(MAGIC.length + TOKEN_BYTES);
      fs.readSync(fd, head, 0, head.length, 0);
      if (!head.subarray(0, MAGIC.length).equals(MAGIC) || !timingSafeEqual(head.subarray(MAGIC.length), token)) {
        throw new Error(`${file} does not hold the announced token (another machine's file of the same name?)`);
      }
      return new ShmSegment(file, Buffer.from(token), slots, slotBytes, native.map(fd, size, false), false);
    } finally {
      fs.closeSync(fd);
    }
  }

  /** The first `bytes` of slot `i`, as a Buffer over the shared pages (no copy). */
  slot(i: number, bytes: number): Buffer {
    return Buffer.from(this.memory, SHM_HEADER_BYTES + i * this.slotBytes, bytes);
  }

  /**
   * Removes the file (the creator's job, once the peer has mapped it or will not): the mappings
   * stay valid, and nothing is left behind if either process dies later. The pages are freed
   * when both mappings are gone (they are unmapped when the memory is garbage-collected).
   */
  unlink(): void {
    if (this.unlinked) return;
    this.unlinked = true;
    fs.rmSync(this.path, { force: true });
  }
}

/**
 * Removes segments left by dead processes of this user (a process killed between creating a
 * segment and its peer mapping it): dtrain-<pid>-* whose pid no longer runs.
 */
function removeStale(dir: string): void {
  let names: string[];
  try {
    names = fs.readdirSync(dir);
  } catch {
    return;
  }
  const uid = process.getuid?.();
  for (const name of names) {
    const m = /^dtrain-(\d+)-/.exec(name);
    if (m === null || Number(m[1]) === process.pid) continue;
    try {
      process.kill(Number(m[1]), 0);
      continue; // alive (or another user's process: EPERM below)
    } catch (e) {
      if ((e as { code?: string }).code !== 'ESRCH') continue;
    }
    try {
      const file = path.join(dir, name);
      if (uid === undefined || fs.lstatSync(file).uid === uid) fs.rmSync(file, { force: true });
    } catch {
      // raced with another cleaner: fine
    }
  }
}
