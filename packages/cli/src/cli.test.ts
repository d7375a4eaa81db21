// The CLI as a user runs it: a real process, real arguments, real exit codes.
import { describe, expect, it, type TestContext } from 'vitest';
import { runCli } from './testing/processes.js';

const cli = (ctx: TestContext, ...args: string[]) => runCli(ctx, args);

describe('dtrain CLI', () => {
  it('--help lists the commands', async (ctx) => {
    const r = await cli(ctx, '--help');
    expect(r.code).toBe(0);
    for (const c of ['doctor', 'data', 'model']) expect(r.stdout).toContain(c);
  });

  it('model summary --json gives PyTorch’s parameter count and the layer shapes', async (ctx) => {
    const r = await cli(ctx, 'model', 'summary', '--json');
    expect(r.code).toBe(0);
    const s = JSON.parse(r.stdout);
    expect(s.paramCount).toBe(11_180_810);
    expect(s.layers.find((l: { name: string }) => l.name === 'head.pool').type).toContain('3x3');
    const gray = JSON.parse((await cli(ctx, 'model', 'summary', '--json', '--in-channels', '1', '--image-size', '28')).stdout);
    expect(gray.paramCount).toBe(11_180_810 - 2 * 7 * 7 * 64);
  });

  it('a wrong flag value is one clear line naming the flag, exit code 2, no stack trace', async (ctx) => {
    const r = await cli(ctx, 'model', 'summary', '--image-size', '-3');
    expect(r.code).not.toBe(0);
    expect(r.stderr).toContain('--image-size');
    expect(r.stderr).not.toMatch(/\n\s+at /);
    const small = await cli(ctx, 'model', 'summary', '--image-size', '4');
    expect(small.code).toBe(2);
    expect(small.stderr.trim().split('\n')).toHaveLength(1);
    expect(small.stderr).toMatch(/imageSize must be at least 7/);
  });

  it('doctor loads the native backend and measures matmul speed', async (ctx) => {
    const r = await cli(ctx, 'doctor', '--json');
    expect(r.code, r.stderr).toBe(0);
    const d = JSON.parse(r.stdout);
    expect(d.matmulGflops).toBeGreaterThan(0);
    expect(d.checks[0]).toMatchObject({ ok: true });
    // pnpm install built the shared-memory module and this machine has /dev/shm.
    expect(d.checks.find((c: { name: string }) => c.name.startsWith('Shared-memory links'))).toMatchObject({ ok: true, detail: expect.stringMatching(/MiB free/) });
    // Every WebGPU adapter, and what --gpus would train on (here: the software GPU, if set up, for tests only).
    const uses = d.checks.find((c: { name: string }) => c.name === '--gpus N uses');
    if (d.webgpuAdapters.some((a: { software: boolean }) => !a.software)) expect(uses).toMatchObject({ ok: true });
    else if (d.webgpuAdapters.length > 0) expect(uses).toMatchObject({ ok: false, detail: expect.stringMatching(/^no GPU; --allow-software-gpu trains on the software GPU \(llvmpipe/) });
    else expect(uses).toMatchObject({ ok: false });
    // The torch engine: built by pnpm install where a libtorch is found (CI: the CPU wheel), with the libtorch it uses.
    const torch = d.checks.find((c: { name: string }) => c.name === 'torch engine (--engine torch)');
    if (d.torchEngine.available || process.env.CI) expect(torch).toMatchObject({ ok: true, detail: expect.stringMatching(/^built: libtorch \d+\.\d+\.\d+ \(C\+\+11 ABI\) from .*; (CPU only|\d+ CUDA GPU)/) });
    else expect(torch).toMatchObject({ ok: false, detail: expect.stringMatching(/run pnpm install|not built|no libtorch/) });
  });
});
