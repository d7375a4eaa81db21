// Where the engine cannot be built or used, one line says why and what to do: the build script
// (scripts/build.mjs, run by pnpm install) and the loader (addon.ts). The builds here go to
// temporary folders (--out); the package's own add-on is not touched.
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { describe, expect, it } from 'vitest';
import { buildInfo, BUILD_DIR, loadAddon, TorchEngineUnavailableError } from './addon.js';

const script = fileURLToPath(new URL('../scripts/build.mjs', import.meta.url));
const tmp = (name: string) => fs.mkdtempSync(path.join(os.tmpdir(), `${name}-`));

function build(env: Record<string, string>) {
  const out = tmp('torch-build');
  const r = spawnSync(process.execPath, [script, '--out', out], { encoding: 'utf8', env: { ...process.env, ...env }, timeout: 60_000 });
  return { out, status: r.status, lines: `${r.stdout}${r.stderr}`.trim().split('\n') };
}

/** A folder shaped like a libtorch (headers and libraries present) that declares `version`. */
function fakeLibtorch(version: string): string {
  const dir = tmp('libtorch');
  const [major, minor, patch] = version.split('.');
  fs.mkdirSync(path.join(dir, 'include', 'ATen'), { recursive: true });
  fs.mkdirSync(path.join(dir, 'include', 'torch', 'headeronly'), { recursive: true });
  fs.mkdirSync(path.join(dir, 'lib'));
  fs.writeFileSync(path.join(dir, 'include', 'ATen', 'ATen.h'), '');
  fs.writeFileSync(path.join(dir, 'lib', 'libtorch_cpu.so'), '');
  fs.writeFileSync(path.join(dir, 'include', 'torch', 'headeronly', 'version.h'), `#define TORCH_VERSION_MAJOR ${major}\n#define TORCH_VERSION_MINOR ${minor}\n#define TORCH_VERSION_PATCH ${patch}\n`);
  return dir;
}

function loadError(dir: string): string {
  try {
    loadAddon(dir);
  } catch (e) {
    expect(e).toBeInstanceOf(TorchEngineUnavailableError);
    return (e as Error).message;
  }
  throw new Error('loadAddon succeeded');
}

describe('building the torch engine', () => {
  it('without a libtorch where DTRAIN_LIBTORCH points: builds nothing, installs on, and says so in one line', () => {
    const b = build({ DTRAIN_LIBTORCH: '/nonexistent/libtorch' });
    expect(b.status).toBe(0); // pnpm install goes on
    expect(b.lines).toEqual([expect.stringMatching(/^\[torch-engine\] not built: DTRAIN_LIBTORCH=\/nonexistent\/libtorch holds no libtorch .*point it at/)]);
    expect(buildInfo(b.out).built).toBe(false);
    expect(loadError(b.out)).toMatch(/^--engine torch: DTRAIN_LIBTORCH=\/nonexistent\/libtorch holds no libtorch/);
  });

  it('refuses a libtorch older than the engine needs, naming its version and folder', () => {
    const lt = fakeLibtorch('2.3.1');
    const b = build({ DTRAIN_LIBTORCH: lt });
    expect(b.lines).toEqual([`[torch-engine] not built: libtorch 2.3.1 in ${lt} is older than 2.4: install torch >= 2.4 or set DTRAIN_LIBTORCH`]);
  });

  it('is off with DTRAIN_TORCH_ENGINE=off', () => {
    expect(build({ DTRAIN_TORCH_ENGINE: 'off' }).lines).toEqual(['[torch-engine] not built: DTRAIN_TORCH_ENGINE=off']);
  });
});

describe('loading the torch engine', () => {
  it('says which libtorch it was built against when that one changed or is gone', (ctx) => {
    const info = buildInfo(BUILD_DIR);
    ctx.skip(!info.built && !process.env.CI, `not built here: ${info.why}`);
    const dir = tmp('torch-addon');
    fs.copyFileSync(path.join(BUILD_DIR, 'dtrain_torch.node'), path.join(dir, 'dtrain_torch.node'));
    const changed = fakeLibtorch('2.99.0');
    fs.writeFileSync(path.join(dir, 'build-info.json'), JSON.stringify({ ...info, libtorch: { ...info.libtorch, include: path.join(changed, 'include') } }));
    expect(loadError(dir)).toBe(`--engine torch: the add-on was built against libtorch ${info.libtorch!.version} in ${info.libtorch!.dir}, which now holds 2.99.0; run pnpm install to rebuild it`);
    fs.writeFileSync(path.join(dir, 'build-info.json'), JSON.stringify({ ...info, libtorch: { ...info.libtorch, include: '/nonexistent/include' } }));
    expect(loadError(dir)).toMatch(/which is gone; run pnpm install to rebuild it$/);
  });
});
