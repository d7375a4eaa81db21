import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { makeSyntheticTestDataset } from '@dtrain/data';
import type { TrainData } from '../trainer.js';

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
