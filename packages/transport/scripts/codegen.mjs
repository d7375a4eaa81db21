#!/usr/bin/env node
// Generates src/generated/dtrain.{js,d.ts} from proto/dtrain.proto with protobufjs-cli (pbjs).
// The output is not committed: nx's `codegen` target, and the `pretest`/`pretypecheck`/`prepare`
// scripts, all run this. It does nothing when the output is newer than the .proto (pass --force
// to regenerate anyway), and it writes to temporary names and renames, so a concurrent or
// interrupted run never leaves a half-written module behind.
import { execFileSync } from 'node:child_process';
import { existsSync, mkdirSync, readFileSync, renameSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { createRequire } from 'node:module';

const pkg = join(dirname(fileURLToPath(import.meta.url)), '..');
const proto = join(pkg, 'proto', 'dtrain.proto');
const outDir = join(pkg, 'src', 'generated');
const outJs = join(outDir, 'dtrain.js');
const outDts = join(outDir, 'dtrain.d.ts');
const self = fileURLToPath(import.meta.url);

const force = process.argv.includes('--force');
const newest = Math.max(statSync(proto).mtimeMs, statSync(self).mtimeMs);
if (!force && existsSync(outJs) && existsSync(outDts) &&
    Math.min(statSync(outJs).mtimeMs, statSync(outDts).mtimeMs) >= newest) {
  process.exit(0);
}

mkdirSync(outDir, { recursive: true });
const require = createRequire(import.meta.url);
const pbjs = join(dirname(require.resolve('protobufjs-cli/package.json')), 'bin', 'pbjs');
const tmp = join(outDir, `.tmp-${process.pid}`);
mkdirSync(tmp, { recursive: true });
try {
  execFileSync(process.execPath, [
    pbjs, '-t', 'static-module', '-w', 'esm', '--dependency', 'protobufjs/minimal.js',
    // uint64 fields (op ids, steps) stay far below 2^53: plain numbers, no Long. fromObject and
    // toObject stay: the coordinator reads the reports' records back with their defaults (proto3
    // leaves zeros off the wire).
    '--force-number', '--no-delimited', '--no-typeurl', '-d',
    '-o', join(tmp, 'dtrain.js'), proto,
  ], { stdio: 'inherit' });
  // With --force-number nothing refers to Long; its import would need `long` resolvable from
  // here, which pnpm's strict layout does not give.
  const dts = readFileSync(join(tmp, 'dtrain.d.ts'), 'utf8').replace(/^import Long = require\("long"\);\n/m, '');
  writeFileSync(join(tmp, 'dtrain.d.ts'), dts);
  renameSync(join(tmp, 'dtrain.d.ts'), outDts);
  renameSync(join(tmp, 'dtrain.js'), outJs);
} finally {
  rmSync(tmp, { recursive: true, force: true });
}
console.log(`codegen: ${proto} -> ${outDir}`);
