// Shared by the benchmarks: statistics, the machine description, and the results file.
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

export const REPO_ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');

export interface Stats {
  n: number;
  mean: number;
  median: number;
  min: number;
  max: number;
  /** Sample standard deviation. */
  stdev: number;
}

export function stats(xs: number[]): Stats {
  const s = [...xs].sort((a, b) => a - b);
  const n = s.length;
  const mean = s.reduce((a, b) => a + b, 0) / n;
  const median = n % 2 ? s[(n - 1) / 2] : (s[n / 2 - 1] + s[n / 2]) / 2;
  const stdev = n > 1 ? Math.sqrt(s.reduce((a, b) => a + (b - mean) ** 2, 0) / (n - 1)) : 0;
  return { n, mean, median, min: s[0], max: s[n - 1], stdev };
}

/**
 * The vector extensions that decide which oneDNN kernels run (AVX-512 without AMX is where its
 * 1x1 convolution divided by zero): a figure is only comparable between machines that share them.
 */
function cpuFeatures(): string[] {
  try {
    const flags = /^flags\s*:(.*)$/m.exec(fs.readFileSync('/proc/cpuinfo', 'utf8'))?.[1].trim().split(/\s+/) ?? [];
    return ['avx2', 'fma', 'avx512f', 'avx512_bf16', 'avx512_vnni', 'amx_tile'].filter((f) => flags.includes(f));
  } catch {
    return [];
  }
}

export function machine() {
  return {
    cpus: os.cpus().length,
    cpuModel: os.cpus()[0]?.model ?? '?',
    cpuFeatures: cpuFeatures(),
    memoryGiB: +(os.totalmem() / 2 ** 30).toFixed(1),
    node: process.version,
    platform: `${os.platform()} ${os.arch()}`,
    loadAverage: os.loadavg().map((x) => +x.toFixed(2)),
  };
}

/** The commit the benchmark ran on, and whether the checkout had changes to tracked files. */
export function gitRevision(): { commit: string; dirty: boolean } | null {
  try {
    const git = (...args: string[]) => execFileSync('git', args, { cwd: REPO_ROOT, encoding: 'utf8', stdio: ['ignore', 'pipe', 'ignore'] }).trim();
    return { commit: git('rev-parse', 'HEAD'), dirty: git('status', '--porcelain', '--untracked-files=no') !== '' };
  } catch {
    // The bundle of pnpm bundle:gpu-check has no .git: it says which commit it was built from.
    try {
      const b = JSON.parse(fs.readFileSync(path.join(REPO_ROOT, 'bundle.json'), 'utf8')) as { commit: string };
      return { commit: b.commit.replace(/-dirty$/, ''), dirty: b.commit.endsWith('-dirty') };
    } catch {
      return null;
    }
  }
}

/**
 * Writes bench-results/<name>.json atomically, with what makes a figure traceable: the command as
 * typed, the git revision, when it was written and the machine with its load at the end (the
 * benchmark's own fields, every sample among them, follow). README cites copies under results/.
 */
export function writeResults(name: string, data: Record<string, unknown>): string {
  // $DTRAIN_BENCH_RESULTS_DIR: where a run elsewhere collects them (tools/gpu-check.sh).
  const dir = process.env.DTRAIN_BENCH_RESULTS_DIR ?? path.join(REPO_ROOT, 'bench-results');
  fs.mkdirSync(dir, { recursive: true });
  const file = path.join(dir, `${name}.json`);
  const tmp = `${file}.tmp-${process.pid}`;
  const provenance = { command: `pnpm bench ${process.argv.slice(2).join(' ')}`.trim(), git: gitRevision(), writtenAt: new Date().toISOString(), machineAtEnd: machine() };
  fs.writeFileSync(tmp, JSON.stringify({ ...provenance, ...data }, null, 2) + '\n');
  fs.renameSync(tmp, file);
  return file;
}

/** `--key value` and `--flag` parsing for benchmarks: small, strict, with named errors. */
export function parseArgs(args: string[], spec: Record<string, string>): Record<string, string> {
  const out: Record<string, string> = { ...spec };
  for (let i = 0; i < args.length; i++) {
    const a = args[i];
    if (a === '--help' || a === '-h') {
      console.log(`options: ${Object.entries(spec).map(([k, v]) => `--${k} ${v}`).join(' ')}`);
      process.exit(0);
    }
    const key = a.replace(/^--/, '');
    if (!a.startsWith('--') || !(key in spec)) throw new Error(`unknown option '${a}' (known: ${Object.keys(spec).map((k) => `--${k}`).join(', ')})`);
    const v = args[++i];
    if (v === undefined) throw new Error(`option ${a} needs a value`);
    out[key] = v;
  }
  return out;
}
