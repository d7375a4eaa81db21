import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { describe, expect, it } from 'vitest';
import { filterTfLog, tfMinLogLevel } from './quiet-load.js';

const pkg = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');

// What libtensorflow 2.21 writes while it loads (captured here), and an error as it would come.
const PREAMBLE = 'WARNING: All log messages before absl::InitializeLog() is called are written to STDERR';
const INFO = 'I0000 00:00:1796586894.014914   24280 port.cc:153] oneDNN custom operations are on. You may see slightly different numerical results...';
const INFO_2 = 'I0000 00:00:1796586894.434541   24280 cpu_feature_guard.cc:227] This TensorFlow binary is optimized to use available CPU instructions';
const INFO_2_CONT = 'To enable the following instructions: AVX2 AVX512F FMA, in other operations, rebuild TensorFlow with the appropriate compiler flags.';
const WARN = 'W0000 00:00:1796586894.500000   24280 dso_loader.cc:61] Could not load dynamic library libcudart.so.12';
const ERROR = 'E0000 00:00:1796586894.600000   24280 cuda_driver.cc:152] failed call to cuInit: UNKNOWN ERROR (303)';
const LOG = [PREAMBLE, INFO, INFO_2, INFO_2_CONT, WARN, ERROR, ''].join('\n');

describe('filterTfLog: what TF_CPP_MIN_LOG_LEVEL keeps of the load-time log', () => {
  it('0 keeps everything', () => {
    expect(filterTfLog(LOG, 0)).toBe(LOG);
  });
  it('1 drops INFO messages with their continuation lines, and the preamble', () => {
    expect(filterTfLog(LOG, 1)).toBe([WARN, ERROR, ''].join('\n'));
  });
  it('2 (the default here) keeps errors only', () => {
    expect(filterTfLog(LOG, 2)).toBe(`${ERROR}\n`);
  });
  it('keeps what is not TensorFlow log (text before any message, other programs)', () => {
    expect(filterTfLog(`some library: hello\n${INFO}\n`, 2)).toBe('some library: hello\n');
  });
  it('reads TF_CPP_MIN_LOG_LEVEL as TensorFlow does', () => {
    expect(tfMinLogLevel({})).toBe(0);
    expect(tfMinLogLevel({ TF_CPP_MIN_LOG_LEVEL: '2' })).toBe(2);
    expect(tfMinLogLevel({ TF_CPP_MIN_LOG_LEVEL: 'x' })).toBe(0);
  });
});

describe('loading the native library', () => {
  const load = (env: NodeJS.ProcessEnv) =>
    spawnSync(process.execPath, ['--import', 'tsx', '-e', "const { loadBackend } = await import('./src/index.ts'); await loadBackend('cpu'); console.log('loaded');"], {
      cwd: pkg,
      env: { ...process.env, ...env },
      encoding: 'utf8',
      timeout: 120_000,
    });

  it('the module that holds back the log was built by pnpm install', () => {
    expect(fs.existsSync(path.join(pkg, 'native', 'build', 'Release', 'dtrain_loader.node'))).toBe(true);
  });

  it('prints no start-up banner by default, and all of it with TF_CPP_MIN_LOG_LEVEL=0', () => {
    const quiet = load({ TF_CPP_MIN_LOG_LEVEL: undefined });
    expect(quiet.stdout).toBe('loaded\n');
    expect(quiet.stderr).toBe('');
    // The same load at level 0 shows the lines (so the first case can fail), through the filter.
    const loud = load({ TF_CPP_MIN_LOG_LEVEL: '0' });
    expect(loud.stdout).toBe('loaded\n');
    expect(loud.stderr).toContain(PREAMBLE);
    expect(loud.stderr).toMatch(/^I\d{4} .*\] oneDNN custom operations are on/m);
  }, 60_000);
});
