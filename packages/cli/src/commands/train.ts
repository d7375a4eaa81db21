import path from 'node:path';
import { Command, Option } from '@commander-js/extra-typings';
import cliProgress from 'cli-progress';
import { DATASET_NAMES } from '@dtrain/data';
import {
  DEFAULTS,
  loadTrainData,
  resolveSettings,
  runTraining,
  type EpochMetrics,
  type StartInfo,
  type StepInfo,
  type TrainData,
  type TrainerHooks,
  type TrainSettingsInput,
} from '@dtrain/worker';
import { oneOf, UsageError } from '../errors.js';
import { addTrainOptions, preflightInitFile, settingsFromFlags, toUsage } from './train-options.js';

const BACKENDS = ['cpu', 'webgpu', 'gpu'] as const;

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

/** Step lines per epoch that `train` writes at least, when --log-every is not given. */
const STEP_LINES_PER_EPOCH = 10;

/**
 * The step-line interval when --log-every is not given. The library's default (a line every 50
 * steps) leaves a run of fewer steps, such as the README's first one (47), without a single step
 * line, and its report without a course; epochs of under 500 steps get a line every tenth of the
 * epoch or more often. Epochs of 500 steps or more keep the default.
 */
export function defaultLogEvery(stepsPerEpoch: number): number {
  return Math.max(1, Math.min(DEFAULTS.logEverySteps, Math.floor(stepsPerEpoch / STEP_LINES_PER_EPOCH)));
}

/**
 * A new run's data, loaded before runTraining creates the run folder (so that data that cannot be
 * read, such as CIFAR-10 before `data download`, leaves no empty folder behind), and its settings
 * with the step-line interval that fits its epoch.
 */
export async function prepareNewRun(input: TrainSettingsInput): Promise<{ settings: TrainSettingsInput; data: TrainData & { name: string } }> {
  const resolved = resolveSettings(input);
  const data = await loadTrainData(resolved);
  await preflightInitFile(resolved.initFile, { channels: data.train.channels, classes: data.train.classNames.length }, resolved.imageSize);
  // One process: about ceil(images / batch) steps an epoch (the trainer may fold a short last batch).
  const stepsPerEpoch = Math.ceil(data.train.count / (resolved.batchSize * resolved.accumulate));
  return {
    settings: { ...input, logEverySteps: input.logEverySteps ?? defaultLogEvery(stepsPerEpoch) },
    data: { ...data, name: resolved.dataset },
  };
}

/** The shared flag's help names the library's default; `train` chooses by epoch length (defaultLogEvery). */
function describeLogEvery(cmd: { readonly options: readonly Option[] }): void {
  const o = cmd.options.find((x) => x.long === '--log-every');
  if (o) o.description = `a step line in metrics.jsonl every N steps (default ${DEFAULTS.logEverySteps}, or a tenth of an epoch if that is fewer)`;
}

export function registerTrain(program: Command): void {
  const cmd = addTrainOptions(
    program
      .command('train')
      .description(
        'Train the ResNet in this process (one worker). Writes config.json, metrics.jsonl, a checkpoint per epoch and ' +
          'summary.json into the run folder. Fashion-MNIST needs no download; CIFAR-10 needs `dtrain data download cifar10`.',
      ),
  );
  describeLogEvery(cmd);
  cmd
    .addOption(new Option('--backend <kind>', 'cpu: tfjs-node (default); webgpu: any GPU with a Vulkan driver (Dawn); gpu: tfjs-node-gpu, needs CUDA 11.2 + cuDNN 8.1 (with --engine torch: CUDA through libtorch)').choices(BACKENDS).argParser(oneOf('--backend', BACKENDS)))
    .action(async (opts) => {
      if (!opts.resume && !opts.dataset && !opts.preset) {
        throw new UsageError(`choose a data set: --dataset ${DATASET_NAMES.join('|')} (or --preset tutorial), or --resume DIR`);
      }
      const flags = settingsFromFlags(opts, opts.backend);
      // A resumed run keeps its folder, data set and interval (unless --log-every is given).
      const fresh = opts.resume ? undefined : await prepareNewRun(flags).catch(toUsage);
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
          settings: fresh?.settings ?? flags,
          data: fresh?.data,
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
