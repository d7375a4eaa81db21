#!/usr/bin/env node
// Provisions the native TensorFlow library and the Node addon of @tensorflow/tfjs-node
// (and of @tensorflow/tfjs-node-gpu where CUDA is present). Runs as the root postinstall.
//
// Why this exists: tfjs-node's own install script downloads libtensorflow 2.9.1 and a
// prebuilt addon from Google storage. Where that host can be reached we run that script
// unchanged. Where it cannot (air-gapped machines, mirrors that only serve npm/PyPI), we
// build the addon from source against the C API inside a TensorFlow CPU wheel:
//   1. $DTRAIN_TF_WHEEL, a path to a tensorflow(-cpu) wheel, if set;
//   2. otherwise `pip download tensorflow-cpu==$DTRAIN_TF_WHEEL_VERSION` through pip's
//      configured index (a local mirror works; no network is needed if pip has it).
// Idempotent: when the addon already loads, nothing is done.
// Set DTRAIN_SKIP_TFJS_PROVISION=1 to skip entirely (e.g. a docs-only checkout).

import { spawnSync } from 'node:child_process';
import { createRequire } from 'node:module';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { nodeGypEnv } from './node-gyp-env.mjs';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const backendPkg = path.join(root, 'packages', 'backend', 'package.json');
const WHEEL_VERSION = process.env.DTRAIN_TF_WHEEL_VERSION ?? '2.21.0';
const DOWNLOAD_TIMEOUT_MS = Number(process.env.DTRAIN_TFJS_DOWNLOAD_TIMEOUT_S ?? 900) * 1000;
const cacheDir = path.join(root, 'node_modules', '.cache', 'dtrain-tf');

function log(msg) {
  console.log(`[provision-tfjs] ${msg}`);
}

function fail(msg) {
  console.error(`\n[provision-tfjs] ERROR: ${msg}\n`);
  process.exit(1);
}

function packageDir(name) {
  const req = createRequire(backendPkg);
  try {
    return path.dirname(req.resolve(`${name}/package.json`));
  } catch {
    return undefined;
  }
}

/** Loads the addon in a child process: a broken native library must not kill this script. */
function addonLoads(dir) {
  const r = spawnSync(process.execPath, ['-e', `require(${JSON.stringify(dir)})`], {
    encoding: 'utf8',
    timeout: 120_000,
  });
  return { ok: r.status === 0, stderr: (r.stderr ?? '').trim().split('\n').slice(-3).join('\n') };
}

/** tfjs-node's own route: download libtensorflow and the prebuilt addon from Google storage. */
function officialInstall(dir, libType) {
  log(`trying the official download for ${path.basename(dir)} (timeout ${DOWNLOAD_TIMEOUT_MS / 1000} s)`);
  const r = spawnSync(process.execPath, ['scripts/install.js', libType], {
    cwd: dir,
    stdio: 'inherit',
    env: nodeGypEnv(root),
    timeout: DOWNLOAD_TIMEOUT_MS,
  });
  return r.status === 0;
}

function findWheel() {
  const given = process.env.DTRAIN_TF_WHEEL;
  if (given) {
    if (!fs.existsSync(given)) fail(`DTRAIN_TF_WHEEL=${given} does not exist.`);
    return given;
  }
  fs.mkdirSync(cacheDir, { recursive: true });
  const cached = fs.readdirSync(cacheDir).find((f) => f.startsWith(`tensorflow_cpu-${WHEEL_VERSION}-`) && f.endsWith('.whl'));
  if (cached) return path.join(cacheDir, cached);
  const pip = ['python3', 'python'].find((p) => spawnSync(p, ['-m', 'pip', '--version']).status === 0);
  if (!pip) return undefined;
  log(`fetching tensorflow-cpu==${WHEEL_VERSION} through pip's configured index`);
  const r = spawnSync(
    pip,
    ['-m', 'pip', 'download', '--no-deps', '--only-binary=:all:', '-d', cacheDir, `tensorflow-cpu==${WHEEL_VERSION}`],
    { stdio: 'inherit', timeout: DOWNLOAD_TIMEOUT_MS },
  );
  if (r.status !== 0) return undefined;
  const got = fs.readdirSync(cacheDir).find((f) => f.startsWith('tensorflow_cpu-') && f.endsWith('.whl'));
  return got ? path.join(cacheDir, got) : undefined;
}

/** Copies the shared libraries and C API headers out of the wheel into tfjs-node's deps/. */
function stageFromWheel(dir, wheel) {
  const deps = path.join(dir, 'deps');
  fs.rmSync(deps, { recursive: true, force: true });
  fs.mkdirSync(path.join(deps, 'lib'), { recursive: true });
  fs.mkdirSync(path.join(deps, 'include'), { recursive: true });
  // A wheel is a zip; Python's zipfile reads it without needing `unzip` on the machine.
  const script = `
import sys, zipfile, os, shutil
wheel, deps = sys.argv[1], sys.argv[2]
wanted_lib = {'tensorflow/libtensorflow_cc.so.2', 'tensorflow/libtensorflow_framework.so.2'}
inc_roots = ('tensorflow/include/tensorflow/c/', 'tensorflow/include/tensorflow/core/platform/',
             'tensorflow/include/tsl/', 'tensorflow/include/xla/tsl/')
n = 0
with zipfile.ZipFile(wheel) as z:
    for m in z.namelist():
        if m in wanted_lib:
            dst = os.path.join(deps, 'lib', os.path.basename(m))
        elif m.startswith(inc_roots) and not m.endswith('/'):
            dst = os.path.join(deps, 'include', m[len('tensorflow/include/'):])
        else:
            continue
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        with z.open(m) as src, open(dst, 'wb') as out:
            shutil.copyfileobj(src, out, 1 << 20)
        n += 1
print(n)
`;
  const py = ['python3', 'python'].find((p) => spawnSync(p, ['--version']).status === 0);
  if (!py) fail('python3 is needed to unpack the TensorFlow wheel.');
  const r = spawnSync(py, ['-c', script, wheel, deps], { encoding: 'utf8' });
  if (r.status !== 0) fail(`could not unpack ${wheel}:\n${r.stderr}`);
  const lib = path.join(deps, 'lib');
  if (!fs.existsSync(path.join(lib, 'libtensorflow_cc.so.2'))) {
    fail(`${wheel} has no tensorflow/libtensorflow_cc.so.2; use a TensorFlow 2.x Linux wheel.`);
  }
  for (const [link, target] of [
    ['libtensorflow.so', 'libtensorflow_cc.so.2'],
    ['libtensorflow.so.2.9.1', 'libtensorflow_cc.so.2'], // tfjs-node's install.js skips its download when present
    ['libtensorflow_framework.so', 'libtensorflow_framework.so.2'],
    ['libtensorflow_framework.so.2.9.1', 'libtensorflow_framework.so.2'],
  ]) {
    fs.symlinkSync(target, path.join(lib, link));
  }
  log(`staged ${r.stdout.trim()} files from ${path.basename(wheel)}`);
}

function buildAddon(dir) {
  const req = createRequire(path.join(dir, 'package.json'));
  const preGyp = req.resolve('@mapbox/node-pre-gyp/bin/node-pre-gyp');
  log('building the tfjs-node addon from source (about 20 s)');
  const r = spawnSync(process.execPath, [preGyp, 'install', '--build-from-source'], {
    cwd: dir,
    stdio: 'inherit',
    env: nodeGypEnv(root),
  });
  return r.status === 0;
}

function provisionCpu() {
  const dir = packageDir('@tensorflow/tfjs-node');
  if (!dir) fail('@tensorflow/tfjs-node is not installed; run `pnpm install` from the repository root.');
  if (addonLoads(dir).ok) {
    log('@tensorflow/tfjs-node loads; nothing to do');
    return;
  }
  if (!process.env.DTRAIN_TF_WHEEL && officialInstall(dir, 'cpu') && addonLoads(dir).ok) {
    log('@tensorflow/tfjs-node ready (official libtensorflow)');
    return;
  }
  log('the official download is not reachable here; building against a TensorFlow CPU wheel instead');
  const wheel = findWheel();
  if (!wheel) {
    fail(
      'no libtensorflow could be provisioned for @tensorflow/tfjs-node.\n' +
        '  - With internet access, the official download from storage.googleapis.com is used;\n' +
        `  - otherwise point DTRAIN_TF_WHEEL at a tensorflow-cpu wheel (e.g. tensorflow_cpu-${WHEEL_VERSION}-cp311-...-manylinux...x86_64.whl),\n` +
        '    or make it available through pip\'s index (pip download tensorflow-cpu must succeed).\n' +
        'Then run `pnpm install` again.',
    );
  }
  stageFromWheel(dir, wheel);
  if (!buildAddon(dir)) fail('building the tfjs-node addon failed (see the compiler output above). A C++ compiler, make and python3 are needed.');
  const check = addonLoads(dir);
  if (!check.ok) fail(`the built addon does not load:\n${check.stderr}`);
  log('@tensorflow/tfjs-node ready (built against the TensorFlow wheel)');
}

/** The GPU addon is only provisioned where CUDA is present (or DTRAIN_TFJS_GPU=1 asks for it). */
function provisionGpu() {
  const wanted =
    process.env.DTRAIN_TFJS_GPU === '1' ||
    (process.env.DTRAIN_TFJS_GPU !== '0' && os.platform() === 'linux' && spawnSync('nvidia-smi', ['-L']).status === 0);
  if (!wanted) return;
  const dir = packageDir('@tensorflow/tfjs-node-gpu');
  if (!dir) fail('@tensorflow/tfjs-node-gpu is not installed.');
  if (addonLoads(dir).ok) {
    log('@tensorflow/tfjs-node-gpu loads; nothing to do');
    return;
  }
  if (officialInstall(dir, 'gpu') && addonLoads(dir).ok) {
    log('@tensorflow/tfjs-node-gpu ready');
    return;
  }
  // Not fatal: CPU training still works, and `dtrain doctor` / `launch --gpus` say what is missing.
  console.warn(
    '[provision-tfjs] WARNING: the GPU backend could not be provisioned. It needs the official\n' +
      '  libtensorflow 2.9.1 GPU build (download from storage.googleapis.com), CUDA 11.2 and cuDNN 8.1.\n' +
      '  `pnpm cli doctor` reports the details; CPU training is unaffected.',
  );
}

if (process.env.DTRAIN_SKIP_TFJS_PROVISION === '1') {
  log('skipped (DTRAIN_SKIP_TFJS_PROVISION=1)');
} else {
  provisionCpu();
  provisionGpu();
}
