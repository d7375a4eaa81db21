import fs from 'node:fs/promises';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { firstDifference } from '@dtrain/core/testing';
import {
  checkpointFileName,
  decodeCheckpoint,
  encodeCheckpoint,
  listCheckpoints,
  readCheckpoint,
  readLatestCheckpoint,
  writeCheckpoint,
  type CheckpointContent,
} from './checkpoint.js';
import { CheckpointError, NoCheckpointError } from './errors.js';
import { resolveSettings } from './settings.js';
import { tempDir } from './testing/helpers.js';

function content(epoch: number, n = 1000): CheckpointContent {
  const weights = Float32Array.from({ length: n }, (_, i) => Math.sin(i + epoch) * 1e-3);
  weights[3] = -0; // bit patterns, not just values, must survive
  weights[4] = Number.MIN_VALUE;
  return {
    epoch,
    step: epoch * 10,
    settings: resolveSettings({ dataset: 'fashion-mnist', seed: 3 }),
    worldSize: 1,
    model: { config: { inChannels: 1, classes: 10, imageSize: 28 }, paramCount: n, bnStatCount: 6, layoutHash: 'abc' },
    optimizer: { kind: 'sgd', steps: epoch * 10, lr: 0.01, momentum: 0.9, weightDecay: 0 },
    sampler: { kind: 'distributed', seed: 3, nextEpoch: epoch, shuffle: true, dropLast: false },
    rng: { algorithm: 'xoshiro128**', augmentStream: 1, seededBy: '(seed, augmentStream, epoch, rank)' },
    history: { testAcc: [0.5], bestTestAcc: 0.5, bestEpoch: 1, elapsedSec: 1, trainSec: 1, images: 10 },
    weights,
    bnStats: Float32Array.from([0, 1, 2, 3, 4, 5]),
    momentum: weights.map((w) => w * 2),
  };
}

function concat(parts: Uint8Array[]): Buffer {
  return Buffer.concat(parts.map((p) => Buffer.from(p.buffer, p.byteOffset, p.byteLength)));
}

describe('checkpoint format', () => {
  it('round-trips every section bitwise and the header exactly', () => {
    const c = content(2);
    const bytes = concat(encodeCheckpoint(c, '2025-01-01T00:00:00.000Z'));
    expect(bytes.toString('latin1', 0, 8)).toBe('DTRNCKPT');
    // Prefix + padded header + 3 sections + SHA-256: the size says "raw float32", not JSON.
    expect(bytes.length).toBeLessThan(16 + 2048 + 4 * (1000 + 6 + 1000) + 32);
    const d = decodeCheckpoint(bytes, 'x.ckpt');
    expect(firstDifference(d.weights, c.weights)).toBe(-1);
    expect(firstDifference(d.momentum, c.momentum)).toBe(-1);
    expect(Array.from(d.bnStats)).toEqual([0, 1, 2, 3, 4, 5]);
    expect(Object.is(d.weights[3], -0)).toBe(true);
    const { weights: _w, bnStats: _b, momentum: _m, ...meta } = c;
    expect(d.header).toMatchObject({ ...meta, format: 'dtrain-checkpoint', version: 1, createdAt: '2025-01-01T00:00:00.000Z' });
    for (const s of d.header.sections) expect(s.offset % 8).toBe(0);
  });

  it('reports a truncated file as truncated, naming it', () => {
    const bytes = concat(encodeCheckpoint(content(1)));
    for (const cut of [bytes.length - 1, bytes.length - 100, 200, 20, 0]) {
      const err = (() => {
        try {
          decodeCheckpoint(bytes.subarray(0, cut), '/runs/a/checkpoint-e0001.ckpt');
        } catch (e) {
          return e;
        }
      })();
      expect(err, `cut at ${cut}`).toBeInstanceOf(CheckpointError);
      expect((err as Error).message).toMatch(/^checkpoint \/runs\/a\/checkpoint-e0001\.ckpt cannot be used: .*(truncated|damaged)/);
    }
  });

  it('detects a single flipped bit anywhere (header, data, hash)', () => {
    const bytes = concat(encodeCheckpoint(content(1)));
    for (const pos of [20, 600, bytes.length - 40, bytes.length - 1]) {
      const bad = Buffer.from(bytes);
      bad[pos] ^= 0x10;
      expect(() => decodeCheckpoint(bad, 'f.ckpt'), `byte ${pos}`).toThrow(/f\.ckpt cannot be used: .*(checksum mismatch|not valid)/);
    }
    const notOurs = Buffer.from(bytes);
    notOurs.write('PK', 0, 'latin1');
    expect(() => decodeCheckpoint(notOurs, 'f.ckpt')).toThrow(/not a dtrain checkpoint/);
  });
});

describe('checkpoint files', () => {
  it('writes atomically: a failure before the rename leaves the old file and no temporary', async () => {
    const dir = await tempDir();
    const first = await writeCheckpoint(dir, content(1), 5);
    const before = await fs.readFile(first);
    // Same epoch again, failing after the data is written and fsynced but before the rename.
    await expect(
      writeCheckpoint(dir, content(1, 2000), 5, {
        beforeRename: async (tmp) => {
          expect((await fs.stat(tmp)).size).toBeGreaterThan(8000);
          throw new Error('power cut');
        },
      }),
    ).rejects.toThrow('power cut');
    expect(await fs.readdir(dir)).toEqual([checkpointFileName(1)]);
    expect((await fs.readFile(first)).equals(before)).toBe(true);
    expect((await readCheckpoint(first)).weights.length).toBe(1000);
  });

  it('keeps the newest N, resumes from the newest, and names it when it is damaged', async () => {
    const dir = await tempDir();
    for (let e = 1; e <= 4; e++) await writeCheckpoint(dir, content(e), 2);
    expect((await listCheckpoints(dir)).map((c) => c.epoch)).toEqual([3, 4]);
    expect((await readLatestCheckpoint(dir)).header.epoch).toBe(4);

    const latest = path.join(dir, checkpointFileName(4));
    const bytes = await fs.readFile(latest);
    await fs.writeFile(latest, bytes.subarray(0, bytes.length >> 1));
    await expect(readLatestCheckpoint(dir)).rejects.toThrow(
      new RegExp(`checkpoint ${latest.replace(/[.]/g, '\\.')} cannot be used: .*truncated.*delete it to resume from checkpoint-e0003\\.ckpt`),
    );
  });

  it('orders mid-epoch checkpoints by (epoch, done) after epoch ones, keeps N of them, reads old names', async () => {
    const dir = await tempDir();
    const totals = { lossSum: 12.5, correct: 7, count: 24, steps: 2, trainSec: 0.5, phases: { data: 0.1, compute: 0.3, allReduce: 0, optimizer: 0.1 }, lrFirst: 0.01, lrLast: 0.01 };
    const mid = (epoch: number, done: number) => ({ ...content(epoch), position: { done, totals } });
    await writeCheckpoint(dir, content(1), 10);
    await writeCheckpoint(dir, mid(1, 24), 10);
    await writeCheckpoint(dir, mid(1, 120), 10);
    await writeCheckpoint(dir, content(2), 10);
    await writeCheckpoint(dir, mid(2, 8), 10);
    expect(checkpointFileName(1, 24)).toBe('checkpoint-e0001-p00000024.ckpt');
    expect((await listCheckpoints(dir)).map((c) => [c.epoch, c.done, path.basename(c.file)])).toEqual([
      [1, 0, 'checkpoint-e0001.ckpt'],
      [1, 24, 'checkpoint-e0001-p00000024.ckpt'],
      [1, 120, 'checkpoint-e0001-p00000120.ckpt'],
      [2, 0, 'checkpoint-e0002.ckpt'],
      [2, 8, 'checkpoint-e0002-p00000008.ckpt'],
    ]);
    const latest = await readLatestCheckpoint(dir);
    expect(latest.header).toMatchObject({ epoch: 2, position: { done: 8, totals } });
    expect((await readCheckpoint(path.join(dir, 'checkpoint-e0002.ckpt'))).header.position).toBeUndefined();
    await writeCheckpoint(dir, mid(2, 16), 2);
    expect((await listCheckpoints(dir)).map((c) => path.basename(c.file))).toEqual(['checkpoint-e0002-p00000008.ckpt', 'checkpoint-e0002-p00000016.ckpt']);
  });

  it('says so when a folder has no checkpoint', async () => {
    const dir = await tempDir();
    await expect(readLatestCheckpoint(dir)).rejects.toBeInstanceOf(NoCheckpointError);
    await expect(readLatestCheckpoint(path.join(dir, 'missing'))).rejects.toThrow(/no checkpoint .* in .*missing/);
  });
});
