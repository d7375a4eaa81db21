// Bad input on the command line (issue 7 §4), as a user hits it: the real CLI in a real process.
// Every wrong flag value, unknown name, busy port, unreachable coordinator, missing or corrupt
// --resume folder or checkpoint and bad --keys folder is ONE line on stderr (no stack trace) that
// names the flag, file or host, with exit code 2; and nothing starts training.
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it, type TestContext } from 'vitest';
import { initKeyDir } from '@dtrain/transport';
import { freePort } from '../../coordinator/src/testing/metrics-fixtures.js';
import { runCli } from './testing/processes.js';

/** The CLI with no keys from the environment (only what the case passes) and no debug output. */
function cli(ctx: TestContext, args: string[]) {
  return runCli(ctx, args, { env: { DTRAIN_KEYS_DIR: path.join(os.tmpdir(), 'dtrain-no-such-keys-dir'), DTRAIN_DEBUG: undefined } });
}

/** Fixtures shared by the cases: folders, a busy TCP port, a closed one. */
const fx = {
  root: '',
  busyPort: 0,
  closedPort: 0,
  out: (name: string) => path.join(fx.root, 'runs', name),
};
let busy: net.Server | undefined;

beforeAll(async () => {
  fx.root = fs.mkdtempSync(path.join(os.tmpdir(), 'dtrain-cli-errors-'));
  const dir = (name: string) => fs.mkdirSync(path.join(fx.root, name), { recursive: true });
  dir('empty');
  dir('garbage');
  fs.writeFileSync(path.join(fx.root, 'garbage', 'checkpoint-e0001.ckpt'), Buffer.from(Array.from({ length: 300 }, (_, i) => (i * 97 + 13) & 0xff)));
  dir('truncated');
  fs.writeFileSync(path.join(fx.root, 'truncated', 'checkpoint-e0002.ckpt'), Buffer.from('DTRNCKPT\x01\x00', 'latin1'));
  dir('badkeys');
  fs.writeFileSync(path.join(fx.root, 'badkeys', 'host.key'), 'public-key = "not a key"\n', { mode: 0o600 });
  const open = initKeyDir({ dir: path.join(fx.root, 'openkeys'), name: 'open' });
  fs.chmodSync(path.join(open.dir, 'host.key'), 0o644);
  // Busy on every interface, as the metrics server binds; the control socket binds 127.0.0.1.
  busy = net.createServer();
  await new Promise<void>((resolve) => busy!.listen(0, '0.0.0.0', resolve));
  fx.busyPort = (busy.address() as net.AddressInfo).port;
  fx.closedPort = await freePort();
});

afterAll(async () => {
  await new Promise((r) => busy?.close(r));
  if (fx.root) fs.rmSync(fx.root, { recursive: true, force: true });
});

interface Case {
  name: string;
  args: () => string[];
  /** What the one line must say (the flag, file, host or port). */
  says: () => RegExp;
}

const esc = (s: string) => s.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');
const fm = ['--dataset', 'fashion-mnist'];
const launch1 = () => ['launch', '--workers', '1', ...fm, '--metrics-port', '0', '--out', fx.out('launch')];

const CASES: Case[] = [
  // Counts and numbers.
  { name: 'negative --epochs', args: () => ['train', ...fm, '--epochs', '-1'], says: () => /--epochs must be a positive integer, got '-1'/ },
  { name: 'zero --batch-size', args: () => ['train', ...fm, '--batch-size', '0'], says: () => /--batch-size must be a positive integer, got '0'/ },
  { name: 'fractional --seed', args: () => ['train', ...fm, '--seed', '1.5'], says: () => /--seed must be a non-negative integer, got '1\.5'/ },
  { name: 'non-numeric --lr', args: () => ['train', ...fm, '--lr', 'fast'], says: () => /--lr must be a positive number, got 'fast'/ },
  { name: '--momentum of 1 or more', args: () => ['train', ...fm, '--momentum', '1.5'], says: () => /--momentum must be below 1/ },
  { name: '--image-size below the stem', args: () => ['train', ...fm, '--image-size', '4'], says: () => /--image-size must be at least 7/ },
  { name: 'zero --workers', args: () => ['launch', '--workers', '0', ...fm], says: () => /--workers must be a positive integer, got '0'/ },
  { name: 'non-numeric --workers', args: () => ['launch', '--workers', 'two', ...fm], says: () => /--workers must be a positive integer, got 'two'/ },
  { name: 'negative --timeout-s', args: () => [...launch1(), '--timeout-s', '-5'], says: () => /--timeout-s must be a positive integer, got '-5'/ },
  { name: 'negative --bucket-mb', args: () => [...launch1(), '--bucket-mb', '-8'], says: () => /--bucket-mb must be a non-negative number, got '-8'/ },
  { name: '--metrics-port out of range', args: () => ['launch', '--workers', '1', ...fm, '--metrics-port', '70000'], says: () => /--metrics-port must be a TCP port \(0-65535\), got '70000'/ },
  { name: 'zero --join-timeout-s on join', args: () => ['join', '127.0.0.1:29500', '--workers', '1', '--join-timeout-s', '0'], says: () => /--join-timeout-s must be a positive integer, got '0'/ },
  // Names.
  { name: 'unknown --dataset', args: () => ['train', '--dataset', 'imagenet'], says: () => /--dataset must be one of cifar10, fashion-mnist, got 'imagenet'/ },
  { name: 'unknown --dataset on launch', args: () => ['launch', '--workers', '1', '--dataset', 'mnist'], says: () => /--dataset must be one of cifar10, fashion-mnist, got 'mnist'/ },
  { name: 'unknown --preset', args: () => ['train', '--preset', 'resnet50'], says: () => /--preset must be one of tutorial, fashion-mnist, cifar10, got 'resnet50'/ },
  { name: 'unknown --backend', args: () => ['train', ...fm, '--backend', 'tpu'], says: () => /--backend must be one of cpu, webgpu, gpu, got 'tpu'/ },
  { name: 'unknown --engine', args: () => ['train', ...fm, '--engine', 'jax'], says: () => /--engine must be one of tfjs, torch, got 'jax'/ },
  { name: '--engine torch on WebGPU', args: () => ['train', ...fm, '--engine', 'torch', '--backend', 'webgpu'], says: () => /^error: --engine torch runs on the CPU or on CUDA \(--backend cpu\|gpu\), not on WebGPU: use --engine tfjs with --backend webgpu$/m },
  { name: '--precision bf16 on the CPU', args: () => ['train', ...fm, '--engine', 'torch', '--precision', 'bf16'], says: () => /^error: --precision bf16 needs the torch engine on GPUs \(--engine torch --gpus N\); the CPU computes fp32$/m },
  { name: '--backend with --engine torch on launch', args: () => ['launch', '--gpus', '1', '--engine', 'torch', '--backend', 'webgpu', ...fm], says: () => /--backend webgpu chooses a TensorFlow\.js backend; --engine torch runs libtorch on CUDA with --gpus N/ },
  { name: 'unknown --lr-scaling', args: () => [...launch1(), '--lr-scaling', 'cubic'], says: () => /--lr-scaling must be one of none, linear, got 'cubic'/ },
  { name: 'unknown data set to download', args: () => ['data', 'download', 'imagenet'], says: () => /the data set to download must be one of cifar10, got 'imagenet'/ },
  { name: 'unknown --split', args: () => ['data', 'inspect', 'fashion-mnist', '--index', '0', '--split', 'val'], says: () => /--split must be one of train, test, got 'val'/ },
  // Ports and the coordinator.
  { name: '--metrics-port in use', args: () => ['launch', '--workers', '1', ...fm, '--out', fx.out('metrics-busy'), '--metrics-port', String(fx.busyPort)], says: () => new RegExp(`metrics on 127\\.0\\.0\\.1:${fx.busyPort} \\(the port is in use\\); choose another --metrics-port`) },
  { name: '--port in use', args: () => [...launch1(), '--port', String(fx.busyPort)], says: () => new RegExp(`could not listen on tcp://127\\.0\\.0\\.1:${fx.busyPort} .*--port`) },
  { name: 'join: coordinator address without a port', args: () => ['join', 'coordinator-host', '--workers', '1'], says: () => /ADDR:PORT.*'coordinator-host'/ },
  {
    name: 'join: unreachable coordinator',
    args: () => ['join', `127.0.0.1:${fx.closedPort}`, '--workers', '1', '--join-timeout-s', '2', '--log-dir', path.join(fx.root, 'join-logs')],
    says: () => new RegExp(`coordinator at tcp://127\\.0\\.0\\.1:${fx.closedPort} for 2000 ms`),
  },
  // --resume.
  { name: '--resume of a missing folder', args: () => ['train', '--resume', path.join(fx.root, 'nope')], says: () => new RegExp(`${esc(path.join(fx.root, 'nope'))}.*--resume`) },
  { name: '--resume of a folder without checkpoints', args: () => ['train', '--resume', path.join(fx.root, 'empty')], says: () => new RegExp(`no checkpoint .* in ${esc(path.join(fx.root, 'empty'))}`) },
  { name: '--resume with a corrupt checkpoint', args: () => ['train', '--resume', path.join(fx.root, 'garbage')], says: () => new RegExp(`${esc(path.join(fx.root, 'garbage', 'checkpoint-e0001.ckpt'))} cannot be used: it is not a dtrain checkpoint`) },
  { name: '--resume with a truncated checkpoint', args: () => ['train', '--resume', path.join(fx.root, 'truncated')], says: () => new RegExp(`${esc(path.join(fx.root, 'truncated', 'checkpoint-e0002.ckpt'))} cannot be used: .*truncated`) },
  { name: '--init of a missing file', args: () => ['train', ...fm, '--limit-train', '64', '--init', path.join(fx.root, 'nope.safetensors')], says: () => new RegExp(`^error: --init ${esc(path.join(fx.root, 'nope.safetensors'))}: cannot read it \\(ENOENT\\)`) },
  { name: 'launch --init of a file that is not safetensors', args: () => [...launch1(), '--init', path.join(fx.root, 'garbage', 'checkpoint-e0001.ckpt')], says: () => new RegExp(`^error: --init ${esc(path.join(fx.root, 'garbage', 'checkpoint-e0001.ckpt'))}: .*not a safetensors file`) },
  { name: 'export of a missing run folder', args: () => ['export', path.join(fx.root, 'nope')], says: () => new RegExp(`${esc(path.join(fx.root, 'nope'))}: no such run folder`) },
  { name: 'launch --resume of a missing folder', args: () => ['launch', '--workers', '1', '--metrics-port', '0', '--resume', path.join(fx.root, 'nope')], says: () => new RegExp(`${esc(path.join(fx.root, 'nope'))}.*--resume`) },
  { name: 'launch --resume with a corrupt checkpoint', args: () => ['launch', '--workers', '1', '--metrics-port', '0', '--resume', path.join(fx.root, 'garbage')], says: () => new RegExp(`${esc(path.join(fx.root, 'garbage', 'checkpoint-e0001.ckpt'))} cannot be used`) },
  // --keys.
  { name: '--keys folder without keys', args: () => [...launch1(), '--keys', path.join(fx.root, 'nokeys')], says: () => new RegExp(`--keys ${esc(path.join(fx.root, 'nokeys'))}: cannot read .*host\\.key.*keys init`) },
  { name: '--keys with a malformed host.key', args: () => [...launch1(), '--keys', path.join(fx.root, 'badkeys')], says: () => new RegExp(`--keys ${esc(path.join(fx.root, 'badkeys'))}: .*host\\.key does not hold`) },
  { name: '--keys with a host.key others can read', args: () => [...launch1(), '--keys', path.join(fx.root, 'openkeys')], says: () => new RegExp(`${esc(path.join(fx.root, 'openkeys', 'host.key'))} is readable by other users .*chmod 600`) },
  { name: 'join --keys with a malformed host.key', args: () => ['join', '127.0.0.1:29500', '--workers', '1', '--keys', path.join(fx.root, 'badkeys')], says: () => new RegExp(`--keys ${esc(path.join(fx.root, 'badkeys'))}: `) },
];

describe.concurrent('bad input on the command line: one line, exit code 2', () => {
  // it.for, not it.each: concurrent cases need their own context, to end their own processes.
  it.for(CASES)('$name', { timeout: 120_000 }, async (c, ctx) => {
    const r = await cli(ctx, c.args());
    const lines = r.stderr.trim().split('\n');
    expect(r.code, `exit code; stderr:\n${r.stderr}`).toBe(2);
    expect(lines, `one line on stderr:\n${r.stderr}`).toHaveLength(1);
    expect(lines[0]).toMatch(/^error: /);
    expect(lines[0]).toMatch(c.says());
    expect(r.stderr).not.toMatch(/\n\s+at /);
    if (c.name === 'join: unreachable coordinator') {
      // It gave up after its 2 s join timeout (plus start-up), not after the 120 s default.
      expect(r.t1 - r.t0).toBeGreaterThanOrEqual(2000);
      expect(r.t1 - r.t0).toBeLessThan(45_000);
    }
  });
});

describe('after the bad input', () => {
  it('nothing was trained or written into the run folders', () => {
    const runs = path.join(fx.root, 'runs');
    const files = fs.existsSync(runs) ? fs.readdirSync(runs, { recursive: true }).map(String) : [];
    expect(files.filter((f) => /config\.json|\.ckpt$|metrics\.jsonl/.test(f))).toEqual([]);
  });
});
