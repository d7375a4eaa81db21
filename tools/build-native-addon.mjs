// Builds a package's small native module (native/binding.gyp) with node-gyp, from `prepare` (so
// `pnpm install` builds it) and `pretest`. Does nothing when the module is newer than its sources.
// A failed build does not fail the install: each module has a fallback, and `missing` says what
// the package loses and what to install.
import { spawnSync } from 'node:child_process';
import { existsSync, statSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { nodeGypEnv } from './node-gyp-env.mjs';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');

/**
 * @param {{ pkg: string, target: string, sources: string[], missing: string }} o
 *   pkg: the package folder; target: binding.gyp's target_name; sources: files in native/;
 *   missing: what the package does without the module (printed with the install hint).
 */
export function buildNativeAddon({ pkg, target, sources, missing }) {
  const native = join(pkg, 'native');
  const out = join(native, 'build', 'Release', `${target}.node`);
  const newest = Math.max(...[...sources, 'binding.gyp'].map((f) => statSync(join(native, f)).mtimeMs));
  if (existsSync(out) && statSync(out).mtimeMs >= newest && !process.argv.includes('--force')) return;

  const warn = (why) => {
    console.warn(
      `\n[${target}] WARNING: the native module was not built: ${why}\n${missing}\nTo build it, install a C compiler, ` +
        `make and Python 3 (Debian: apt-get install build-essential python3) and run pnpm install again.\n`,
    );
  };
  // node-gyp with Node's installed headers where they match (offline machines), as for tfjs-node.
  const env = nodeGypEnv(root);
  const gyp = env.npm_config_node_gyp;
  if (gyp === undefined) return warn('node-gyp is not installed (it is a root devDependency: run pnpm install at the repository root)');
  const r = spawnSync(process.execPath, [gyp, 'rebuild', '--loglevel=error'], { cwd: native, env, encoding: 'utf8', timeout: 300_000 });
  if (r.status !== 0 || !existsSync(out)) {
    return warn(`node-gyp failed (exit ${r.status ?? r.signal}):\n${`${r.stdout ?? ''}${r.stderr ?? ''}`.trim().split('\n').slice(-15).join('\n')}`);
  }
  console.log(`build-native: ${out}`);
}
