import { PNG } from 'pngjs';
import { imageSize, type Dataset } from './dataset.js';
import { DatasetArgumentError } from './errors.js';

export interface ChannelSummary {
  channel: string;
  min: number;
  max: number;
  mean: number;
}

export interface ImageSummary {
  dataset: string;
  index: number;
  label: number;
  className: string;
  height: number;
  width: number;
  channels: number;
  /** Raw uint8 values (0-255) per channel. */
  pixels: ChannelSummary[];
}

function checkIndex(ds: Dataset, index: number): void {
  if (!Number.isInteger(index) || index < 0 || index >= ds.count) {
    throw new DatasetArgumentError(`index ${index} is outside ${ds.name}'s 0..${ds.count - 1}`);
  }
}

function channelName(channels: number, c: number): string {
  if (channels === 1) return 'gray';
  if (channels === 3) return ['R', 'G', 'B'][c];
  return `c${c}`;
}

export function describeImage(ds: Dataset, index: number): ImageSummary {
  checkIndex(ds, index);
  const C = ds.channels;
  const size = imageSize(ds);
  const off = index * size;
  const pixels: ChannelSummary[] = [];
  for (let c = 0; c < C; c++) {
    let min = 255;
    let max = 0;
    let sum = 0;
    for (let i = off + c; i < off + size; i += C) {
      const v = ds.images[i];
      if (v < min) min = v;
      if (v > max) max = v;
      sum += v;
    }
    pixels.push({ channel: channelName(C, c), min, max, mean: sum / (ds.height * ds.width) });
  }
  const label = ds.labels[index];
  return {
    dataset: ds.name,
    index,
    label,
    className: ds.classNames[label] ?? String(label),
    height: ds.height,
    width: ds.width,
    channels: C,
    pixels,
  };
}

/** The image as a PNG, each pixel an upscale x upscale block (nearest neighbour) so a person can see it. */
export function imageToPng(ds: Dataset, index: number, upscale = 8): Buffer {
  checkIndex(ds, index);
  if (!Number.isInteger(upscale) || upscale < 1 || upscale > 64) throw new DatasetArgumentError(`upscale must be an integer in 1..64, got ${upscale}`);
  const { height: H, width: W, channels: C } = ds;
  if (C !== 1 && C !== 3) throw new DatasetArgumentError(`PNG export supports 1 or 3 channels, ${ds.name} has ${C}`);
  const png = new PNG({ width: W * upscale, height: H * upscale });
  const off = index * imageSize(ds);
  const outW = W * upscale;
  for (let y = 0; y < H * upscale; y++) {
    const sy = Math.floor(y / upscale);
    for (let x = 0; x < outW; x++) {
      const s = off + (sy * W + Math.floor(x / upscale)) * C;
      const o = (y * outW + x) * 4;
      png.data[o] = ds.images[s];
      png.data[o + 1] = ds.images[s + (C === 3 ? 1 : 0)];
      png.data[o + 2] = ds.images[s + (C === 3 ? 2 : 0)];
      png.data[o + 3] = 255;
    }
  }
  return PNG.sync.write(png);
}
