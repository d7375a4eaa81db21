// Checkpoint file format (version 1), little-endian:
//
//   offset 0   8 bytes   magic "DTRNCKPT"
//          8   uint32    format version (1)
//         12   uint32    H = header length in bytes
//         16   H bytes   header, UTF-8 JSON (CheckpointHeader), then zero padding to a multiple of 8
//          ..  sections  raw float32 arrays, back to back, at the offsets the header lists
//   end - 32  32 bytes   SHA-256 of every byte before it
//
// A truncated file fails the size check (or the hash), a flipped bit fails the hash, and both
// errors name the file. Raw float32 keeps an 11M-parameter model at 45 MB per tensor set and
// loads in a fraction of a second (JSON arrays would be ~4x larger and far slower).

import { createHash } from 'node:crypto';
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { CheckpointError, NoCheckpointError } from './errors.js';
import { writeFileAtomic, type AtomicWriteOptions } from './files.js';
import type { TrainSettings } from './settings.js';

export const CHECKPOINT_MAGIC = 'DTRNCKPT';
export const CHECKPOINT_VERSION = 1;
const PREFIX_BYTES = 16;
const HASH_BYTES = 32;

export const SECTION_NAMES = ['weights', 'bnStats', 'momentum'] as const;
export type SectionName = (typeof SECTION_NAMES)[number];

export interface CheckpointHistory {
  /** Test accuracy of every finished epoch, epoch 1 first. */
  testAcc: number[];
  bestTestAcc: number;
  bestEpoch: number;
  /** Wall time of all finished epochs (training + evaluation), summed over resumes. */
  elapsedSec: number;
  /** Training time only (what images/s divides by). */
  trainSec: number;
  /** Images trained on, all ranks together. */
  images: number;
}

/** Running totals of the epoch in progress (all ranks together), as the trainer commits them. */
export interface EpochTotals {
  /** Sum over applied steps of loss x images (all ranks). */
  lossSum: number;
  correct: number;
  /** Training images of applied steps, all ranks (padding repeats included). */
  count: number;
  /** Optimiser steps applied in this epoch. */
  steps: number;
  /** Training seconds of this epoch so far (the committing rank's). */
  trainSec: number;
  phases: { data: number; compute: number; allReduce: number; optimizer: number };
  /** Learning rate of the epoch's first and latest applied step (null before the first). */
  lrFirst: number | null;
  lrLast: number | null;
}

/**
 * Where in an epoch a mid-epoch checkpoint (written when an elastic run stops below
 * --min-workers) was taken: `done` positions of epoch `epoch`'s sample order consumed, and the
 * epoch's totals so far. A resume continues the rest of that epoch with any world size.
 */
export interface CheckpointPosition {
  done: number;
  totals: EpochTotals;
}

export interface CheckpointHeader {
  format: 'dtrain-checkpoint';
  version: number;
  /** Epochs finished (1-based count): resuming starts sampler epoch `epoch` (0-based). */
  epoch: number;
  /** Optimiser steps taken in total. */
  step: number;
  settings: TrainSettings;
  worldSize: number;
  model: { config: { inChannels: number; classes: number; imageSize: number }; paramCount: number; bnStatCount: number; layoutHash: string };
  /** nesterov and skipNormBiasDecay: absent in checkpoints written before they existed (false). */
  optimizer: { kind: 'sgd'; steps: number; lr: number; momentum: number; weightDecay: number; nesterov?: boolean; skipNormBiasDecay?: boolean };
  /**
   * The sampler's order for epoch e is a pure function of (seed, e), and augmentation draws from
   * Rng(seed, AUGMENT_STREAM, e, rank), re-seeded every epoch: at an epoch boundary the whole
   * random state is (seed, next epoch), valid for any world size, so nothing else needs saving.
   */
  sampler: { kind: 'distributed'; seed: number; nextEpoch: number; shuffle: true; dropLast: false };
  rng: { algorithm: 'xoshiro128**'; augmentStream: number; seededBy: '(seed, augmentStream, epoch, rank)' };
  history: CheckpointHistory;
  /** Absent at an epoch boundary (and in every checkpoint written before elastic training). */
  position?: CheckpointPosition;
  createdAt: string;
  sections: Array<{ name: SectionName; offset: number; floats: number }>;
}

export interface Checkpoint {
  file: string;
  header: CheckpointHeader;
  weights: Float32Array;
  bnStats: Float32Array;
  /** Momentum buffers (empty when momentum is 0). */
  momentum: Float32Array;
}

export type CheckpointContent = Omit<CheckpointHeader, 'format' | 'version' | 'sections' | 'createdAt'> & {
  weights: Float32Array;
  bnStats: Float32Array;
  momentum: Float32Array;
};

function assertLittleEndian(): void {
  if (os.endianness() !== 'LE') throw new Error('checkpoints are little-endian float32; this machine is big-endian');
}

function bytesOf(a: Float32Array): Uint8Array {
  return new Uint8Array(a.buffer, a.byteOffset, a.byteLength);
}

/** Encodes a checkpoint into the parts of the file (no copies of the float sections). */
export function encodeCheckpoint(c: CheckpointContent, createdAt = new Date().toISOString()): Uint8Array[] {
  assertLittleEndian();
  const arrays: Record<SectionName, Float32Array> = { weights: c.weights, bnStats: c.bnStats, momentum: c.momentum };
  // The header holds the section offsets, which depend on the header's length: lay out with
  // placeholder offsets, then fix them; the JSON length only changes if the digits do, so iterate.
  let headerBytes = 0;
  let header!: CheckpointHeader;
  let json!: Buffer;
  for (let attempt = 0; attempt < 4; attempt++) {
    let offset = align8(PREFIX_BYTES + headerBytes);
    const sections = SECTION_NAMES.map((name) => {
      const s = { name, offset, floats: arrays[name].length };
      offset += arrays[name].byteLength;
      return s;
    });
    const { weights: _w, bnStats: _b, momentum: _m, ...meta } = c;
    header = { format: 'dtrain-checkpoint', version: CHECKPOINT_VERSION, ...meta, createdAt, sections };
    json = Buffer.from(JSON.stringify(header), 'utf8');
    if (json.length === headerBytes) break;
    headerBytes = json.length;
  }
  if (header.sections[0].offset !== align8(PREFIX_BYTES + json.length)) throw new Error('checkpoint header layout did not converge');
  const prefix = Buffer.alloc(align8(PREFIX_BYTES + json.length));
  prefix.write(CHECKPOINT_MAGIC, 0, 'latin1');
  prefix.writeUInt32LE(CHECKPOINT_VERSION, 8);
  prefix.writeUInt32LE(json.length, 12);
  json.copy(prefix, PREFIX_BYTES);
  const parts: Uint8Array[] = [prefix, ...SECTION_NAMES.map((n) => bytesOf(arrays[n]))];
  const hash = createHash('sha256');
  for (const p of parts) hash.update(p);
  parts.push(hash.digest());
  return parts;
}

function align8(n: number): number {
  return (n + 7) & ~7;
}

/** Decodes and verifies a whole checkpoint file's bytes; every failure names `file`. */
export function decodeCheckpoint(bytes: Uint8Array, file: string): Checkpoint {
  assertLittleEndian();
  const buf = Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  if (buf.length < PREFIX_BYTES + HASH_BYTES) throw new CheckpointError(file, `it is only ${buf.length} bytes (truncated or not a checkpoint)`);
  if (buf.toString('latin1', 0, 8) !== CHECKPOINT_MAGIC) throw new CheckpointError(file, 'it is not a dtrain checkpoint (wrong magic bytes)');
  const version = buf.readUInt32LE(8);
  if (version !== CHECKPOINT_VERSION) throw new CheckpointError(file, `format version ${version}, this dtrain reads version ${CHECKPOINT_VERSION}`, 'use the dtrain that wrote it');
  const headerLen = buf.readUInt32LE(12);
  let header: CheckpointHeader | undefined;
  if (PREFIX_BYTES + headerLen <= buf.length - HASH_BYTES) {
    try {
      header = JSON.parse(buf.toString('utf8', PREFIX_BYTES, PREFIX_BYTES + headerLen)) as CheckpointHeader;
    } catch {
      header = undefined;
    }
  }
  // The size check first: it says "truncated" where the hash alone could only say "damaged".
  if (header?.sections?.length) {
    const last = header.sections[header.sections.length - 1];
    const expected = last.offset + last.floats * 4 + HASH_BYTES;
    if (buf.length !== expected) {
      throw new CheckpointError(file, `it has ${buf.length} bytes, its header says ${expected} (${buf.length < expected ? 'truncated' : 'trailing data'})`);
    }
  }
  const body = buf.subarray(0, buf.length - HASH_BYTES);
  const want = buf.subarray(buf.length - HASH_BYTES);
  const got = createHash('sha256').update(body).digest();
  if (!got.equals(want)) throw new CheckpointError(file, 'SHA-256 checksum mismatch (the file is damaged or truncated)');
  if (!header || header.format !== 'dtrain-checkpoint') throw new CheckpointError(file, 'its header is not valid checkpoint JSON');
  const out: Partial<Record<SectionName, Float32Array>> = {};
  for (const s of header.sections) {
    if (!(SECTION_NAMES as readonly string[]).includes(s.name) || s.offset % 4 !== 0 || s.offset + s.floats * 4 > body.length) {
      throw new CheckpointError(file, `section ${JSON.stringify(s)} does not fit the file`);
    }
    // A copy: the file buffer is not guaranteed to be 4-byte aligned, and the sections outlive it.
    out[s.name] = new Float32Array(body.buffer.slice(body.byteOffset + s.offset, body.byteOffset + s.offset + s.floats * 4));
  }
  for (const n of SECTION_NAMES) if (!out[n]) throw new CheckpointError(file, `section '${n}' is missing`);
  return { file, header, weights: out.weights!, bnStats: out.bnStats!, momentum: out.momentum! };
}

/** `checkpoint-eNNNN.ckpt` at an epoch boundary, `checkpoint-eNNNN-pNNNNNNNN.ckpt` `done` positions into the next epoch. */
export function checkpointFileName(epoch: number, done = 0): string {
  const e = `checkpoint-e${String(epoch).padStart(4, '0')}`;
  return done > 0 ? `${e}-p${String(done).padStart(8, '0')}.ckpt` : `${e}.ckpt`;
}

const CHECKPOINT_RE = /^checkpoint-e(\d+)(?:-p(\d+))?\.ckpt$/;

/** Checkpoints in `dir`, oldest first by (epochs finished, positions done in the next); temporaries never match. */
export async function listCheckpoints(dir: string): Promise<Array<{ epoch: number; done: number; file: string }>> {
  let names: string[];
  try {
    names = await fs.readdir(dir);
  } catch (err) {
    const e = err as NodeJS.ErrnoException;
    if (e.code === 'ENOENT' || e.code === 'ENOTDIR') throw new NoCheckpointError(dir);
    throw err;
  }
  return names
    .map((n) => ({ m: CHECKPOINT_RE.exec(n), n }))
    .filter((x) => x.m)
    .map((x) => ({ epoch: Number(x.m![1]), done: Number(x.m![2] ?? 0), file: path.join(dir, x.n) }))
    .sort((a, b) => a.epoch - b.epoch || a.done - b.done);
}

export async function readCheckpoint(file: string): Promise<Checkpoint> {
  let bytes: Buffer;
  try {
    bytes = await fs.readFile(file);
  } catch (err) {
    throw new CheckpointError(file, `it cannot be read (${(err as NodeJS.ErrnoException).code ?? String(err)})`, 'check the path and permissions');
  }
  return decodeCheckpoint(bytes, file);
}

/** The newest checkpoint in `dir`. A damaged newest one is an error (never silently an older one). */
export async function readLatestCheckpoint(dir: string): Promise<Checkpoint> {
  const all = await listCheckpoints(dir);
  if (all.length === 0) throw new NoCheckpointError(dir);
  const latest = all[all.length - 1];
  try {
    return await readCheckpoint(latest.file);
  } catch (err) {
    if (err instanceof CheckpointError && all.length > 1) {
      throw new CheckpointError(latest.file, err.detail, `delete it to resume from ${path.basename(all[all.length - 2].file)}, or start a new run`);
    }
    throw err;
  }
}

/** Writes `checkpointFileName(epoch, position.done)` atomically, then removes all but the newest `keep`. */
/** Name of the copy of the checkpoint with the best test accuracy so far (not rotated, never resumed from). */
export const BEST_CHECKPOINT = 'best.ckpt';

/**
 * Makes `file` (a checkpoint just written in `dir`) the best one: a hard link under a temporary
 * name renamed over best.ckpt (a copy where links are not possible), so best.ckpt is always a
 * whole checkpoint and outlives the rotation of `file`.
 */
export async function keepAsBest(dir: string, file: string): Promise<string> {
  const best = path.join(dir, BEST_CHECKPOINT);
  const tmp = `${best}.tmp-${process.pid}`;
  await fs.rm(tmp, { force: true });
  try {
    await fs.link(file, tmp);
  } catch {
    await fs.copyFile(file, tmp);
  }
  await fs.rename(tmp, best);
  return best;
}

export async function writeCheckpoint(dir: string, c: CheckpointContent, keep: number, options: AtomicWriteOptions = {}): Promise<string> {
  const file = path.join(dir, checkpointFileName(c.epoch, c.position?.done ?? 0));
  await writeFileAtomic(file, encodeCheckpoint(c), options);
  const all = await listCheckpoints(dir);
  for (const old of all.slice(0, Math.max(0, all.length - keep))) await fs.rm(old.file, { force: true });
  return file;
}
