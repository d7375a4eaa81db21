// `launch --slurm` on a real Slurm (Debian's slurm-wlm 22.05): a cluster of 3 nodes, each slurmd in
// a network namespace of its own (tools/slurm/test-cluster.sh), jobs submitted with the shipped
// tools/slurm/train.sbatch. Skipped, and reported as skipped, without root, network namespaces or
// Slurm (.ci/run installs it: tools/ensure-cluster-tools.sh).
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it, type TestContext } from 'vitest';
import { initKeyDir } from '@dtrain/transport';
import { listCheckpoints, readCheckpoint, type Summary } from '@dtrain/worker';
import { CLI_DIR, startProcess, testTimeoutFor } from './testing/processes.js';
import { until } from './testing/wait.js';

const REPO = path.resolve(CLI_DIR, '..', '..');
const CLUSTER = path.join(REPO, 'tools', 'slurm', 'test-cluster.sh');
const SBATCH = path.join(REPO, 'tools', 'slurm', 'train.sbatch');
const tmp = () => fs.mkdtempSync(path.join(os.tmpdir(), 'dtrain-slurm-'));

/** Real Fashion-MNIST, small: 96 training and 32 test images at 12 px, 2 steps of 3 x 16 per epoch. */
const TRAIN = ['--dataset', 'fashion-mnist', '--limit-train', '96', '--limit-test', '32', '--image-size', '12', '--batch-size', '16', '--seed', '3', '--metrics-port', '0', '--timeout-s', '30'];

let clusterDir: string | undefined;
let why = '';
let keys = '';

function clusterCmd(args: string[], timeout = 30_000, env: Record<string, string> = {}): string {
  return execFileSync(CLUSTER, args, { encoding: 'utf8', timeout, stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, ...env } });
}

beforeAll(() => {
  if (process.platform !== 'linux' || process.getuid?.() !== 0) why = 'not running as root';
  else if (!['slurmctld', 'slurmd', 'munged'].every((b) => fs.existsSync(`/usr/sbin/${b}`))) why = 'Slurm is not installed (tools/ensure-cluster-tools.sh)';
  else {
    const dir = tmp();
    try {
      clusterCmd(['up', dir, '3'], 60_000);
      clusterDir = dir;
    } catch (e) {
      why = `the test cluster did not start: ${String((e as { stderr?: string }).stderr ?? (e as Error).message).trim()}`;
      try {
        clusterCmd(['down', dir]);
      } catch {
        // nothing to stop
      }
    }
  }
  if (clusterDir === undefined) console.warn(`Slurm tests: NO SLURM CLUSTER (${why}); they are skipped`);
  keys = path.join(tmp(), 'keys');
  initKeyDir({ dir: keys, name: 'cluster' });
}, 90_000);

afterAll(() => {
  if (clusterDir !== undefined) clusterCmd(['down', clusterDir]);
});

const needsCluster = (ctx: TestContext) => {
  // CI installs Slurm and runs as root (.ci/run): there a missing cluster is a failure, not a skip.
  if (clusterDir === undefined && process.env.CI) throw new Error(`CI must be able to start the Slurm test cluster: ${why}`);
  ctx.skip(clusterDir === undefined, `needs a Slurm test cluster (${why})`);
};

interface Job {
  id: string;
  /** Ends when the job does, with its exit code (128 + the signal that ended it, if one did). */
  done: Promise<{ code: number; out: string }>;
  /** The job's output so far (srun --label: "N: " before each line of task N). */
  output(): string;
}

/** Submits tools/slurm/train.sbatch on `nodes` nodes with `args` for launch. */
async function submit(ctx: TestContext, nodes: number, out: string, args: string[], env: Record<string, string> = {}): Promise<Job> {
  const file = path.join(clusterDir!, `job-${Date.now()}.out`);
  const printed = clusterCmd(['exec', clusterDir!, 'sbatch', '--parsable', `--nodes=${nodes}`, `--output=${file}`, `--chdir=${REPO}`, SBATCH, ...args], 30_000, {
    DTRAIN_WORKERS: '--workers 1', DTRAIN_SECURITY: `--keys ${keys}`, DTRAIN_OUT: out, ...env,
  });
  const id = /^(\d+)/m.exec(printed)?.[1];
  if (id === undefined) throw new Error(`sbatch printed no job id: ${printed}`);
  ctx.onTestFinished(() => {
    try {
      clusterCmd(['exec', clusterDir!, 'scancel', id]);
    } catch {
      // ended already
    }
  });
  return { id, done: jobEnd(id), output: () => (fs.existsSync(file) ? fs.readFileSync(file, 'utf8') : '') };
}

/**
 * The job's end, polled every 250 ms (sbatch --wait polls at growing intervals: seconds late).
 * scontrol keeps a finished job for MinJobAge (300 s by default).
 */
async function jobEnd(id: string): Promise<{ code: number; out: string }> {
  const deadline = Date.now() + 240_000;
  for (;;) {
    const line = clusterCmd(['exec', clusterDir!, 'scontrol', '-o', 'show', 'job', id]);
    const state = /JobState=(\S+)/.exec(line)?.[1] ?? '';
    if (!['PENDING', 'CONFIGURING', 'RUNNING', 'COMPLETING', 'SUSPENDED', ''].includes(state)) {
      const [, code, signal] = /ExitCode=(\d+):(\d+)/.exec(line) ?? ['', '1', '0'];
      return { code: Number(code) !== 0 ? Number(code) : Number(signal) !== 0 ? 128 + Number(signal) : 0, out: line };
    }
    if (Date.now() > deadline) throw new Error(`job ${id} did not end in 240 s: ${line}`);
    await new Promise((r) => setTimeout(r, 250));
  }
}

/** Processes on the nodes besides Slurm's daemons: "NODE PID COMMAND LINE" lines. */
const nodeProcesses = () => clusterCmd(['ps', clusterDir!]).split('\n').filter((l) => l !== '');

describe('launch --slurm on a 3-node Slurm cluster', () => {
  it('a 3-node job (ranks by node, CURVE); scancel stops every process, the last checkpoint intact; resubmitted with --resume it trains to completion, identical replicas', async (ctx) => {
    needsCluster(ctx);
    const out = path.join(tmp(), 'run');
    const job = await submit(ctx, 3, out, [...TRAIN, '--epochs', '3']);
    await until(() => /^0: epoch 1\/3 /m.test(job.output()), 120_000, () => `no epoch 1 in time:\n${job.output()}`);
    const first = job.output();
    expect(first).toMatch(new RegExp(`^0: slurm job ${job.id}: 3 nodes \\(dtnode1, dtnode2, dtnode3\\); the coordinator runs here on dtnode1, 10\\.214\\.\\d+\\.1:${20_000 + (Number(job.id) % 20_000)}$`, 'm'));
    expect(first).toMatch(/^0: security: CURVE on the control socket and the rings/m);
    expect(first).toMatch(/^1: slurm job \d+: node dtnode2 \(2 of 3\) joins the coordinator on dtnode1:\d+$/m);
    expect(first).toMatch(/^0: all 3 workers joined \(dtnode1: rank 0, dtnode2: rank 1, dtnode3: rank 2\); ring starting$/m);
    clusterCmd(['exec', clusterDir!, 'scancel', job.id]);
    const r = await job.done;
    expect(r.code).not.toBe(0);
    // KillWait (5 s) bounds how long a task may outlive the scancel.
    await until(() => nodeProcesses().length === 0, 15_000, () => `processes left on the nodes:\n${nodeProcesses().join('\n')}`);
    const cks = await listCheckpoints(out);
    expect(cks.length).toBeGreaterThan(0);
    const last = await readCheckpoint(cks.at(-1)!.file);
    expect(last.header.epoch).toBeGreaterThanOrEqual(1);
    const again = await submit(ctx, 3, out, ['--resume', out]);
    const r2 = await again.done;
    const log = again.output();
    expect(r2.code, log).toBe(0);
    expect(log).toMatch(new RegExp(`^0: resuming ${out} from checkpoint-e000${last.header.epoch}\\.ckpt \\(epoch ${last.header.epoch}, written by 3 workers\\) with 1$`, 'm'));
    expect(log).toMatch(/^0: epoch 3\/3 /m);
    expect(log).toMatch(/^0: done: 3 epochs, \d+ steps, test accuracy .* on 32 images/m);
    expect(log).toMatch(/^0: replicas identical: state sha256 [0-9a-f]{16} on all 3 workers on 3 machines$/m);
    expect(log).toContain(`1: done: ranks 1 of 3 on host dtnode2 completed (logs in ${out}/logs/dtnode2)`);
    expect(log).toContain(`2: done: ranks 2 of 3 on host dtnode3 completed (logs in ${out}/logs/dtnode3)`);
    expect((JSON.parse(fs.readFileSync(path.join(out, 'summary.json'), 'utf8')) as Summary).worldSize).toBe(3);
    await until(() => nodeProcesses().length === 0, 15_000, () => `processes left on the nodes:\n${nodeProcesses().join('\n')}`);
  }, testTimeoutFor(2));

  it("with --elastic, a node's worker killed: the others regroup and complete the run (train.sbatch lets the step go on); the job's exit code still reports the node", async (ctx) => {
    needsCluster(ctx);
    const out = path.join(tmp(), 'run');
    const job = await submit(ctx, 3, out, [...TRAIN, '--epochs', '2', '--elastic']);
    await until(() => /^0: epoch 1\/2 /m.test(job.output()), 90_000, () => `no epoch 1 in time:\n${job.output()}`);
    const worker = await until(() => nodeProcesses().find((l) => l.startsWith('dtnode3 ') && l.includes('worker-main.ts')), 30_000, () => 'no worker on dtnode3');
    process.kill(Number(worker.split(' ')[1]), 'SIGKILL');
    const r = await job.done;
    const log = job.output();
    // As `join` does (exit 0 only when every worker of its machine completed), dtnode3's task fails,
    // and with it the job's exit code, while the run itself completes.
    expect(r.code, log).not.toBe(0);
    expect(log).toMatch(/^srun: error: dtnode3: task 2: Exited with exit code \d+$/m);
    expect(log).not.toMatch(/^srun: error: dtnode[12]: /m);
    expect(log).toMatch(/^0: lost rank 2 on host dtnode3: /m);
    expect(log).toMatch(/^0: regrouped: generation 2, 2 workers \(dtnode1: 1, dtnode2: 1\)/m);
    expect(log).toMatch(/^0: replicas identical: state sha256 [0-9a-f]{16} on all 2 workers on 2 machines$/m);
    await until(() => nodeProcesses().length === 0, 15_000, () => `processes left on the nodes:\n${nodeProcesses().join('\n')}`);
  }, testTimeoutFor(1));
});

describe('launch --slurm, bad input', () => {
  it("nodes that cannot reach each other on the ring port: the connectivity preflight names both nodes and the port", async (ctx) => {
    needsCluster(ctx);
    const ring = 31_000;
    // dtnode3's firewall drops what comes to its ring port (iptables, in its namespace only).
    const iptables = (op: string) => clusterCmd(['on', clusterDir!, '3', 'iptables', op, 'INPUT', '-p', 'tcp', '--dport', String(ring), '-j', 'DROP']);
    try {
      iptables('-A');
    } catch (e) {
      ctx.skip(true, `iptables does not work here: ${String((e as { stderr?: string }).stderr ?? e).trim()}`);
    }
    try {
      const job = await submit(ctx, 3, path.join(tmp(), 'run'), [...TRAIN, '--epochs', '1', '--ring-port-base', String(ring), '--timeout-s', '8']);
      const r = await job.done;
      const log = job.output();
      expect(r.code, log).not.toBe(0);
      expect(log).toMatch(new RegExp(`^\\d: .*could not reach rank 2 on host dtnode3 at tcp://10\\.214\\.\\d+\\.3:${ring} within 8000 ms: check that this port is open`, 'm'));
      await until(() => nodeProcesses().length === 0, 15_000, () => `processes left on the nodes:\n${nodeProcesses().join('\n')}`);
    } finally {
      iptables('-D');
    }
  }, testTimeoutFor(1));

  it('under srun with 2 tasks per node: one line, nothing started', async (ctx) => {
    needsCluster(ctx);
    const r = await startProcess(ctx, CLUSTER, ['exec', clusterDir!, 'srun', '--nodes=1', '--ntasks=2', `--chdir=${REPO}`, 'node', '--import', 'tsx', 'packages/cli/src/main.ts', 'launch', '--slurm', '--workers', '1', '--insecure', ...TRAIN]).done;
    expect(r.code).not.toBe(0);
    expect(r.stderr).toContain('launch --slurm runs one task per node and starts that node\'s workers itself (--workers N or --gpus N): start it with srun --ntasks-per-node=1 (this step has 2 tasks per node)');
    expect(nodeProcesses()).toEqual([]);
  }, testTimeoutFor(1));
});
