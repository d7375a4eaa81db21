// Every setting of a training run, their defaults, the tutorial preset, and the checks. The CLI
// passes only the flags the user gave; everything else comes from here, so the library, the CLI
// and (later) the launcher cannot disagree on a default.

import { DATASET_NAMES, datasetShape } from '@dtrain/data';
import { TrainSettingsError } from './errors.js';
import { LR_SCALINGS, LR_SCHEDULES, type LrScaling, type LrSchedule } from './schedule.js';

/** cpu: tfjs-node; webgpu: Dawn (any GPU with a Vulkan, Metal or D3D12 driver); gpu: tfjs-node-gpu (CUDA 11.2). */
export type BackendKind = 'cpu' | 'webgpu' | 'gpu';
export const BACKEND_KINDS = ['cpu', 'webgpu', 'gpu'] as const satisfies readonly BackendKind[];
/** tfjs: TensorFlow.js (the backends above); torch: the libtorch engine (@dtrain/torch-engine), on the CPU or, with backend 'gpu', CUDA. */
export type EngineKind = 'tfjs' | 'torch';
export const ENGINE_KINDS = ['tfjs', 'torch'] as const satisfies readonly EngineKind[];
/** torch engine on CUDA: fp32 (TF32 off), tf32 (PyTorch's default for cuDNN convolutions), bf16 (autocast). The CPU computes fp32. */
export type Precision = 'fp32' | 'tf32' | 'bf16';
export const PRECISIONS = ['fp32', 'tf32', 'bf16'] as const satisfies readonly Precision[];
export const PRESETS = ['tutorial', 'fashion-mnist', 'cifar10'] as const;
export const AUGMENT_NAMES = ['crop', 'flip'] as const;
export type AugmentName = (typeof AUGMENT_NAMES)[number];
/**
 * What `augment: true` means per data set: crop and flip for clothes and objects, whose mirror
 * images are as likely as they are (a digit's is not: a data set of digits would list only crop).
 * A data set not listed (data given in memory) gets both.
 */
export const DATASET_AUGMENT: Record<string, AugmentName[]> = { 'fashion-mnist': ['crop', 'flip'], cifar10: ['crop', 'flip'] };
/**
 * Padding of the random crop, per data set: 4 of CIFAR-10's 32 pixels (torchvision's usual
 * choice), 2 of Fashion-MNIST's 28 (a 4-pixel shift of a centred garment crops it: the preset's
 * first run underfit with 4, train accuracy below test). Others: 4.
 */
export const AUGMENT_CROP_PADDING: Record<string, number> = { cifar10: 4, 'fashion-mnist': 2 };

/** The augmentation a run's settings ask for, as the batch pipeline takes it (undefined: none). */
export function augmentationOf(s: Pick<TrainSettings, 'augment' | 'dataset'>): { cropPadding: number; horizontalFlip: boolean } | undefined {
  const names = s.augment === true ? (DATASET_AUGMENT[s.dataset] ?? [...AUGMENT_NAMES]) : s.augment === false ? [] : s.augment;
  if (names.length === 0) return undefined;
  return { cropPadding: names.includes('crop') ? (AUGMENT_CROP_PADDING[s.dataset] ?? 4) : 0, horizontalFlip: names.includes('flip') };
}
export type PresetName = (typeof PRESETS)[number];

export interface TrainSettings {
  /** 'fashion-mnist' | 'cifar10', or the name of data passed in memory (tests). */
  dataset: string;
  preset: PresetName | null;
  epochs: number;
  /** Per worker and micro-batch; the global batch is batchSize x accumulate x worldSize. */
  batchSize: number;
  /**
   * Micro-batches of batchSize whose gradients one optimiser step sums before its one all-reduce
   * (DDP's no_sync): a rank's step holds batchSize x accumulate images. lr is the rate of that step.
   */
  accumulate: number;
  evalBatchSize: number;
  /** The single-worker learning rate; see `lrScaling` and `warmupEpochs` (schedule.ts). */
  lr: number;
  /** 'linear': lr x world size (Goyal et al. 2017); 'none': lr as given, whatever the global batch. */
  lrScaling: LrScaling;
  /** Epochs of linear warmup, per step: from lr to the scaled rate with linear scaling, else from 0. */
  warmupEpochs: number;
  /** The rate after warmup (schedule.ts): constant, cosine, step (milestones) or onecycle. */
  lrSchedule: LrSchedule;
  /** cosine: the rate at the end of the run. */
  lrFinal: number;
  /** step: 0-based epochs from which the rate is multiplied by lrGamma once more, ascending. */
  lrMilestones: number[];
  lrGamma: number;
  momentum: number;
  /** Nesterov momentum (torch.optim.SGD's nesterov=True); needs momentum > 0. */
  nesterov: boolean;
  weightDecay: number;
  /** No weight decay on biases and BatchNorm scale and shift (timm's filter_bias_and_bn). */
  skipNormBiasDecay: boolean;
  /** Of the training loss, as PyTorch's CrossEntropyLoss(label_smoothing); in [0, 1). */
  labelSmoothing: number;
  /** Square model input; images are resized (bilinear) from the data set's size. */
  imageSize: number;
  seed: number;
  /** Use only the first N training / test images (null: all). */
  limitTrain: number | null;
  limitTest: number | null;
  /**
   * Augmentation while training, by name: 'crop' (random crop, AUGMENT_CROP_PADDING) and 'flip' (horizontal
   * flip); true: the data set's usual ones (DATASET_AUGMENT); false or []: none.
   */
  augment: boolean | AugmentName[];
  backend: BackendKind;
  /** Which engine computes the network; every rank of a run uses the same one, and a checkpoint of one resumes on the other. */
  engine: EngineKind;
  /** Arithmetic of the torch engine on CUDA; the CPU and the tfjs engine compute fp32. */
  precision: Precision;
  /** webgpu: accept a software adapter (Mesa's lavapipe: tests); every worker may share it. */
  allowSoftwareGpu: boolean;
  /** webgpu: several workers of a machine on its one GPU, on purpose (WebGPU cannot give each its own). */
  shareGpu: boolean;
  /** The only initialisation the model has: Xavier-uniform weights, zero biases (the tutorial's). */
  init: 'xavier-uniform';
  /** Start from the weights and BatchNorm statistics of this safetensors file (the tutorial's state_dict: cli export), not from `init`. */
  initFile: string | null;
  /** A `kind: 'step'` line in metrics.jsonl every this many steps. */
  logEverySteps: number;
  /** Checkpoints kept in the run folder (the newest ones). */
  keepCheckpoints: number;
  /** Data directory (null: $DTRAIN_DATA_DIR, else ~/.cache/dtrain/data). */
  dataDir: string | null;
}

/** What a caller may give; unset fields come from the preset, then the defaults. */
export type TrainSettingsInput = Partial<TrainSettings>;


export const DEFAULTS = {
  preset: null,
  epochs: 10,
  batchSize: 64,
  accumulate: 1,
  evalBatchSize: 128,
  lr: 0.01,
  lrScaling: 'none',
  warmupEpochs: 0,
  lrSchedule: 'constant',
  lrFinal: 0,
  lrMilestones: [] as number[],
  lrGamma: 0.1,
  momentum: 0,
  nesterov: false,
  weightDecay: 0,
  skipNormBiasDecay: false,
  labelSmoothing: 0,
  seed: 0,
  limitTrain: null,
  limitTest: null,
  augment: false,
  backend: 'cpu',
  engine: 'tfjs',
  precision: 'fp32',
  allowSoftwareGpu: false,
  shareGpu: false,
  init: 'xavier-uniform',
  initFile: null,
  logEverySteps: 50,
  keepCheckpoints: 2,
  dataDir: null,
} as const satisfies Omit<TrainSettings, 'dataset' | 'imageSize'>;

/** The tutorial's recipe: CIFAR-10 at 96x96, batch 64 (test 128), plain SGD lr 0.01, 20 epochs, Xavier init. */
export const TUTORIAL_PRESET = {
  dataset: 'cifar10',
  imageSize: 96,
  batchSize: 64,
  evalBatchSize: 128,
  lr: 0.01,
  momentum: 0,
  weightDecay: 0,
  epochs: 20,
  augment: false,
  init: 'xavier-uniform',
} as const satisfies Partial<TrainSettings>;

/**
 * A modern recipe on the same network (what timm and the CIFAR ResNet papers use): SGD with
 * Nesterov momentum 0.9, lr 0.1 for a global batch of 128 with one epoch of warmup and a cosine to
 * 0, weight decay 5e-4 on weights only, label smoothing 0.1, random crop and flip. Fashion-MNIST is
 * resized to 32x32 so that the 7x7/2 stem leaves a 13x13 map (11x11 at 28). For N workers give
 * --batch-size 128/N: the same global batch, the same lr.
 */
const MODERN_RECIPE = {
  batchSize: 128,
  evalBatchSize: 500,
  lr: 0.1,
  momentum: 0.9,
  nesterov: true,
  weightDecay: 5e-4,
  skipNormBiasDecay: true,
  labelSmoothing: 0.1,
  lrSchedule: 'cosine',
  warmupEpochs: 1,
  augment: true,
} as const satisfies Partial<TrainSettings>;

export const FASHION_MNIST_PRESET = { ...MODERN_RECIPE, dataset: 'fashion-mnist', imageSize: 32, epochs: 30 } as const satisfies Partial<TrainSettings>;

/** The same ideas on CIFAR-10 at the tutorial's 96x96 (not run on this project's CPU machines: a GPU's work). */
export const CIFAR10_PRESET = { ...MODERN_RECIPE, dataset: 'cifar10', imageSize: 96, epochs: 30 } as const satisfies Partial<TrainSettings>;

const PRESET_SETTINGS: Record<PresetName, Partial<TrainSettings>> = { tutorial: TUTORIAL_PRESET, 'fashion-mnist': FASHION_MNIST_PRESET, cifar10: CIFAR10_PRESET };

/**
 * Settings that decide the trajectory of the weights: a resumed run must keep them, or it is not
 * the same run. (`epochs` may grow on resume; `evalBatchSize`, logging and paths may change.)
 */
export const TRAJECTORY_SETTINGS = [
  'dataset',
  'batchSize',
  'accumulate',
  'lr',
  'lrScaling',
  'warmupEpochs',
  'lrSchedule',
  'lrFinal',
  'lrMilestones',
  'lrGamma',
  'momentum',
  'nesterov',
  'weightDecay',
  'skipNormBiasDecay',
  'labelSmoothing',
  'imageSize',
  'seed',
  'limitTrain',
  'limitTest',
  'augment',
  'init',
  'initFile',
] as const satisfies readonly (keyof TrainSettings)[];

/** Whether two values of a setting are the same (lrMilestones is an array). */
export function sameSetting(a: unknown, b: unknown): boolean {
  return a === b || JSON.stringify(a) === JSON.stringify(b);
}

function positiveInteger(name: string, v: unknown): void {
  if (!Number.isInteger(v) || (v as number) <= 0) throw new TrainSettingsError(name, `${name} must be a positive integer, got ${String(v)}`);
}

function nonNegativeNumber(name: string, v: unknown): void {
  if (typeof v !== 'number' || !Number.isFinite(v) || v < 0) throw new TrainSettingsError(name, `${name} must be a non-negative number, got ${String(v)}`);
}

/**
 * Fills in a full settings object: explicit values first, then the preset's, then the defaults.
 * `inMemoryData` names data the caller supplies (tests); otherwise the data set must be a real one.
 */
export function resolveSettings(input: TrainSettingsInput, inMemoryData?: { name: string; imageSize: number }): TrainSettings {
  const preset = input.preset ?? null;
  if (preset !== null && !(PRESETS as readonly string[]).includes(preset)) {
    throw new TrainSettingsError('preset', `unknown preset '${preset}': choose one of ${PRESETS.join(', ')}`);
  }
  const fromPreset: Partial<TrainSettings> = preset === null ? {} : PRESET_SETTINGS[preset];
  const defined = Object.fromEntries(Object.entries(input).filter(([, v]) => v !== undefined)) as TrainSettingsInput;
  const dataset = defined.dataset ?? fromPreset.dataset ?? inMemoryData?.name;
  if (dataset === undefined) throw new TrainSettingsError('dataset', `no data set given: choose one of ${DATASET_NAMES.join(', ')} (or a preset)`);
  if (inMemoryData ? dataset !== inMemoryData.name : !(DATASET_NAMES as readonly string[]).includes(dataset)) {
    throw new TrainSettingsError('dataset', `unknown data set '${dataset}': choose one of ${DATASET_NAMES.join(', ')}`);
  }
  const imageSize = defined.imageSize ?? fromPreset.imageSize ?? inMemoryData?.imageSize ?? datasetShape(dataset)!.size; // a known name here (checked above)
  const s: TrainSettings = { ...DEFAULTS, ...fromPreset, ...defined, dataset, preset, imageSize };
  validateSettings(s);
  return s;
}

export function validateSettings(s: TrainSettings): void {
  for (const k of ['epochs', 'batchSize', 'accumulate', 'evalBatchSize', 'imageSize', 'logEverySteps', 'keepCheckpoints'] as const) positiveInteger(k, s[k]);
  for (const k of ['lr', 'momentum', 'weightDecay'] as const) nonNegativeNumber(k, s[k]);
  if (!(s.lr > 0)) throw new TrainSettingsError('lr', `lr must be positive, got ${s.lr}`);
  if (!(LR_SCALINGS as readonly string[]).includes(s.lrScaling)) {
    throw new TrainSettingsError('lrScaling', `lrScaling must be one of ${LR_SCALINGS.join(', ')}, got '${String(s.lrScaling)}'`);
  }
  nonNegativeNumber('warmupEpochs', s.warmupEpochs);
  validateSchedule(s);
  if (s.momentum >= 1) throw new TrainSettingsError('momentum', `momentum must be below 1, got ${s.momentum}`);
  for (const k of ['nesterov', 'skipNormBiasDecay'] as const) if (typeof s[k] !== 'boolean') throw new TrainSettingsError(k, `${k} must be true or false, got ${String(s[k])}`);
  if (s.nesterov && !(s.momentum > 0)) throw new TrainSettingsError('nesterov', 'nesterov needs a momentum above 0 (e.g. momentum 0.9), as torch.optim.SGD');
  if (!(typeof s.labelSmoothing === 'number' && s.labelSmoothing >= 0 && s.labelSmoothing < 1)) {
    throw new TrainSettingsError('labelSmoothing', `labelSmoothing must be in [0, 1), got ${String(s.labelSmoothing)}`);
  }
  if (!Number.isSafeInteger(s.seed) || s.seed < 0) throw new TrainSettingsError('seed', `seed must be a non-negative integer, got ${s.seed}`);
  if (s.limitTrain !== null) positiveInteger('limitTrain', s.limitTrain);
  if (s.limitTest !== null) positiveInteger('limitTest', s.limitTest);
  // The model's stem (7x7 stride 2, no padding) and three stride-2 stages need at least 7 pixels.
  if (s.imageSize < 7) throw new TrainSettingsError('imageSize', `imageSize must be at least 7 (the 7x7 stem), got ${s.imageSize}`);
  if (s.imageSize > 512) throw new TrainSettingsError('imageSize', `imageSize must be at most 512, got ${s.imageSize}`);
  if (!(BACKEND_KINDS as readonly string[]).includes(s.backend)) throw new TrainSettingsError('backend', `backend must be one of ${BACKEND_KINDS.join(', ')}, got '${String(s.backend)}'`);
  if (!(ENGINE_KINDS as readonly string[]).includes(s.engine)) throw new TrainSettingsError('engine', `engine must be one of ${ENGINE_KINDS.join(', ')}, got '${String(s.engine)}'`);
  if (!(PRECISIONS as readonly string[]).includes(s.precision)) throw new TrainSettingsError('precision', `precision must be one of ${PRECISIONS.join(', ')}, got '${String(s.precision)}'`);
  if (s.engine === 'torch' && s.backend === 'webgpu') throw new TrainSettingsError('engine', 'engine torch runs on the CPU or on CUDA (--backend cpu|gpu), not on WebGPU: use --engine tfjs with --backend webgpu');
  if (s.precision !== 'fp32' && !(s.engine === 'torch' && s.backend === 'gpu')) {
    throw new TrainSettingsError('precision', `precision ${s.precision} needs the torch engine on GPUs (--engine torch --gpus N); ${s.engine === 'torch' ? 'the CPU' : 'the tfjs engine'} computes fp32`);
  }
  for (const k of ['allowSoftwareGpu', 'shareGpu'] as const) if (typeof s[k] !== 'boolean') throw new TrainSettingsError(k, `${k} must be true or false, got ${String(s[k])}`);
  if (typeof s.augment !== 'boolean' && !(Array.isArray(s.augment) && s.augment.every((a) => (AUGMENT_NAMES as readonly string[]).includes(a)))) {
    throw new TrainSettingsError('augment', `augment must be true, false or a list of ${AUGMENT_NAMES.join(', ')}, got ${JSON.stringify(s.augment)}`);
  }
  if (s.initFile !== null && (typeof s.initFile !== 'string' || s.initFile === '')) throw new TrainSettingsError('initFile', `initFile must be a file name or null, got ${JSON.stringify(s.initFile)}`);
  if (s.init !== 'xavier-uniform') throw new TrainSettingsError('init', `init must be 'xavier-uniform' (the only one the model has), got '${String(s.init)}'`);
}

function validateSchedule(s: TrainSettings): void {
  if (!(LR_SCHEDULES as readonly string[]).includes(s.lrSchedule)) {
    throw new TrainSettingsError('lrSchedule', `lrSchedule must be one of ${LR_SCHEDULES.join(', ')}, got '${String(s.lrSchedule)}'`);
  }
  // A constant or step run may be extended by a resume, so its warmup may outlast the first leg;
  // a cosine run ends where planned.
  if (s.lrSchedule === 'cosine' && s.warmupEpochs >= s.epochs) {
    throw new TrainSettingsError('warmupEpochs', `warmupEpochs ${s.warmupEpochs} is not shorter than the run (${s.epochs} epochs): nothing of the cosine would follow the warmup`);
  }
  if (s.lrSchedule === 'onecycle' && s.warmupEpochs > 0) {
    throw new TrainSettingsError('warmupEpochs', 'warmupEpochs must be 0 with lrSchedule onecycle, which warms up itself (its first 30%)');
  }
  nonNegativeNumber('lrFinal', s.lrFinal);
  if (s.lrFinal !== 0 && s.lrSchedule !== 'cosine') throw new TrainSettingsError('lrFinal', `lrFinal is the end of the cosine schedule (--lr-schedule cosine); lrSchedule is '${s.lrSchedule}'`);
  const m = s.lrMilestones;
  if (!Array.isArray(m) || m.some((x, i) => !Number.isInteger(x) || x < 1 || (i > 0 && x <= m[i - 1]))) {
    throw new TrainSettingsError('lrMilestones', `lrMilestones must be ascending epochs of at least 1, got ${JSON.stringify(m)}`);
  }
  if (!(typeof s.lrGamma === 'number' && s.lrGamma > 0 && s.lrGamma <= 1)) throw new TrainSettingsError('lrGamma', `lrGamma must be in (0, 1], got ${String(s.lrGamma)}`);
  if (s.lrSchedule === 'step' && m.length === 0) throw new TrainSettingsError('lrMilestones', 'lrMilestones must name the epochs from which the step schedule multiplies the rate by lrGamma, e.g. --lr-milestones 30,60');
  if (s.lrSchedule !== 'step' && (m.length > 0 || s.lrGamma !== DEFAULTS.lrGamma)) {
    throw new TrainSettingsError(m.length > 0 ? 'lrMilestones' : 'lrGamma', `lrMilestones and lrGamma belong to the step schedule (--lr-schedule step); lrSchedule is '${s.lrSchedule}'`);
  }
}

/**
 * The settings of a resumed run: the checkpoint's, with `epochs` (and paths, logging, eval batch)
 * taken from the caller. A trajectory setting the caller gives must equal the checkpoint's.
 */
export function resumeSettings(savedRaw: TrainSettings, input: TrainSettingsInput, file: string): TrainSettings {
  const saved = withScheduleDefaults(savedRaw);
  for (const k of TRAJECTORY_SETTINGS) {
    const v = input[k];
    if (v !== undefined && !sameSetting(v, saved[k])) {
      throw new TrainSettingsError(
        k,
        `${k} is ${JSON.stringify(saved[k])} in ${file}; a resumed run keeps the settings it started with, so leave ${k} out (or start a new run)`,
      );
    }
  }
  if ((saved.lrSchedule === 'cosine' || saved.lrSchedule === 'onecycle') && input.epochs !== undefined && input.epochs !== saved.epochs) {
    throw new TrainSettingsError('epochs', `the ${saved.lrSchedule} schedule of the run in ${file} ends at epoch ${saved.epochs}: a resumed run keeps its length, so leave --epochs out (or start a new run)`);
  }
  if (input.preset !== undefined && input.preset !== saved.preset) {
    throw new TrainSettingsError('preset', `the run in ${file} used preset ${JSON.stringify(saved.preset)}; leave --preset out when resuming`);
  }
  const s: TrainSettings = {
    ...saved,
    epochs: input.epochs ?? saved.epochs,
    evalBatchSize: input.evalBatchSize ?? saved.evalBatchSize,
    logEverySteps: input.logEverySteps ?? saved.logEverySteps,
    keepCheckpoints: input.keepCheckpoints ?? saved.keepCheckpoints,
    backend: input.backend ?? saved.backend,
    engine: input.engine ?? saved.engine,
    precision: input.precision ?? saved.precision,
    allowSoftwareGpu: input.allowSoftwareGpu ?? saved.allowSoftwareGpu,
    shareGpu: input.shareGpu ?? saved.shareGpu,
    dataDir: input.dataDir !== undefined ? input.dataDir : saved.dataDir,
  };
  validateSettings(s);
  return s;
}

/**
 * Settings of checkpoints written before a setting existed: they trained as its default does
 * (a constant, unscaled lr; no accumulation, no Nesterov, decay of every tensor, no label smoothing).
 */
export function withScheduleDefaults(s: TrainSettings): TrainSettings {
  return {
    ...s,
    accumulate: s.accumulate ?? DEFAULTS.accumulate,
    initFile: s.initFile ?? DEFAULTS.initFile,
    nesterov: s.nesterov ?? DEFAULTS.nesterov,
    skipNormBiasDecay: s.skipNormBiasDecay ?? DEFAULTS.skipNormBiasDecay,
    labelSmoothing: s.labelSmoothing ?? DEFAULTS.labelSmoothing,
    lrSchedule: s.lrSchedule ?? DEFAULTS.lrSchedule,
    lrFinal: s.lrFinal ?? DEFAULTS.lrFinal,
    lrMilestones: s.lrMilestones ?? [],
    lrGamma: s.lrGamma ?? DEFAULTS.lrGamma,
    lrScaling: s.lrScaling ?? DEFAULTS.lrScaling, warmupEpochs: s.warmupEpochs ?? DEFAULTS.warmupEpochs, allowSoftwareGpu: s.allowSoftwareGpu ?? DEFAULTS.allowSoftwareGpu, shareGpu: s.shareGpu ?? DEFAULTS.shareGpu, engine: s.engine ?? DEFAULTS.engine, precision: s.precision ?? DEFAULTS.precision };
}
