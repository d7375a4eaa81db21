// `--gpus` end to end on the software GPU (Mesa's lavapipe behind Dawn's Vulkan backend: a real
// WebGPU device that runs on the CPU; `pnpm setup:software-gpu`, which .ci/run runs). Real worker
// processes, real sockets, the WebGPU backend in every worker. Without the software GPU the cases
// that train are skipped, except under CI, where its absence is a failure.
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { describe, expect, it, type TestContext } from 'vitest';
import { softwareGpu } from '@dtrain/backend';
import { runCli, testTimeoutFor, type StartOptions } from './testing/processes.js';

const tmp = () => fs.mkdtempSync(path.join(os.tmpdir(), 'dtrain-gpu-'));
const cli = (ctx: TestContext, args: string[], opts: StartOptions = {}) => runCli(ctx, args, opts);
const needsSoftwareGpu = (ctx: TestContext) => {
  if (softwareGpu() === null && process.env.CI) throw new Error('CI must set up the software GPU (pnpm setup:software-gpu, run by .ci/run)');
  ctx.skip(softwareGpu() === null, 'no software GPU here: run pnpm setup:software-gpu');
};

describe('pnpm cli launch --gpus on the software GPU', () => {
  // lavapipe trains this network at about 0.4 GFLOP/s per worker here: the 512-image
  // epoch takes about 2.5 minutes, so this test has two launches' time.
  it('trains Fashion-MNIST on 2 workers sharing the software GPU, with bitwise-identical replicas', async (ctx) => {
    needsSoftwareGpu(ctx);
    const out = path.join(tmp(), 'run');
    const r = await cli(ctx, ['launch', '--gpus', '2', '--allow-software-gpu', '--dataset', 'fashion-mnist', '--epochs', '1', '--limit-train', '512', '--limit-test', '256', '--image-size', '28', '--metrics-port', '0', '--out', out], {
      limitMs: 2 * 150_000,
    });
    expect(r.code, r.stderr).toBe(0);
    expect(r.stdout.split('\n')[0]).toMatch(/^GPU backend: webgpu \(Dawn\) on llvmpipe.*a SOFTWARE GPU on the CPU \(--allow-software-gpu\); 2 workers sharing it$/);
    expect(r.stdout).toMatch(/^fashion-mnist: 1 epochs, 2 webgpu \(Dawn\) workers x batch 64/m);
    expect(r.stdout).toMatch(/^epoch 1\/1 .* test \d+\.\d% \(256 images\)/m);
    expect(r.stdout).toMatch(/replicas identical: state sha256 [0-9a-f]{16} on all 2 workers/);
    const config = JSON.parse(fs.readFileSync(path.join(out, 'config.json'), 'utf8')) as { settings: { backend: string; shareGpu: boolean }; versions: { tensorflow: string; backendPackage: string } };
    expect(config.settings).toMatchObject({ backend: 'webgpu', shareGpu: true });
    expect(config.versions).toMatchObject({ tensorflow: 'none (WebGPU)', backendPackage: '@tensorflow/tfjs-backend-webgpu' });
  }, testTimeoutFor(2));

  it('refuses the software GPU without --allow-software-gpu, saying why for each backend, before any worker starts', async (ctx) => {
    needsSoftwareGpu(ctx);
    const out = path.join(tmp(), 'run');
    const r = await cli(ctx, ['launch', '--gpus', '2', '--dataset', 'fashion-mnist', '--out', out]);
    expect(r.code).not.toBe(0);
    expect(r.stderr).toMatch(/--gpus 2: no GPU backend works on this machine: .*webgpu \(Dawn\): the only WebGPU adapter is a software one \(llvmpipe.*--allow-software-gpu.*Use --workers 2 to train on the CPU\./);
    expect(fs.existsSync(out)).toBe(false);
  });

  it('names the worker whose GPU device is lost, like any lost worker, and the reason', async (ctx) => {
    needsSoftwareGpu(ctx);
    const args = ['launch', '--gpus', '2', '--allow-software-gpu', '--synthetic-test-data', '48:16:12', '--batch-size', '8', '--metrics-port', '0', '--timeout-s', '20', '--test-crash', '1:deviceLost:2'];
    const r = await cli(ctx, [...args, '--out', path.join(tmp(), 'run')]);
    expect(r.code).not.toBe(0);
    // As for a worker killed at that point (faults.test.ts): without --elastic the run stops, naming it.
    expect(r.stderr).toMatch(/^error: rank 1 on host \S+ exited with code 1\. Last lines of its log/m);
    expect(r.stderr).toMatch(/^ {2}error: the GPU device was lost \(llvmpipe.*; reason: destroyed/m);
  }, testTimeoutFor(1));
});

describe('train --backend webgpu', () => {
  it('trains in one process on the software GPU and exits when done (Dawn would keep the process alive)', async (ctx) => {
    needsSoftwareGpu(ctx);
    const out = path.join(tmp(), 'run');
    const r = await cli(ctx, ['train', '--backend', 'webgpu', '--allow-software-gpu', '--dataset', 'fashion-mnist', '--limit-train', '64', '--limit-test', '32', '--batch-size', '32', '--epochs', '1', '--image-size', '16', '--out', out], { limitMs: 120_000 });
    expect(r.killed, r.out).toBeUndefined();
    expect(r.code, r.stderr).toBe(0);
    expect(r.stdout).toMatch(/^done: 1 epochs, final test acc/m);
    expect(JSON.parse(fs.readFileSync(path.join(out, 'config.json'), 'utf8')).settings.backend).toBe('webgpu');
  });

  it('refuses a batch whose largest tensor the GPU cannot bind, naming the flag and the batch that fits', async (ctx) => {
    needsSoftwareGpu(ctx);
    // lavapipe binds at most 128 MiB; stem.conv's padded output at 96x96 is 47 x 47 x 64 floats an image.
    const r = await cli(ctx, ['train', '--backend', 'webgpu', '--allow-software-gpu', '--dataset', 'fashion-mnist', '--image-size', '96', '--batch-size', '512', '--epochs', '1', '--out', path.join(tmp(), 'run')]);
    expect(r.code).toBe(2);
    expect(r.stderr).toMatch(/^error: --batch-size 512 at 96x96: the largest tensor of a step \(stem\.conv, padded: 276 MiB\) is more than this GPU binds at once \(maxStorageBufferBindingSize 128 MiB on llvmpipe.*\); use a batch of at most 237$/m);
  });
});

describe('--gpus without any GPU', () => {
  it('says in one line what is missing when Vulkan finds no device', async (ctx) => {
    // No software GPU and no Vulkan driver: an ICD list that names none.
    const env = { DTRAIN_SOFTWARE_GPU_DIR: path.join(tmp(), 'none'), VK_DRIVER_FILES: path.join(tmp(), 'none.json'), VK_ICD_FILENAMES: path.join(tmp(), 'none.json') };
    const r = await cli(ctx, ['launch', '--gpus', '1', '--backend', 'webgpu', '--dataset', 'fashion-mnist'], { env });
    expect(r.code).not.toBe(0);
    const lines = r.stderr.trim().split('\n');
    expect(lines).toHaveLength(1);
    expect(lines[0]).toMatch(/^error: --gpus 1: no GPU backend works on this machine: webgpu \(Dawn\): no WebGPU adapter: Dawn found no Vulkan driver with a device\..*libvulkan1.*pnpm setup:software-gpu.*Use --workers 1 to train on the CPU\.$/);
  });
});
