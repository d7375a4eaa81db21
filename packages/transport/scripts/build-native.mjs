#!/usr/bin/env node
// Builds native/shm.c (the mmap behind the ring's shared-memory links, src/shm.ts) with node-gyp.
// Runs from `prepare` (so `pnpm install` builds it) and `pretest`. Does nothing when the module is
// newer than its sources. A failed build does not fail the install: the ring then uses sockets
// between processes of one host and says why once; this script prints what to install.
import { spawnSync } from 'node:child_process';
import { existsSync, statSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { nodeGypEnv } from '../../../tools/node-gyp-env.mjs';

const pkg = join(dirname(fileURLToPath(import.meta.url)), '..');
const native = join(pkg, 'native');
const out = join(native, 'build', 'Release', 'dtrain_shm.node');
const sources = ['shm.c', 'binding.gyp'].map((f) => join(native, f));

const newest = Math.max(...sources.map((f) => statSync(f).mtimeMs));
if (existsSync(out) && statSync(out).mtimeMs >= newest && !process.argv.includes('--force')) process.exit(0);

// node-gyp with Node's installed headers where they match (offline machines), as for tfjs-node.
const env = nodeGypEnv(join(pkg, '..', '..'));
const gyp = env.npm_config_node_gyp;
if (gyp === undefined) warn('node-gyp is not installed (it is a root devDependency: run pnpm install at the repository root)');
const r = spawnSync(process.execPath, [gyp, 'rebuild', '--loglevel=error'], { cwd: native, env, encoding: 'utf8', timeout: 300_000 });
if (r.status !== 0 || !existsSync(out)) {
  warn(`node-gyp failed (exit ${r.status ?? r.signal}):\n${`${r.stdout ?? ''}${r.stderr ?? ''}`.trim().split('\n').slice(-15).join('\n')}`);
}
console.log(`build-native: ${out}`);

function warn(why) {
  console.warn(
    `\n[@dtrain/transport] WARNING: the shared-memory module was not built: ${why}\n` +
      `Training still works; links between processes on one host then use sockets (slower). To build it,\n` +
      `install a C compiler, make and Python 3 (Debian: apt-get install build-essential python3) and run\n` +
      `pnpm install again.\n`,
  );
  process.exit(0);
}
