#!/usr/bin/env node
// Builds the torch engine's add-on (native/*.cc) against a libtorch, from `pnpm install` (prepare)
// and before tests. Where no libtorch is found, or it cannot be used, it builds nothing and says
// why in one line; everything else works as before (the engine is then unavailable, and
// `dtrain doctor` and `--engine torch` repeat that line).
//
// Where libtorch comes from, first found:
//   1. $DTRAIN_LIBTORCH: a libtorch folder (pytorch.org's zip) or a torch package folder (both
//      hold include/ and lib/);
//   2. the torch package of python3 (`import torch`; on a GPU machine its CUDA build);
//   3. `pip download torch==$DTRAIN_TORCH_WHEEL_VERSION` (default 2.13.0+cpu) through pip's
//      configured index, unpacked (headers and libraries only) into node_modules/.cache.
// DTRAIN_TORCH_ENGINE=off builds nothing. `--force` rebuilds an up-to-date add-on.
import { spawn, spawnSync } from 'node:child_process';
import { existsSync, mkdirSync, readFileSync, readdirSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const pkg = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const root = path.resolve(pkg, '..', '..');
const native = path.join(pkg, 'native');
// --out DIR: build elsewhere (tests of the skip lines use a temporary folder).
const outArg = process.argv.indexOf('--out');
const out = outArg > 0 ? path.resolve(process.argv[outArg + 1]) : path.join(native, 'build');
const addon = path.join(out, 'dtrain_torch.node');
const infoFile = path.join(out, 'build-info.json');
const SOURCES = ['engine.cc', 'binding.cc'];
const MIN_VERSION = [2, 4]; // at::autocast::set_autocast_enabled(device_type, ...) and friends
const WHEEL_VERSION = process.env.DTRAIN_TORCH_WHEEL_VERSION ?? '2.13.0+cpu';

const log = (msg) => console.log(`[torch-engine] ${msg}`);

/** Writes build-info.json saying why nothing was built (the line the engine's users will see). */
function skip(why) {
  mkdirSync(out, { recursive: true });
  rmSync(addon, { force: true });
  writeFileSync(infoFile, `${JSON.stringify({ built: false, why }, null, 2)}\n`);
  console.warn(`[torch-engine] not built: ${why}`);
  process.exit(0);
}

/** include/ and lib/ of a folder that holds a libtorch, or undefined. */
function libtorchAt(dir, source) {
  const include = path.join(dir, 'include');
  const lib = path.join(dir, 'lib');
  if (!existsSync(path.join(include, 'ATen', 'ATen.h')) || !existsSync(path.join(lib, 'libtorch_cpu.so'))) return undefined;
  return { dir, include, lib, source };
}

function fromPython() {
  const r = spawnSync('python3', ['-c', 'import os, torch; print(os.path.dirname(torch.__file__))'], { encoding: 'utf8', timeout: 120_000 });
  return r.status === 0 ? libtorchAt(r.stdout.trim(), 'python3 torch') : undefined;
}

/** pip download of the torch wheel, unpacked once into node_modules/.cache (headers and C++ libraries). */
function fromPip() {
  const cache = path.join(root, 'node_modules', '.cache', 'dtrain-torch');
  const dir = path.join(cache, `libtorch-${WHEEL_VERSION}`);
  const ready = libtorchAt(dir, `torch ${WHEEL_VERSION} wheel`);
  if (ready) return ready;
  log(`fetching torch==${WHEEL_VERSION} through pip's configured index`);
  const wheels = path.join(cache, 'wheels');
  const dl = spawnSync('python3', ['-m', 'pip', 'download', '--no-deps', '--only-binary=:all:', '-d', wheels, `torch==${WHEEL_VERSION}`], { encoding: 'utf8', timeout: 900_000 });
  if (dl.status !== 0) return undefined;
  const wheel = readdirSync(wheels).find((f) => f.startsWith(`torch-${WHEEL_VERSION.split('+')[0]}`) && f.endsWith('.whl'));
  if (!wheel) return undefined;
  // Only what a C++ program needs: no Python bindings, no test libraries.
  const unpack = `
import os, sys, zipfile, shutil
wheel, dst = sys.argv[1], sys.argv[2]
skip = ('libtorch_python', 'libtorchbind_test', 'libjitbackend_test', 'libbackend_with_compiler', 'libaoti_custom_ops')
with zipfile.ZipFile(wheel) as z:
    for m in z.namelist():
        if m.endswith('/') or not (m.startswith('torch/include/') or m.startswith('torch/lib/')) or any(s in m for s in skip):
            continue
        p = os.path.join(dst, m[len('torch/'):])
        os.makedirs(os.path.dirname(p), exist_ok=True)
        with z.open(m) as src, open(p, 'wb') as f:
            shutil.copyfileobj(src, f, 1 << 20)
`;
  rmSync(dir, { recursive: true, force: true });
  const r = spawnSync('python3', ['-c', unpack, path.join(wheels, wheel), `${dir}.partial`], { encoding: 'utf8' });
  if (r.status !== 0) return undefined;
  rmSync(path.join(wheels, wheel), { force: true });
  spawnSync('mv', [`${dir}.partial`, dir]);
  return libtorchAt(dir, `torch ${WHEEL_VERSION} wheel`);
}

function findLibtorch() {
  const env = process.env.DTRAIN_LIBTORCH;
  if (env) {
    const found = libtorchAt(path.resolve(env), 'DTRAIN_LIBTORCH');
    if (!found) skip(`DTRAIN_LIBTORCH=${env} holds no libtorch (expected include/ATen/ATen.h and lib/libtorch_cpu.so): point it at a libtorch or torch package folder`);
    return found;
  }
  return fromPython() ?? fromPip();
}

function versionOf(lt) {
  // torch/version.h (2.4+), which newer releases split into torch/headeronly/version.h.
  const headers = [['torch', 'csrc', 'api', 'include', 'torch', 'version.h'], ['torch', 'headeronly', 'version.h']].map((p) => path.join(lt.include, ...p));
  const text = headers.filter((h) => existsSync(h)).map((h) => readFileSync(h, 'utf8')).join('\n');
  const part = (k) => text.match(new RegExp(`#define TORCH_VERSION_${k} (\\d+)`))?.[1];
  if (part('MAJOR') === undefined) skip(`${lt.dir}: no TORCH_VERSION_MAJOR in ${headers.join(' or ')}; is it a libtorch?`);
  return `${part('MAJOR')}.${part('MINOR')}.${part('PATCH')}`;
}

/** 1 when libc10 exports the C++11 ABI's std::string (every torch 2.x wheel), 0 for the old ABI. */
function cxx11Abi(lt) {
  const r = spawnSync('nm', ['-D', '--defined-only', path.join(lt.lib, 'libc10.so')], { encoding: 'utf8', maxBuffer: 64 << 20 });
  if (r.status !== 0) skip(`cannot read the symbols of ${path.join(lt.lib, 'libc10.so')} (nm: ${r.error?.message ?? r.stderr.trim()}); install binutils`);
  return r.stdout.includes('__cxx11') ? 1 : 0;
}

function nodeIncludes() {
  const req = createRequire(path.join(pkg, 'package.json'));
  const addonApi = path.dirname(req.resolve('node-addon-api/package.json'));
  const nodeInclude = [process.env.npm_config_nodedir && path.join(process.env.npm_config_nodedir, 'include', 'node'), path.resolve(path.dirname(process.execPath), '..', 'include', 'node')].find(
    (d) => d && existsSync(path.join(d, 'node_api.h')),
  );
  if (!nodeInclude) skip(`Node's headers (node_api.h) are not next to ${process.execPath} and npm_config_nodedir is not set: install Node's headers (Debian: nodejs-dev or the official tarball)`);
  return [nodeInclude, addonApi];
}

function run(cmd, args) {
  return new Promise((resolve) => {
    const p = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'] });
    let text = '';
    p.stdout.on('data', (d) => (text += d));
    p.stderr.on('data', (d) => (text += d));
    p.on('close', (code) => resolve({ code, text }));
    p.on('error', (e) => resolve({ code: -1, text: String(e) }));
  });
}

function upToDate(lt) {
  if (process.argv.includes('--force') || !existsSync(addon) || !existsSync(infoFile)) return false;
  const info = JSON.parse(readFileSync(infoFile, 'utf8'));
  const newest = Math.max(...[...SOURCES, 'engine.h'].map((f) => statSync(path.join(native, f)).mtimeMs), statSync(fileURLToPath(import.meta.url)).mtimeMs);
  return info.built && info.libtorch?.dir === lt.lib && statSync(addon).mtimeMs >= newest;
}

async function main() {
  if (process.env.DTRAIN_TORCH_ENGINE === 'off') skip('DTRAIN_TORCH_ENGINE=off');
  if (process.platform !== 'linux') skip(`the torch engine is built on Linux only (this is ${process.platform})`);
  const lt = findLibtorch();
  if (!lt) skip(`no libtorch found: install torch for python3 (pip install torch), or set DTRAIN_LIBTORCH to a libtorch folder, and run pnpm install again`);
  const version = versionOf(lt);
  const [major, minor] = version.split('.').map(Number);
  if (major < MIN_VERSION[0] || (major === MIN_VERSION[0] && minor < MIN_VERSION[1])) {
    skip(`libtorch ${version} in ${lt.dir} is older than ${MIN_VERSION.join('.')}: install torch >= ${MIN_VERSION.join('.')} or set DTRAIN_LIBTORCH`);
  }
  if (upToDate(lt)) return;
  const abi = cxx11Abi(lt);
  const cuda = existsSync(path.join(lt.lib, 'libtorch_cuda.so'));
  const [nodeInclude, addonApi] = nodeIncludes();
  mkdirSync(out, { recursive: true });
  const common = ['-std=c++20', '-O2', '-fPIC', '-DNDEBUG', `-D_GLIBCXX_USE_CXX11_ABI=${abi}`, '-Wall', '-Wno-unused-parameter'];
  const t0 = Date.now();
  log(`building against libtorch ${version}${cuda ? ' (CUDA)' : ''} from ${lt.source} (${lt.dir}); about a minute`);
  const compiled = await Promise.all([
    run('g++', [...common, '-I', lt.include, '-I', path.join(lt.include, 'torch', 'csrc', 'api', 'include'), '-c', path.join(native, 'engine.cc'), '-o', path.join(out, 'engine.o')]),
    run('g++', [...common, '-I', nodeInclude, '-I', addonApi, '-c', path.join(native, 'binding.cc'), '-o', path.join(out, 'binding.o')]),
  ]);
  const failed = compiled.find((r) => r.code !== 0);
  if (failed) skip(`compiling failed (g++ exit ${failed.code}): ${failed.text.trim().split('\n').filter((l) => l.includes('error')).slice(0, 3).join(' | ') || failed.text.trim().slice(-300)}`);
  const libs = ['-ltorch', '-ltorch_cpu', '-lc10', ...(cuda ? ['-ltorch_cuda', '-lc10_cuda'] : [])];
  const link = await run('g++', ['-shared', '-o', addon, path.join(out, 'engine.o'), path.join(out, 'binding.o'), '-L', lt.lib, '-Wl,--no-as-needed', ...libs, '-Wl,--as-needed', `-Wl,-rpath,${lt.lib}`]);
  if (link.code !== 0) skip(`linking failed: ${link.text.trim().split('\n').slice(-3).join(' | ')}`);
  const libtorch = { dir: lt.lib, include: lt.include, version, cuda, cxx11Abi: abi, source: lt.source };
  writeFileSync(infoFile, `${JSON.stringify({ built: true, libtorch }, null, 2)}\n`);
  log(`built ${path.relative(root, addon)} in ${((Date.now() - t0) / 1000).toFixed(0)} s`);
}

await main();
