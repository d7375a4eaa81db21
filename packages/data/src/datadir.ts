import os from 'node:os';
import path from 'node:path';

/**
 * Where data sets live unless `--data-dir` says otherwise: `$DTRAIN_DATA_DIR` when set, else
 * `~/.cache/dtrain/data`. A cache folder because everything there can be downloaded or rebuilt again.
 */
export function defaultDataDir(env: NodeJS.ProcessEnv = process.env, home: string = os.homedir()): string {
  const fromEnv = env.DTRAIN_DATA_DIR;
  if (fromEnv && fromEnv.trim() !== '') return path.resolve(fromEnv);
  return path.join(home, '.cache', 'dtrain', 'data');
}

/** `dir` when given, else the default. */
export function resolveDataDir(dir?: string): string {
  return dir ? path.resolve(dir) : defaultDataDir();
}
