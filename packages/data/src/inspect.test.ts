import { PNG } from 'pngjs';
import { describe, expect, it } from 'vitest';
import { makeDataset, subsetDataset, takeFirst } from './dataset.js';
import { defaultDataDir } from './datadir.js';
import { describeImage, imageToPng } from './inspect.js';

const rgb = makeDataset({
  name: 'rgb',
  // Image 1: R = 0..3, G = 100, B = 200..203 over a 2x2 image.
  images: Uint8Array.from([...new Array(12).fill(7), 0, 100, 200, 1, 100, 201, 2, 100, 202, 3, 100, 203]),
  labels: Uint8Array.from([0, 2]),
  height: 2,
  width: 2,
  channels: 3,
  classNames: ['a', 'b', 'cat'],
});

describe('inspect', () => {
  it('summarises label, class name and per-channel min/max/mean', () => {
    expect(describeImage(rgb, 1)).toEqual({
      dataset: 'rgb',
      index: 1,
      label: 2,
      className: 'cat',
      height: 2,
      width: 2,
      channels: 3,
      pixels: [
        { channel: 'R', min: 0, max: 3, mean: 1.5 },
        { channel: 'G', min: 100, max: 100, mean: 100 },
        { channel: 'B', min: 200, max: 203, mean: 201.5 },
      ],
    });
    expect(() => describeImage(rgb, 2)).toThrow(/index 2 is outside rgb's 0..1/);
  });

  it('writes an upscaled nearest-neighbour PNG that decodes to the pixels', () => {
    const png = PNG.sync.read(imageToPng(rgb, 1, 3));
    expect([png.width, png.height]).toEqual([6, 6]);
    const at = (x: number, y: number) => [...png.data.subarray((y * 6 + x) * 4, (y * 6 + x) * 4 + 4)];
    expect(at(0, 0)).toEqual([0, 100, 200, 255]);
    expect(at(2, 2)).toEqual([0, 100, 200, 255]);
    expect(at(3, 0)).toEqual([1, 100, 201, 255]);
    expect(at(5, 5)).toEqual([3, 100, 203, 255]);
    const gray = makeDataset({ name: 'g', images: Uint8Array.from([9, 250]), labels: Uint8Array.from([0]), height: 1, width: 2, channels: 1, classNames: ['x'] });
    const g = PNG.sync.read(imageToPng(gray, 0, 1));
    expect([...g.data]).toEqual([9, 9, 9, 255, 250, 250, 250, 255]);
  });
});

describe('Dataset helpers and the data directory', () => {
  it('checks shapes and labels, subsets and takes prefixes', () => {
    expect(() => makeDataset({ ...rgb, images: new Uint8Array(5) })).toThrow(/5 image bytes do not hold 2 images of 2x2x3/);
    expect(() => makeDataset({ ...rgb, labels: Uint8Array.from([0, 3]) })).toThrow(/label 3 of image 1/);
    const s = subsetDataset(rgb, [1, 1, 0]);
    expect(s.count).toBe(3);
    expect([...s.labels]).toEqual([2, 2, 0]);
    expect([...s.images.subarray(12, 15)]).toEqual([0, 100, 200]);
    expect(takeFirst(rgb, 1).count).toBe(1);
    expect(takeFirst(rgb, 1).images.length).toBe(12);
    expect(takeFirst(rgb, 9)).toBe(rgb);
  });

  it('defaults to $DTRAIN_DATA_DIR, else ~/.cache/dtrain/data', () => {
    expect(defaultDataDir({ DTRAIN_DATA_DIR: '/srv/d' }, '/home/u')).toBe('/srv/d');
    expect(defaultDataDir({}, '/home/u')).toBe('/home/u/.cache/dtrain/data');
    expect(defaultDataDir({ DTRAIN_DATA_DIR: '  ' }, '/home/u')).toBe('/home/u/.cache/dtrain/data');
  });
});
