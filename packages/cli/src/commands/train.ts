import path from 'node:path';
import { Command, Option } from '@commander-js/extra-typings';
import cliProgress from 'cli-progress';
import { DATASET_NAMES } from '@dtrain/data';
import {
  PRESETS,
  DEFAULTS,
  TrainSettingsError,
  runTraining,
  type EpochMetrics,
  type StartInfo,
  type StepInfo,
  type TrainerHooks,
  type TrainSettingsInput,
} from '@dtrain/worker';
import { UsageError, nonNegativeInt, nonNegativeNumber, positiveInt } from '../errors.js';

/** Setting name -> the flag a user types, so errors name what they can change. */
const FLAGS: Record<string, string> = {
  dataset: '--dataset',
  preset: '--preset',
  epochs: '--epochs',
  batchSize: '--batch-size',
  evalBatchSize: '--eval-batch-size',
  lr: '--lr',
  momentum: '--momentum',
  weightDecay: '--weight-decay',
  imageSize: '--image-size',
  seed: '--seed',
  limitTrain: '--limit-train',
  limitTest: '--limit-test',
  augment: '--augment',
  backend: '--backend',
  logEverySteps: '--log-every',
  keepCheckpoints: '--keep-checkpoints',
  dataDir: '--data-dir',
  out: '--out',
};

function positiveNumber(flag: string) {
  return (value: string): number => {
    const n = Number(value);
    if (!Number.isFinite(n) || n <= 0) throw new UsageError(`${flag} must be a positive number, got '${value}'`);
    return n;
  };
}

function momentumValue(value: string): number {
  const n = nonNegativeNumber('--momentum')(value);
  if (n >= 1) throw new UsageError(`--momentum must be below 1, got '${value}'`);
  return n;
}

const pct = (x: number) => `${(100 * x).toFixed(2)}%`;

/** The tutorial's per-epoch line: epoch, loss, train accuracy, test accuracy, time, images/s. */
export function formatEpochLine(m: EpochMetrics): string {
  const w = String(m.epochs).length;
  return (
    `epoch ${String(m.epoch).padStart(w)}/${m.epochs}  loss ${m.loss.toFixed(4)}  train acc ${pct(m.trainAcc)}  ` +
    `test acc ${pct(m.testAcc)}  test loss ${m.testLoss.toFixed(4)}  ${m.elapsedSec.toFixed(1)} s  ${m.imagesPerSec.toFixed(1)} img/s`
  );
}

/** A progress bar within an epoch on a terminal; off a terminal, a plain line every 10% of the epoch. */
export function epochProgress(out: NodeJS.WriteStream = process.stderr): TrainerHooks & { stop(): void } {
  let bar: cliProgress.SingleBar | undefined;
  let epochs = 0;
  let windowStart = performance.now();
  let windowImages = 0;
  let lossSum = 0;
  let correct = 0;
  let seen = 0;
  let lastTenth = 0;
  const stop = () => {
    bar?.stop();
    bar = undefined;
  };
  return {
    stop,
    onStart(info: StartInfo) {
      epochs = info.epochs;
    },
    onEpochStart(epoch: number, steps: number) {
      lossSum = correct = seen = windowImages = lastTenth = 0;
      windowStart = performance.now();
      if (out.isTTY) {
        bar = new cliProgress.SingleBar(
          {
            format: `epoch ${epoch}/${epochs} [{bar}] {value}/{total} steps | loss {loss} | acc {acc} | {ips} img/s | {eta_formatted} left`,
            stream: out,
            hideCursor: true,
            etaBuffer: 20,
          },
          cliProgress.Presets.shades_classic,
        );
        bar.start(steps, 0, { loss: '-', acc: '-', ips: '-' });
      }
    },
    onStep(s: StepInfo) {
      lossSum += s.loss * s.n;
      correct += s.correct;
      seen += s.n;
      windowImages += s.n;
      const secs = (performance.now() - windowStart) / 1000;
      const ips = secs > 0 ? (windowImages / secs).toFixed(1) : '-';
      if (bar) {
        bar.update(s.stepInEpoch, { loss: (lossSum / seen).toFixed(4), acc: pct(correct / seen), ips });
        return;
      }
      const tenth = Math.floor((10 * s.stepInEpoch) / s.stepsInEpoch);
      if (tenth > lastTenth && s.stepInEpoch < s.stepsInEpoch) {
        lastTenth = tenth;
        out.write(
          `epoch ${s.epoch}/${epochs} step ${s.stepInEpoch}/${s.stepsInEpoch} (${tenth * 10}%)  loss ${(lossSum / seen).toFixed(4)}  ` +
            `train acc ${pct(correct / seen)}  ${ips} img/s\n`,
        );
      }
    },
    onEvalStart(epoch: number, testImages: number) {
      stop();
      if (!out.isTTY) out.write(`epoch ${epoch}/${epochs}: evaluating on ${testImages} test images\n`);
    },
  };
}

function toUsage(err: unknown): never {
  if (err instanceof TrainSettingsError) {
    const flag = FLAGS[err.setting] ?? err.setting;
    throw new UsageError(err.message.replace(new RegExp(`^${err.setting}\\b`), flag).replace(new RegExp(`\\b(leave) ${err.setting}\\b`), `$1 ${flag}`));
  }
  throw err;
}

export function registerTrain(program: Command): void {
  program
    .command('train')
    .description(
      'Train the ResNet in this process (one worker). Writes config.json, metrics.jsonl, a checkpoint per epoch and ' +
        'summary.json into the run folder. Fashion-MNIST needs no download; CIFAR-10 needs `dtrain data download cifar10`.',
    )
    .addOption(new Option('--dataset <name>', 'data set').choices(DATASET_NAMES))
    .addOption(new Option('--preset <name>', 'tutorial: CIFAR-10, 96x96, batch 64 (test 128), plain SGD lr 0.01, 20 epochs, Xavier init; flags override it').choices(PRESETS))
    .option('--epochs <n>', `epochs to train (default ${DEFAULTS.epochs}); with --resume, the new total`, positiveInt('--epochs'))
    .option('--batch-size <n>', `images per step, per worker (default ${DEFAULTS.batchSize})`, positiveInt('--batch-size'))
    .option('--eval-batch-size <n>', `images per evaluation batch (default ${DEFAULTS.evalBatchSize})`, positiveInt('--eval-batch-size'))
    .option('--lr <x>', `SGD learning rate (default ${DEFAULTS.lr})`, positiveNumber('--lr'))
    .option('--momentum <x>', `SGD momentum, PyTorch semantics (default ${DEFAULTS.momentum})`, momentumValue)
    .option('--weight-decay <x>', `L2 weight decay, PyTorch semantics (default ${DEFAULTS.weightDecay})`, nonNegativeNumber('--weight-decay'))
    .option('--image-size <s>', 'model input size in pixels (default: the data set’s, 28 Fashion-MNIST, 32 CIFAR-10)', positiveInt('--image-size'))
    .option('--seed <s>', `seed of the initial weights, shuffling and augmentation (default ${DEFAULTS.seed})`, nonNegativeInt('--seed'))
    .option('--out <dir>', 'run folder (default: a new runs/<date>-<dataset>-<id> in the current folder)')
    .option('--resume <dir>', 'continue the run in this folder from its newest checkpoint')
    .option('--limit-train <n>', 'train on the first N training images only', positiveInt('--limit-train'))
    .option('--limit-test <n>', 'evaluate on the first N test images only', positiveInt('--limit-test'))
    .option('--data-dir <dir>', 'data directory (default: $DTRAIN_DATA_DIR, else ~/.cache/dtrain/data)')
    .option('--augment', 'random crop (padding 4) and horizontal flip while training (off by default, as in the tutorial)')
    .addOption(new Option('--backend <kind>', 'native TensorFlow backend (default cpu)').choices(['cpu', 'gpu'] as const))
    .option('--log-every <steps>', `a step line in metrics.jsonl every N steps (default ${DEFAULTS.logEverySteps})`, positiveInt('--log-every'))
    .option('--keep-checkpoints <n>', `checkpoints kept in the run folder (default ${DEFAULTS.keepCheckpoints})`, positiveInt('--keep-checkpoints'))
    .action(async (opts) => {
      if (!opts.resume && !opts.dataset && !opts.preset) {
        throw new UsageError(`choose a data set: --dataset ${DATASET_NAMES.join('|')} (or --preset tutorial), or --resume DIR`);
      }
      const settings: TrainSettingsInput = {
        dataset: opts.dataset,
        preset: opts.preset,
        epochs: opts.epochs,
        batchSize: opts.batchSize,
        evalBatchSize: opts.evalBatchSize,
        lr: opts.lr,
        momentum: opts.momentum,
        weightDecay: opts.weightDecay,
        imageSize: opts.imageSize,
        seed: opts.seed,
        limitTrain: opts.limitTrain,
        limitTest: opts.limitTest,
        augment: opts.augment,
        backend: opts.backend,
        logEverySteps: opts.logEvery,
        keepCheckpoints: opts.keepCheckpoints,
        dataDir: opts.dataDir !== undefined ? path.resolve(opts.dataDir) : undefined,
      };
      const progress = epochProgress();
      let runDir: string | null = null;
      const onSignal = (sig: NodeJS.Signals) => {
        progress.stop();
        const hint = runDir ? `; continue from the last finished epoch with: pnpm cli train --resume ${path.relative(process.cwd(), runDir) || '.'}` : '';
        process.stderr.write(`\ninterrupted (${sig})${hint}\n`);
        process.exit(130);
      };
      process.once('SIGINT', onSignal);
      process.once('SIGTERM', onSignal);
      try {
        const result = await runTraining({
          settings,
          resume: opts.resume,
          out: opts.out,
          hooks: {
            ...progress,
            onStart(info) {
              runDir = info.runDir;
              progress.onStart?.(info);
              const from = info.resumedFromEpoch !== null ? `resuming after epoch ${info.resumedFromEpoch}, ` : '';
              console.log(
                `training on ${info.trainImages} images, testing on ${info.testImages}; ${from}epochs ${info.startEpoch}..${info.epochs}, ` +
                  `${info.stepsPerEpoch} steps per epoch; run folder ${info.runDir}`,
              );
            },
            onEpochEnd(m) {
              progress.stop();
              console.log(formatEpochLine(m));
            },
          },
        }).catch(toUsage);
        const s = result.summary;
        console.log(
          `done: ${s.epochs} epochs, final test acc ${pct(s.finalTestAcc)} (best ${pct(s.bestTestAcc)} at epoch ${s.bestEpoch}), ` +
            `train acc ${pct(s.finalTrainAcc)}, ${s.totalSec.toFixed(1)} s, ${s.imagesPerSec.toFixed(1)} img/s; run folder ${s.runDir}`,
        );
      } finally {
        progress.stop();
        process.off('SIGINT', onSignal);
        process.off('SIGTERM', onSignal);
      }
    });
}
