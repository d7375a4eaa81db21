import { makeDataset, type Dataset } from './dataset.js';
import { Rng } from './rng.js';

export interface SyntheticTestDatasetOptions {
  count: number;
  height: number;
  width: number;
  channels: number;
  numClasses?: number;
  seed: number;
  /** Standard deviation of the added noise, as a fraction of the 0-255 range. Default 0.15. */
  noise?: number;
}

/**
 * FOR TESTS ONLY: NOT REAL DATA. Makes images a small network can learn in seconds: each class is
 * an oriented stripe pattern (angle and frequency depend on the class) with a class-dependent
 * tint per channel, a random phase and brightness per image, plus Gaussian noise. Labels are
 * balanced and in random order. Same options, same bytes.
 */
export function makeSyntheticTestDataset(options: SyntheticTestDatasetOptions): Dataset {
  const { count, height, width, channels, seed } = options;
  const numClasses = options.numClasses ?? 10;
  const noise = (options.noise ?? 0.15) * 255;
  const rng = new Rng(seed, 0x5e7);
  const labels = new Uint8Array(count);
  for (let i = 0; i < count; i++) labels[i] = i % numClasses;
  rng.shuffle(labels);
  const images = new Uint8Array(count * height * width * channels);
  const size = Math.max(height, width);
  let o = 0;
  for (let i = 0; i < count; i++) {
    const c = labels[i];
    const angle = (Math.PI * c) / numClasses;
    const freq = (1 + (c % 3)) * ((2 * Math.PI) / size) * 1.5;
    const fx = Math.cos(angle) * freq;
    const fy = Math.sin(angle) * freq;
    // A small phase jitter keeps each class one pattern but no two images identical.
    const phase = (rng.next() - 0.5) * 0.8;
    const brightness = (rng.next() - 0.5) * 30;
    for (let y = 0; y < height; y++) {
      for (let x = 0; x < width; x++) {
        const wave = Math.cos(fx * x + fy * y + phase);
        for (let ch = 0; ch < channels; ch++) {
          const tint = 0.55 + 0.45 * (((c + ch) % numClasses) / Math.max(1, numClasses - 1));
          const v = 128 + brightness + 100 * tint * wave + noise * rng.normal();
          images[o++] = v < 0 ? 0 : v > 255 ? 255 : Math.round(v);
        }
      }
    }
  }
  const classNames = Array.from({ length: numClasses }, (_, k) => `synthetic-class-${k}`);
  return makeDataset({
    name: `synthetic-test-patterns(seed=${seed}, NOT REAL DATA)`,
    images,
    labels,
    height,
    width,
    channels,
    classNames,
  });
}
