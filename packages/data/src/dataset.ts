import { DatasetArgumentError } from './errors.js';

/**
 * An image classification data set held in memory.
 *
 * Layout: `images` is uint8, NHWC (channels last, the layout TensorFlow.js wants), image `i` occupies
 * `images.subarray(i * imageSize, (i + 1) * imageSize)` with `imageSize = height * width * channels`,
 * rows top to bottom, and within a pixel the channels in order (R, G, B for colour).
 */
export interface Dataset {
  /** e.g. 'cifar10/train', 'fashion-mnist/test', 'synthetic-test-patterns'. */
  readonly name: string;
  readonly images: Uint8Array;
  /** Class index of each image, 0 .. classNames.length - 1. */
  readonly labels: Uint8Array;
  readonly count: number;
  readonly height: number;
  readonly width: number;
  readonly channels: number;
  readonly classNames: readonly string[];
}

export function imageSize(ds: Pick<Dataset, 'height' | 'width' | 'channels'>): number {
  return ds.height * ds.width * ds.channels;
}

/** Builds a Dataset after checking that the arrays agree with the shape. */
export function makeDataset(fields: Omit<Dataset, 'count'>): Dataset {
  const { name, images, labels, height, width, channels, classNames } = fields;
  for (const [k, v] of [['height', height], ['width', width], ['channels', channels]] as const) {
    if (!Number.isInteger(v) || v <= 0) throw new DatasetArgumentError(`${name}: ${k} must be a positive integer, got ${v}`);
  }
  const count = labels.length;
  if (images.length !== count * height * width * channels) {
    throw new DatasetArgumentError(
      `${name}: ${images.length} image bytes do not hold ${count} images of ${height}x${width}x${channels}`,
    );
  }
  for (let i = 0; i < count; i++) {
    if (labels[i] >= classNames.length) {
      throw new DatasetArgumentError(`${name}: label ${labels[i]} of image ${i} is not below ${classNames.length} classes`);
    }
  }
  return { name, images, labels, count, height, width, channels, classNames };
}

/** The images at `indices`, copied, in that order (e.g. for `--limit-train`). */
export function subsetDataset(ds: Dataset, indices: ArrayLike<number>, name = `${ds.name}[subset]`): Dataset {
  const size = imageSize(ds);
  const images = new Uint8Array(indices.length * size);
  const labels = new Uint8Array(indices.length);
  for (let k = 0; k < indices.length; k++) {
    const i = indices[k];
    if (!Number.isInteger(i) || i < 0 || i >= ds.count) {
      throw new DatasetArgumentError(`${ds.name}: index ${i} is outside 0..${ds.count - 1}`);
    }
    images.set(ds.images.subarray(i * size, (i + 1) * size), k * size);
    labels[k] = ds.labels[i];
  }
  return { ...ds, name, images, labels, count: indices.length };
}

/** The first `n` images (all of them when n >= count), sharing memory with `ds`. */
export function takeFirst(ds: Dataset, n: number): Dataset {
  if (n >= ds.count) return ds;
  const size = imageSize(ds);
  return {
    ...ds,
    name: `${ds.name}[:${n}]`,
    images: ds.images.subarray(0, n * size),
    labels: ds.labels.subarray(0, n),
    count: n,
  };
}
