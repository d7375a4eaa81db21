// `dtrain runs [--dir runs] [--json]`: the runs under runs/, oldest first, one line each.
import path from 'node:path';
import { Command } from '@commander-js/extra-typings';
import { listRunDirs, readRun, runStatus, type RunFiles, type RunStatus } from '@dtrain/worker';

export interface RunRow {
  run: string;
  /** When the run started (config.json's createdAt), ISO 8601. */
  date: string | null;
  dataset: string;
  worldSize: number;
  /** Epochs finished / epochs planned. */
  epochsDone: number;
  epochs: number;
  /** Test accuracy (0-1) after the last finished epoch. */
  finalTestAcc: number | null;
  /** Wall time of the run so far, resumes included. */
  durationSec: number | null;
  /**
   * 'stopped': an elastic run that fell below --min-workers and wrote a checkpoint (--resume
   * continues it); 'diverged': its loss stopped being finite; 'incomplete': no summary.json.
   */
  status: RunStatus;
}

export function runRow(r: RunFiles): RunRow {
  const last = r.epochs[r.epochs.length - 1];
  const s = r.summary;
  return {
    run: r.name,
    date: r.config.createdAt ?? null,
    dataset: r.config.settings.dataset,
    worldSize: r.config.worldSize,
    epochsDone: s?.status === 'completed' ? s.epochs : (last?.epoch ?? 0),
    epochs: r.config.settings.epochs,
    // `??`: a summary's NaN (no finished epoch) reads back as null.
    finalTestAcc: s?.finalTestAcc ?? last?.testAcc ?? null,
    durationSec: s?.totalSec ?? last?.totalElapsedSec ?? null,
    status: runStatus(r),
  };
}

function duration(s: number | null): string {
  if (s === null || !Number.isFinite(s)) return '-';
  const h = Math.floor(s / 3600);
  const m = Math.floor((s % 3600) / 60);
  const sec = Math.round(s % 60);
  return h > 0 ? `${h}h${String(m).padStart(2, '0')}m` : m > 0 ? `${m}m${String(sec).padStart(2, '0')}s` : `${(Math.round(s * 10) / 10).toFixed(1)}s`;
}

export function formatRunTable(rows: RunRow[]): string {
  const header = ['run', 'date', 'dataset', 'world', 'epochs', 'test acc', 'duration', 'status'];
  const cells = rows.map((r) => [
    r.run,
    r.date ? r.date.slice(0, 16).replace('T', ' ') : '-',
    r.dataset,
    String(r.worldSize),
    `${r.epochsDone}/${r.epochs}`,
    r.finalTestAcc === null ? '-' : `${(r.finalTestAcc * 100).toFixed(2)}%`,
    duration(r.durationSec),
    r.status,
  ]);
  const widths = header.map((h, i) => Math.max(h.length, ...cells.map((c) => c[i].length)));
  const right = new Set([3, 4, 5, 6]);
  const fmt = (c: string[]) => c.map((x, i) => (right.has(i) ? x.padStart(widths[i]) : x.padEnd(widths[i]))).join('  ').trimEnd();
  return [fmt(header), ...cells.map(fmt)].join('\n');
}

/** Every readable run under `root`; folders that cannot be read are returned as problems. */
export async function collectRuns(root: string): Promise<{ rows: RunRow[]; problems: string[] }> {
  const rows: RunRow[] = [];
  const problems: string[] = [];
  for (const dir of await listRunDirs(root)) {
    try {
      rows.push(runRow(await readRun(dir)));
    } catch (err) {
      problems.push((err as Error).message);
    }
  }
  return { rows, problems };
}

export function registerRuns(program: Command) {
  program
    .command('runs')
    .description('List past runs: date, dataset, world size, epochs, final test accuracy, duration')
    .option('--dir <dir>', 'folder holding the runs', 'runs')
    .option('--json', 'print JSON')
    .action(async (opts) => {
      const root = path.resolve(opts.dir);
      const { rows, problems } = await collectRuns(root);
      for (const p of problems) console.error(`skipped ${p}`);
      if (opts.json) {
        console.log(JSON.stringify(rows, null, 2));
        return;
      }
      if (rows.length === 0) {
        console.log(`no runs in ${root} (pnpm cli train writes them there)`);
        return;
      }
      console.log(formatRunTable(rows));
    });
}
