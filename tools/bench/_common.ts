// Shared by the benchmarks: statistics, the machine description, and the results file.
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

export function machine() {
  return {
    cpus: os.cpus().length,
    cpuModel: os.cpus()[0]?.model ?? '?',
    memoryGiB: +(os.totalmem() / 2 ** 30).toFixed(1),
    node: process.version,
    platform: `${os.platform()} ${os.arch()}`,
    loadAverage: os.loadavg().map((x) => +x.toFixed(2)),
  };
}

export function writeResults(name: string, data: unknown): string {
  const dir = path.join(REPO_ROOT, 'bench-results');
  fs.mkdirSync(dir, { recursive: true });
  const file = path.join(dir, `${name}.json`);
  const tmp = `${file}.tmp-${process.pid}`;
  fs.writeFileSync(tmp, JSON.stringify(data, null, 2) + '\n');
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
