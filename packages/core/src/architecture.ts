// The network of the tutorial, as data: every layer, its output shape, its parameters and
// its forward FLOPs. The model (resnet.ts) is built from this description, and
// `dtrain model summary` prints it, so the two cannot disagree.
//
//   stem:  Conv2d(C, 64, 7, stride 2, no padding, bias) -> BatchNorm(64, eps 1e-3) -> ReLU
//          -> MaxPool(3, stride 2, padding 1)
//   block(c_in, c_out, shortcut, stride):
//          conv3x3(c_in, c_out, stride, pad 1, no bias) -> BN -> ReLU
//          -> conv3x3(c_out, c_out, 1, pad 1, no bias) -> BN -> ReLU
//          -> + (x, or Conv2d(c_in, c_out, 1, stride, bias)(x) when shortcut) -> ReLU
//          (the ReLU before the addition is the tutorial's own choice)
//   stages: [b(64,64), b(64,64)], [b(64,128,sc,2), b(128,128)],
//           [b(128,256,sc,2), b(256,256)], [b(256,512,sc,2), b(512,512)]
//   head:  average over the final map (AvgPool2d(3) at 96x96 input) -> Linear(512, classes)

export interface ResNetConfig {
  /** 3 for CIFAR-10, 1 for Fashion-MNIST. */
  inChannels: number;
  classes: number;
  /** Square input size in pixels (the tutorial resizes CIFAR-10 to 96). */
  imageSize: number;
}

export const TUTORIAL_CONFIG: ResNetConfig = { inChannels: 3, classes: 10, imageSize: 96 };

/** One trainable tensor. Shapes use TensorFlow's layouts: conv [kh, kw, in, out], dense [in, out]. */
export interface ParamSpec {
  name: string;
  shape: number[];
  size: number;
  /** Offset of this tensor in the flat gradient/weight vector. */
  offset: number;
  init: 'xavier-uniform' | 'zeros' | 'ones';
  /** Xavier-uniform fan-in/fan-out, PyTorch's definition (receptive field included). */
  fanIn?: number;
  fanOut?: number;
}

export interface ConvLayerSpec {
  kind: 'conv';
  name: string;
  kernel: number;
  stride: 1 | 2;
  padding: number;
  inChannels: number;
  outChannels: number;
  bias: boolean;
}
export interface BatchNormSpec {
  kind: 'bn';
  name: string;
  channels: number;
  eps: number;
}

export interface LayerSummary {
  name: string;
  type: string;
  outputShape: number[];
  params: number;
  /** Forward FLOPs per image, counting one multiply-add as 2 FLOPs. */
  flops: number;
}

export interface BlockSpec {
  name: string;
  conv1: ConvLayerSpec;
  bn1: BatchNormSpec;
  conv2: ConvLayerSpec;
  bn2: BatchNormSpec;
  shortcut?: ConvLayerSpec;
}

export interface Architecture {
  config: ResNetConfig;
  stemConv: ConvLayerSpec;
  stemBn: BatchNormSpec;
  blocks: BlockSpec[];
  /** Trainable parameters in the fixed order of every flat vector (gradients, weights). */
  params: ParamSpec[];
  paramCount: number;
  /** BatchNorm running statistics in flat order: for each BN, running mean then running variance. */
  batchNorms: BatchNormSpec[];
  bnStatCount: number;
  layers: LayerSummary[];
  flopsPerImage: number;
}

const PYTORCH_BN_EPS = 1e-5;
const STEM_BN_EPS = 1e-3;

function convOut(size: number, k: number, stride: number, pad: number): number {
  return Math.floor((size + 2 * pad - k) / stride) + 1;
}

/** A network configuration that cannot be built (names the field and the value). */
export class ModelConfigError extends RangeError {
  readonly code = 'INVALID_MODEL_CONFIG' as const;
  constructor(message: string) {
    super(message);
    this.name = 'ModelConfigError';
  }
}

export function validateConfig(c: ResNetConfig): void {
  for (const [k, v] of Object.entries(c)) {
    if (!Number.isInteger(v) || v <= 0) throw new ModelConfigError(`ResNet config: ${k} must be a positive integer, got ${v}`);
  }
  if (c.classes < 2) throw new ModelConfigError(`ResNet config: classes must be at least 2, got ${c.classes}`);
  // The stem (7x7/2, no padding) then three stride-2 stages need at least 7 pixels.
  if (c.imageSize < 7) throw new ModelConfigError(`ResNet config: imageSize must be at least 7, got ${c.imageSize}`);
}

export function describeResNet(config: ResNetConfig): Architecture {
  validateConfig(config);
  const params: ParamSpec[] = [];
  const batchNorms: BatchNormSpec[] = [];
  const layers: LayerSummary[] = [];
  let offset = 0;
  const addParam = (p: Omit<ParamSpec, 'size' | 'offset'>) => {
    const size = p.shape.reduce((a, b) => a * b, 1);
    params.push({ ...p, size, offset });
    offset += size;
    return size;
  };
  let size = config.imageSize;

  /** Declares a conv layer's parameters and summary line; returns the spec and its output size. */
  const conv = (name: string, cin: number, cout: number, k: number, stride: 1 | 2, padding: number, bias: boolean, inSize: number) => {
    const spec: ConvLayerSpec = { kind: 'conv', name, kernel: k, stride, padding, inChannels: cin, outChannels: cout, bias };
    let n = addParam({ name: `${name}.weight`, shape: [k, k, cin, cout], init: 'xavier-uniform', fanIn: cin * k * k, fanOut: cout * k * k });
    if (bias) n += addParam({ name: `${name}.bias`, shape: [cout], init: 'zeros' });
    const out = convOut(inSize, k, stride, padding);
    layers.push({
      name,
      type: `Conv2d ${k}x${k}/${stride} pad ${padding}${bias ? ' +bias' : ''}`,
      outputShape: [out, out, cout],
      params: n,
      flops: 2 * out * out * cout * k * k * cin + (bias ? out * out * cout : 0),
    });
    return { spec, out };
  };
  const bn = (name: string, channels: number, eps: number, mapSize: number): BatchNormSpec => {
    const spec: BatchNormSpec = { kind: 'bn', name, channels, eps };
    const n = addParam({ name: `${name}.gamma`, shape: [channels], init: 'ones' }) + addParam({ name: `${name}.beta`, shape: [channels], init: 'zeros' });
    batchNorms.push(spec);
    layers.push({ name, type: `BatchNorm eps ${eps}`, outputShape: [mapSize, mapSize, channels], params: n, flops: 4 * mapSize * mapSize * channels });
    return spec;
  };

  const stem = conv('stem.conv', config.inChannels, 64, 7, 2, 0, true, size);
  const stemConv = stem.spec;
  size = stem.out;
  if (size < 1) throw new ModelConfigError(`ResNet config: imageSize ${config.imageSize} is too small for the 7x7 stem`);
  const stemBn = bn('stem.bn', 64, STEM_BN_EPS, size);
  const pooled = convOut(size, 3, 2, 1);
  layers.push({ name: 'stem.pool', type: 'MaxPool 3x3/2 pad 1', outputShape: [pooled, pooled, 64], params: 0, flops: 9 * pooled * pooled * 64 });
  size = pooled;

  const stagePlan: Array<[number, number, boolean, 1 | 2]> = [
    [64, 64, false, 1], [64, 64, false, 1],
    [64, 128, true, 2], [128, 128, false, 1],
    [128, 256, true, 2], [256, 256, false, 1],
    [256, 512, true, 2], [512, 512, false, 1],
  ];
  const blocks: BlockSpec[] = stagePlan.map(([cin, cout, shortcut, stride], i) => {
    const name = `stage${Math.floor(i / 2) + 1}.block${(i % 2) + 1}`;
    const inSize = size;
    const conv1 = conv(`${name}.conv1`, cin, cout, 3, stride, 1, false, inSize);
    size = conv1.out;
    const bn1 = bn(`${name}.bn1`, cout, PYTORCH_BN_EPS, size);
    const conv2 = conv(`${name}.conv2`, cout, cout, 3, 1, 1, false, size);
    const bn2 = bn(`${name}.bn2`, cout, PYTORCH_BN_EPS, size);
    const block: BlockSpec = { name, conv1: conv1.spec, bn1, conv2: conv2.spec, bn2 };
    if (shortcut) block.shortcut = conv(`${name}.shortcut`, cin, cout, 1, stride, 0, true, inSize).spec;
    return block;
  });

  layers.push({ name: 'head.pool', type: `AvgPool over ${size}x${size}`, outputShape: [512], params: 0, flops: size * size * 512 });
  const fcParams =
    addParam({ name: 'head.fc.weight', shape: [512, config.classes], init: 'xavier-uniform', fanIn: 512, fanOut: config.classes }) +
    addParam({ name: 'head.fc.bias', shape: [config.classes], init: 'zeros' });
  layers.push({ name: 'head.fc', type: `Linear 512 -> ${config.classes}`, outputShape: [config.classes], params: fcParams, flops: 2 * 512 * config.classes + config.classes });

  return {
    config,
    stemConv,
    stemBn,
    blocks,
    params,
    paramCount: offset,
    batchNorms,
    bnStatCount: batchNorms.reduce((a, b) => a + 2 * b.channels, 0),
    layers,
    flopsPerImage: layers.reduce((a, l) => a + l.flops, 0),
  };
}

/**
 * The fewest values per channel a training-mode BatchNorm may normalise (batch x map area).
 * With 1 its output is beta whatever the input (PyTorch refuses that: "Expected more than 1
 * value per channel when training"). With 2 the normalised pair is (+a, -a), a = d/sqrt(d^2+eps)
 * for d half their difference: almost exactly +-1 whatever the input, so the true gradient,
 * (dy1-dy2) eps / (2 (d^2+eps)^1.5), is about 0, except where the two values nearly tie, where it
 * reaches 1/sqrt(eps) (316 at eps 1e-5) per BatchNorm. At 32x32 input and below the last stage's
 * maps are 1x1, so a per-rank batch of 2 multiplies those spikes over several BatchNorms: seen as
 * gradients of 2e8 and a NaN loss two steps later. With 3 or more the output keeps a degree of
 * freedom and the gradient its scale.
 */
export const MIN_BATCHNORM_VALUES = 3;

/** The smallest per-rank training batch for which every BatchNorm sees MIN_BATCHNORM_VALUES values per channel. */
export function minTrainingBatch(a: Architecture): number {
  const areas = a.batchNorms.map((bn) => {
    const [h, w] = a.layers.find((l) => l.name === bn.name)!.outputShape;
    return h * w;
  });
  return Math.ceil(MIN_BATCHNORM_VALUES / Math.min(...areas));
}
