import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { makeSyntheticTestDataset } from '@dtrain/data';
import type { TrainData } from '../trainer.js';

/** Index of the first differing element (bitwise), -1 when equal; fast enough for 11M floats. */
export function firstDifference(a: Float32Array, b: Float32Array): number {
  if (a.length !== b.length) return Math.min(a.length, b.length);
  const ua = new Uint32Array(a.buffer, a.byteOffset, a.length);
  const ub = new Uint32Array(b.buffer, b.byteOffset, b.length);
  for (let i = 0; i < ua.length; i++) if (ua[i] !== ub[i]) return i;
  return -1;
}

/** Synthetic, NOT REAL data: learnable stripe patterns (see @dtrain/data). */
export function syntheticData(trainCount: number, testCount: number, size = 16, channels = 3): TrainData & { name: string } {
  return {
    name: 'synthetic-test',
    train: makeSyntheticTestDataset({ count: trainCount, height: size, width: size, channels, seed: 11 }),
    test: makeSyntheticTestDataset({ count: testCount, height: size, width: size, channels, seed: 12 }),
  };
}

export async function tempDir(prefix = 'dtrain-worker-'): Promise<string> {
  return fs.mkdtemp(path.join(os.tmpdir(), prefix));
}
