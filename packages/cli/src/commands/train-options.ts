// The training flags `train` and `launch` share, defined once: same names, parsers, checks and
// help texts, and one mapping from parsed flags to the trainer's settings.
import path from 'node:path';
import { Command, Option, type OptionValues } from '@commander-js/extra-typings';
import { DATASET_NAMES } from '@dtrain/data';
import { AUGMENT_NAMES, DEFAULTS, ENGINE_KINDS, LR_SCALINGS, LR_SCHEDULES, PRECISIONS, PRESETS, checkInitFile, SafetensorsError, TrainSettingsError, type AugmentName, type TrainSettingsInput } from '@dtrain/worker';
import { UsageError, nonNegativeInt, nonNegativeNumber, oneOf, positiveInt } from '../errors.js';

/** Setting name -> the flag a user types, so errors name what they can change. */
export const FLAGS: Record<string, string> = {
  dataset: '--dataset',
  preset: '--preset',
  epochs: '--epochs',
  batchSize: '--batch-size',
  accumulate: '--accumulate',
  evalBatchSize: '--eval-batch-size',
  lr: '--lr',
  lrScaling: '--lr-scaling',
  warmupEpochs: '--warmup-epochs',
  lrSchedule: '--lr-schedule',
  lrFinal: '--lr-final',
  lrMilestones: '--lr-milestones',
  lrGamma: '--lr-gamma',
  momentum: '--momentum',
  nesterov: '--nesterov',
  weightDecay: '--weight-decay',
  skipNormBiasDecay: '--skip-norm-bias-decay',
  labelSmoothing: '--label-smoothing',
  imageSize: '--image-size',
  seed: '--seed',
  limitTrain: '--limit-train',
  limitTest: '--limit-test',
  augment: '--augment',
  initFile: '--init',
  backend: '--backend',
  engine: '--engine',
  precision: '--precision',
  allowSoftwareGpu: '--allow-software-gpu',
  shareGpu: '--share-gpu',
  logEverySteps: '--log-every',
  keepCheckpoints: '--keep-checkpoints',
  dataDir: '--data-dir',
  out: '--out',
};

export function positiveNumber(flag: string) {
  return (value: string): number => {
    const n = Number(value);
    if (!Number.isFinite(n) || n <= 0) throw new UsageError(`${flag} must be a positive number, got '${value}'`);
    return n;
  };
}

function milestones(value: string): number[] {
  const m = value.split(',').map((x) => Number(x.trim()));
  if (m.length === 0 || m.some((x) => !Number.isInteger(x) || x < 1)) throw new UsageError(`--lr-milestones must be comma-separated epochs of at least 1 (e.g. 30,60), got '${value}'`);
  return m;
}

function augmentNames(value: string): AugmentName[] {
  const names = value.split(',').map((x) => x.trim());
  const bad = names.find((n) => !(AUGMENT_NAMES as readonly string[]).includes(n));
  if (bad !== undefined) throw new UsageError(`--augment takes ${AUGMENT_NAMES.join(', ')} (comma-separated), got '${bad}'`);
  return [...new Set(names)] as AugmentName[];
}

function labelSmoothingValue(value: string): number {
  const n = nonNegativeNumber('--label-smoothing')(value);
  if (n >= 1) throw new UsageError(`--label-smoothing must be below 1 (0.1 is usual), got '${value}'`);
  return n;
}

function momentumValue(value: string): number {
  const n = nonNegativeNumber('--momentum')(value);
  if (n >= 1) throw new UsageError(`--momentum must be below 1, got '${value}'`);
  return n;
}

/** Adds every training flag (not --backend: `train` and `launch` each take their own). */
export function addTrainOptions<A extends unknown[], O extends OptionValues, G extends OptionValues>(cmd: Command<A, O, G>) {
  return cmd
    .addOption(new Option('--dataset <name>', 'data set').choices(DATASET_NAMES).argParser(oneOf('--dataset', DATASET_NAMES)))
    .addOption(new Option('--preset <name>', 'tutorial: CIFAR-10, 96x96, batch 64 (test 128), plain SGD lr 0.01, 20 epochs, Xavier init. fashion-mnist (32x32, 20 epochs) and cifar10 (96x96, 30 epochs): batch 128, SGD lr 0.1 with Nesterov momentum 0.9, 1 warmup epoch then cosine, weight decay 5e-4 on weights only, label smoothing 0.1, crop and flip (for N workers give --batch-size 128/N). Flags override a preset').choices(PRESETS).argParser(oneOf('--preset', PRESETS)))
    .option('--epochs <n>', `epochs to train (default ${DEFAULTS.epochs}); with --resume, the new total`, positiveInt('--epochs'))
    .option('--batch-size <n>', `images per step, per worker (default ${DEFAULTS.batchSize}; global batch = this x workers, x --accumulate)`, positiveInt('--batch-size'))
    .option('--accumulate <k>', 'sum the gradients of K batches per optimiser step, then all-reduce once (DDP’s no_sync): a global batch of batch x K x workers in the memory of one batch; --lr is the rate of that step (default 1)', positiveInt('--accumulate'))
    .option('--eval-batch-size <n>', `images per evaluation batch (default ${DEFAULTS.evalBatchSize})`, positiveInt('--eval-batch-size'))
    .option('--lr <x>', `SGD learning rate of one worker (default ${DEFAULTS.lr}); see --lr-scaling`, positiveNumber('--lr'))
    .addOption(
      new Option('--lr-scaling <rule>', `linear: lr x workers, for a global batch of batch x workers (Goyal et al. 2017); none: lr as given (default ${DEFAULTS.lrScaling})`).choices(LR_SCALINGS).argParser(oneOf('--lr-scaling', LR_SCALINGS)),
    )
    .option('--warmup-epochs <k>', 'ramp the lr linearly, every step, over the first K epochs: from --lr to lr x workers with --lr-scaling linear, else from 0 (default 0)', nonNegativeNumber('--warmup-epochs'))
    .addOption(
      new Option('--lr-schedule <name>', `the lr after warmup, as PyTorch's schedulers: constant (default), cosine (to --lr-final at the last epoch), step (x --lr-gamma at each of --lr-milestones) or onecycle (OneCycleLR's defaults; warms up itself)`)
        .choices(LR_SCHEDULES)
        .argParser(oneOf('--lr-schedule', LR_SCHEDULES)),
    )
    .option('--lr-final <x>', 'cosine: the lr at the end of the run (default 0)', nonNegativeNumber('--lr-final'))
    .option('--lr-milestones <epochs>', 'step: comma-separated epochs from which the lr is multiplied by --lr-gamma once more, e.g. 30,60', milestones)
    .option('--lr-gamma <x>', `step: the factor at each milestone (default ${DEFAULTS.lrGamma})`, positiveNumber('--lr-gamma'))
    .option('--momentum <x>', `SGD momentum, PyTorch semantics (default ${DEFAULTS.momentum})`, momentumValue)
    .option('--nesterov', 'Nesterov momentum, as torch.optim.SGD(nesterov=True) (needs --momentum)')
    .option('--weight-decay <x>', `L2 weight decay, PyTorch semantics (default ${DEFAULTS.weightDecay})`, nonNegativeNumber('--weight-decay'))
    .option('--skip-norm-bias-decay', 'no weight decay on biases and BatchNorm scale and shift, as timm’s filter_bias_and_bn (default: every parameter, as PyTorch)')
    .option('--label-smoothing <x>', 'label smoothing of the training loss, as CrossEntropyLoss(label_smoothing=x), in [0, 1) (default 0; the test loss stays plain cross-entropy)', labelSmoothingValue)
    .option('--image-size <s>', 'model input size in pixels (default: the data set’s, 28 Fashion-MNIST, 32 CIFAR-10)', positiveInt('--image-size'))
    .option('--seed <s>', `seed of the initial weights, shuffling and augmentation (default ${DEFAULTS.seed})`, nonNegativeInt('--seed'))
    .option('--out <dir>', 'run folder (default: a new runs/<date>-<dataset>-<id> in the current folder)')
    .option('--resume <dir>', 'continue the run in this folder from its newest checkpoint')
    .option('--limit-train <n>', 'train on the first N training images only', positiveInt('--limit-train'))
    .option('--limit-test <n>', 'evaluate on the first N test images only', positiveInt('--limit-test'))
    .option('--data-dir <dir>', 'data directory (default: $DTRAIN_DATA_DIR, else ~/.cache/dtrain/data)')
    .option('--init <file>', 'start from the weights and BatchNorm statistics of a .safetensors file holding the tutorial’s PyTorch state_dict (pnpm cli export writes one) instead of Xavier init')
    .option('--augment [names]', `augmentation while training (off by default, as in the tutorial): alone, the data set's usual ones (crop and flip for Fashion-MNIST and CIFAR-10), or named: ${AUGMENT_NAMES.join(', ')} (crop: random crop with padding 2 for Fashion-MNIST, 4 for CIFAR-10; flip: horizontal flip), e.g. --augment crop; seeded per rank and epoch`, augmentNames)
    .option('--log-every <steps>', `a step line in metrics.jsonl every N steps (default ${DEFAULTS.logEverySteps})`, positiveInt('--log-every'))
    .option('--keep-checkpoints <n>', `checkpoints kept in the run folder (default ${DEFAULTS.keepCheckpoints})`, positiveInt('--keep-checkpoints'))
    .addOption(
      new Option('--engine <name>', `what computes the network: tfjs (TensorFlow.js; default) or torch (libtorch, PyTorch's kernels: CPU, or CUDA with --gpus; built by pnpm install where a torch is found, see pnpm cli doctor)`)
        .choices(ENGINE_KINDS)
        .argParser(oneOf('--engine', ENGINE_KINDS)),
    )
    .addOption(
      new Option('--precision <p>', 'torch engine on GPUs: fp32 (float32, TF32 off; default), tf32 (PyTorch’s default: TF32 convolutions) or bf16 (autocast; float32 weights, BatchNorm and loss)')
        .choices(PRECISIONS)
        .argParser(oneOf('--precision', PRECISIONS)),
    )
    .option('--allow-software-gpu', 'webgpu: train on a software GPU (Mesa lavapipe: the CPU behind a Vulkan device; for tests), which is refused otherwise');
}

/** What addTrainOptions parsed. */
export interface TrainFlags {
  dataset?: string;
  preset?: string;
  epochs?: number;
  batchSize?: number;
  accumulate?: number;
  evalBatchSize?: number;
  lr?: number;
  lrScaling?: string;
  warmupEpochs?: number;
  lrSchedule?: string;
  lrFinal?: number;
  lrMilestones?: number[];
  lrGamma?: number;
  momentum?: number;
  nesterov?: true;
  weightDecay?: number;
  skipNormBiasDecay?: true;
  labelSmoothing?: number;
  imageSize?: number;
  seed?: number;
  limitTrain?: number;
  limitTest?: number;
  augment?: true | AugmentName[];
  init?: string;
  logEvery?: number;
  keepCheckpoints?: number;
  dataDir?: string;
  allowSoftwareGpu?: true;
  engine?: string;
  precision?: string;
}

/** The trainer's settings from the flags; unset flags are left out (preset, then defaults, fill them). */
export function settingsFromFlags(o: TrainFlags, backend?: TrainSettingsInput['backend']): TrainSettingsInput {
  const all: TrainSettingsInput = {
    dataset: o.dataset as TrainSettingsInput['dataset'],
    preset: o.preset as TrainSettingsInput['preset'],
    epochs: o.epochs,
    batchSize: o.batchSize,
    accumulate: o.accumulate,
    evalBatchSize: o.evalBatchSize,
    lr: o.lr,
    lrScaling: o.lrScaling as TrainSettingsInput['lrScaling'],
    warmupEpochs: o.warmupEpochs,
    lrSchedule: o.lrSchedule as TrainSettingsInput['lrSchedule'],
    lrFinal: o.lrFinal,
    lrMilestones: o.lrMilestones,
    lrGamma: o.lrGamma,
    momentum: o.momentum,
    nesterov: o.nesterov,
    weightDecay: o.weightDecay,
    skipNormBiasDecay: o.skipNormBiasDecay,
    labelSmoothing: o.labelSmoothing,
    imageSize: o.imageSize,
    seed: o.seed,
    limitTrain: o.limitTrain,
    limitTest: o.limitTest,
    augment: o.augment,
    initFile: o.init !== undefined ? path.resolve(o.init) : undefined,
    backend,
    engine: o.engine as TrainSettingsInput['engine'],
    precision: o.precision as TrainSettingsInput['precision'],
    allowSoftwareGpu: o.allowSoftwareGpu,
    logEverySteps: o.logEvery,
    keepCheckpoints: o.keepCheckpoints,
    // Workers and resumes may run from another folder: the data directory is absolute from here on.
    dataDir: o.dataDir !== undefined ? path.resolve(o.dataDir) : undefined,
  };
  return Object.fromEntries(Object.entries(all).filter(([, v]) => v !== undefined)) as TrainSettingsInput;
}

/**
 * --init checked before anything starts (a run folder, a worker): the file's header must describe
 * the network of this data set and image size (the values are read once, by the run).
 * `shape` is the data's channels and classes.
 */
export async function preflightInitFile(file: string | null, shape: { channels: number; classes: number } | undefined, imageSize: number): Promise<void> {
  if (file === null || shape === undefined) return;
  await checkInitFile(file, { inChannels: shape.channels, classes: shape.classes, imageSize }).catch((err: unknown) => {
    throw err instanceof SafetensorsError ? new UsageError(`--init ${err.message}`) : err;
  });
}

/** A settings error from the trainer, rephrased with the flag the user typed. */
export function toUsage(err: unknown): never {
  if (err instanceof TrainSettingsError) {
    const flag = FLAGS[err.setting] ?? err.setting;
    throw new UsageError(err.message.replace(new RegExp(`^${err.setting}\\b`), flag).replace(new RegExp(`\\b(leave) ${err.setting}\\b`), `$1 ${flag}`));
  }
  throw err;
}
