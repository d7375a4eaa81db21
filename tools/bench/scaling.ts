// `pnpm bench scaling`: how throughput scales with the number of workers.
//
// 1. real   The real launcher (`dtrain launch --workers N`) on Fashion-MNIST, same per-worker batch,
//           N = 1, 2, 4: images/s and each step's share of data, compute, all-reduce, optimizer,
//           from rank 0's per-step lines in the run folder's metrics.jsonl (--log-every 1).
//           --engine tfjs|torch picks the engine; --ddp PYTHON runs, right after each of ours, PyTorch
//           DDP over gloo with the same workers, per-worker batch, image size and channels
//           (tools/bench/ddp_resnet.py; random tensors, so no data loading on its side).
// 2. comm   Communication only, on loopback: every worker sleeps --compute-ms per step (a GPU's
//           step time: the CPU waits) and all-reduces the real gradient (11,180,810 float32) with
//           the real ring, in real processes. Efficiency = throughput(N) / (N x throughput(1)).
//           Once per --bucket-mb value: 0 all-reduces after the compute; B > 0 hands buckets of B
//           MiB to the ring's thread during the "backward pass", as the trainer does
//           (_overlap-model.ts says when each bucket is ready). --comm-links tcp (default: each
//           rank a machine of its own, over loopback TCP) and/or shm (all ranks on one host, as
//           `launch --gpus N`: shared-memory links).
// 3. lan    The same across Linux network namespaces (one per worker, veth pairs into a bridge
//           that lives in a namespace of its own: nothing is added to the host's network), every
//           link shaped with tc tbf to each --rates value in both directions (a full-duplex switch
//           port), with and without fp16 on the wire. Needs root; skipped with a message otherwise.
//
// For the comm modes each row also says where the all-reduce time went: the time the wire alone
// needs at the nominal rate (2(n-1)/n of the payload per link), the CPU our ranks burnt during the
// all-reduce as a share of the machine's cores, and how busy the whole machine was (other jobs
// included). Results: bench-results/scaling.json and markdown tables.
import { spawn, execFileSync, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { workerEnv, type PeerInfo } from '@dtrain/transport';
import { readMetrics, type StepMetrics } from '@dtrain/worker';
import { machine, parseArgs, REPO_ROOT, stats, writeResults, type Stats } from './_common.js';
import { FORWARD_SHARE } from './_overlap-model.js';
import type { RingInit, RingResult, StepSample, StreamInit } from './_scaling-worker.js';

const WORKER = path.join(REPO_ROOT, 'tools', 'bench', '_scaling-worker.ts');
const CLI = path.join(REPO_ROOT, 'packages', 'cli', 'src', 'main.ts');
/** Trainable parameters of the tutorial ResNet (`pnpm cli model summary`). */
const GRADIENT_FLOATS = 11_180_810;

// ---------------------------------------------------------------- processes we started

const live = new Set<ChildProcess>();

function killAll(): void {
  for (const k of live) if (k.exitCode === null && k.signalCode === null) k.kill('SIGKILL');
}

interface Proc {
  child: ChildProcess;
  /** Last lines of stderr, for error messages. */
  tail: () => string;
  exited: Promise<number | null>;
}

function start(cmd: string, args: string[], opts: { ipc: boolean; env?: NodeJS.ProcessEnv }): Proc {
  const child = spawn(cmd, args, {
    cwd: REPO_ROOT,
    env: opts.env ?? process.env,
    stdio: opts.ipc ? ['ignore', 'pipe', 'pipe', 'ipc'] : ['ignore', 'pipe', 'pipe'],
  });
  live.add(child);
  let text = '';
  const keep = (d: Buffer) => {
    text = (text + d.toString()).slice(-4000);
  };
  child.stdout?.on('data', keep);
  child.stderr?.on('data', keep);
  const exited = new Promise<number | null>((resolve) => {
    child.once('exit', (code, signal) => {
      live.delete(child);
      resolve(signal ? null : code);
    });
    child.once('error', (e) => {
      keep(Buffer.from(`spawn failed: ${e.message}\n`));
      live.delete(child);
      resolve(-1);
    });
  });
  return { child, tail: () => text.trim().split('\n').slice(-12).join('\n'), exited };
}

function withTimeout<T>(p: Promise<T>, ms: number, what: string): Promise<T> {
  let t: NodeJS.Timeout | undefined;
  return Promise.race([
    p.finally(() => clearTimeout(t)),
    new Promise<never>((_, reject) => {
      t = setTimeout(() => reject(new Error(`${what} did not finish within ${ms / 1000} s`)), ms);
    }),
  ]);
}

// ---------------------------------------------------------------- machine CPU sampling

/** Samples /proc/stat (via os.cpus) so a row can say how busy the machine was in its timed window. */
class CpuSampler {
  private samples: { t: number; busy: number; total: number }[] = [];
  private timer: NodeJS.Timeout | undefined;
  start(): void {
    this.samples = [];
    const take = () => {
      let busy = 0;
      let total = 0;
      for (const c of os.cpus()) {
        const s = c.times.user + c.times.nice + c.times.sys + c.times.irq;
        busy += s;
        total += s + c.times.idle;
      }
      this.samples.push({ t: Date.now(), busy, total });
    };
    take();
    this.timer = setInterval(take, 200);
  }
  stop(): void {
    clearInterval(this.timer);
  }
  /** Busy share of all cores between two wall-clock times (ms since the epoch), or NaN. */
  busyBetween(t0: number, t1: number): number {
    const a = [...this.samples].reverse().find((s) => s.t <= t0) ?? this.samples[0];
    const b = this.samples.find((s) => s.t >= t1) ?? this.samples[this.samples.length - 1];
    if (!a || !b || b.total <= a.total) return NaN;
    return (b.busy - a.busy) / (b.total - a.total);
  }
}

// ---------------------------------------------------------------- network namespaces

const NS_SUBNET = '10.250.77';
const addrOf = (i: number) => `${NS_SUBNET}.${10 + i}`;

/**
 * One namespace per worker plus a hub namespace holding a bridge; veth pairs are created with
 * both ends inside namespaces, so the host's own network is never touched. Addresses exist only
 * inside these namespaces.
 */
class Lan {
  readonly prefix = `dtsc${process.pid}`;
  readonly hub = `${this.prefix}-hub`;
  private created: string[] = [];
  workers = 0;
  ws(i: number): string {
    return `${this.prefix}-w${i}`;
  }

  private ip(args: string[]): void {
    execFileSync('ip', args, { stdio: ['ignore', 'ignore', 'pipe'], timeout: 10_000 });
  }

  private addNs(name: string): void {
    this.ip(['netns', 'add', name]);
    this.created.push(name);
    this.ip(['-n', name, 'link', 'set', 'lo', 'up']);
  }

  /** Namespaces of earlier runs of this benchmark that died without cleaning up. */
  static removeStale(): string[] {
    let list = '';
    try {
      list = execFileSync('ip', ['netns', 'list'], { encoding: 'utf8', timeout: 10_000 });
    } catch {
      return [];
    }
    const removed: string[] = [];
    for (const line of list.split('\n')) {
      const m = /^(dtsc(\d+)-\S+)/.exec(line.trim());
      if (!m) continue;
      const pid = Number(m[2]);
      let alive = true;
      try {
        process.kill(pid, 0);
      } catch {
        alive = false;
      }
      if (alive) continue;
      try {
        execFileSync('ip', ['netns', 'del', m[1]], { stdio: 'ignore', timeout: 10_000 });
        removed.push(m[1]);
      } catch {
        /* someone else removed it */
      }
    }
    return removed;
  }

  setup(n: number): void {
    try {
      this.addNs(this.hub);
      this.ip(['-n', this.hub, 'link', 'add', 'br0', 'type', 'bridge']);
      this.ip(['-n', this.hub, 'link', 'set', 'br0', 'up']);
      for (let i = 0; i < n; i++) {
        const ns = this.ws(i);
        this.addNs(ns);
        this.ip(['-n', this.hub, 'link', 'add', `v${i}`, 'type', 'veth', 'peer', 'name', 'eth0', 'netns', ns]);
        this.ip(['-n', this.hub, 'link', 'set', `v${i}`, 'master', 'br0']);
        this.ip(['-n', this.hub, 'link', 'set', `v${i}`, 'up']);
        this.ip(['-n', ns, 'addr', 'add', `${addrOf(i)}/24`, 'dev', 'eth0']);
        this.ip(['-n', ns, 'link', 'set', 'eth0', 'up']);
      }
      this.workers = n;
    } catch (e) {
      this.teardown();
      throw new Error(`could not build the namespaces: ${stderrOf(e)}`);
    }
  }

  /** tbf on both ends of every worker's link: rate in each direction, as a switch port. */
  shape(rateBits: number): void {
    // A burst of 2 ms of traffic (at least 256 KiB: veth hands tbf GSO packets up to 64 KiB).
    const burst = Math.max(256 * 1024, Math.round((rateBits / 8) * 0.002));
    const args = (dev: string) => ['qdisc', 'replace', 'dev', dev, 'root', 'tbf', 'rate', `${rateBits}bit`, 'burst', String(burst), 'latency', '20ms'];
    for (let i = 0; i < this.workers; i++) {
      execFileSync('tc', ['-n', this.ws(i), ...args('eth0')], { stdio: ['ignore', 'ignore', 'pipe'], timeout: 10_000 });
      execFileSync('tc', ['-n', this.hub, ...args(`v${i}`)], { stdio: ['ignore', 'ignore', 'pipe'], timeout: 10_000 });
    }
  }

  teardown(): void {
    for (const ns of this.created.reverse()) {
      try {
        execFileSync('ip', ['netns', 'del', ns], { stdio: 'ignore', timeout: 10_000 });
      } catch {
        /* already gone */
      }
    }
    this.created = [];
    this.workers = 0;
  }
}

function stderrOf(e: unknown): string {
  const s = (e as { stderr?: Buffer }).stderr?.toString().trim();
  return s || (e instanceof Error ? e.message : String(e));
}

let lan: Lan | undefined;

function cleanupAndExit(signal: string): void {
  console.error(`\n${signal}: stopping bench workers and removing namespaces`);
  killAll();
  lan?.teardown();
  process.exit(130);
}

// ---------------------------------------------------------------- communication-only runs

interface Placement {
  /** Network namespace to run in, or none (loopback). */
  ns?: string;
  listen: string;
  host: string;
  ipc: boolean;
}

/** What every rank of a communication-only run is told (the worker's RingInit without its place in the ring). */
type CommOptions = Pick<RingInit, 'floats' | 'computeMs' | 'warmup' | 'steps' | 'fp16' | 'timeoutMs' | 'bucketMb'>;

interface RingRun {
  results: RingResult[];
  /** Machine-wide busy share of all cores during rank 0's timed steps (other jobs included). */
  machineBusy: number;
}

function startWorker(p: Placement): Proc {
  const node = [process.execPath, '--import', 'tsx', WORKER];
  // `ip netns exec` execs node, which keeps the IPC channel's descriptor and environment.
  return p.ns ? start('ip', ['netns', 'exec', p.ns, ...node], { ipc: true, env: workerEnv() }) : start(node[0], node.slice(1), { ipc: true, env: workerEnv() });
}

async function runRing(world: number, o: CommOptions, place: (rank: number) => Placement, sampler: CpuSampler): Promise<RingRun> {
  const procs = Array.from({ length: world }, (_, r) => startWorker(place(r)));
  const endpoints: string[][] = new Array(world);
  const results: (RingResult & { timedEndEpoch: number })[] = new Array(world);
  let got = 0;
  const all = Promise.all(
    procs.map(
      (p, rank) =>
        new Promise<void>((resolve, reject) => {
          p.child.on('message', (m: { type: string; endpoints?: string[] }) => {
            if (m.type === 'endpoints' && m.endpoints) {
              endpoints[rank] = m.endpoints;
              if (++got === world) {
                const peers: PeerInfo[] = endpoints.map((e, r) => ({ rank: r, host: place(r).host, endpoints: e }));
                for (const q of procs) q.child.send({ type: 'peers', peers });
              }
            } else if (m.type === 'result') results[rank] = { ...(m as unknown as RingResult), timedEndEpoch: Date.now() };
          });
          const pl = place(rank);
          const init: RingInit = {
            role: 'ring', rank, world, host: pl.host, listen: pl.listen, port: 0, ipc: pl.ipc,
            floats: o.floats, computeMs: o.computeMs, warmup: o.warmup, steps: o.steps, fp16: o.fp16, timeoutMs: o.timeoutMs, bucketMb: o.bucketMb,
          };
          p.child.send(init);
          void p.exited.then((code) => {
            if (code === 0 && results[rank]) resolve();
            else reject(new Error(`bench worker rank ${rank}${pl.ns ? ` in namespace ${pl.ns}` : ''} exited with ${code ?? 'a signal'}:\n${p.tail()}`));
          });
        }),
    ),
  );
  // Startup (tsx, zeromq) of up to 8 processes on 2 cores, then the steps, then the close.
  const budget = 60_000 + (o.warmup + o.steps + 1) * (o.computeMs + 15_000);
  try {
    await withTimeout(all, budget, `the ${world}-worker ring`);
  } finally {
    for (const p of procs) if (p.child.exitCode === null) p.child.kill('SIGKILL');
  }
  const r0 = results[0];
  const machineBusy = sampler.busyBetween(r0.timedEndEpoch - r0.timedWallMs, r0.timedEndEpoch);
  return { results, machineBusy };
}

interface CommRow {
  world: number;
  link: string;
  rateBits: number | null;
  fp16: boolean;
  /** 0: all-reduce after the compute; else gradient buckets of this many MiB overlapping the backward pass. */
  bucketMb: number;
  computeMs: number;
  /** Images per worker-step assumed for images/s (the real per-worker batch). */
  batch: number;
  stepMs: Stats;
  imagesPerSec: number;
  imagesPerSecPerStep: Stats;
  efficiency: number;
  allReduceMs: Stats;
  /** Time the wire alone needs at the nominal rate: 2(n-1)/n of the payload through one link. */
  wireMs: number | null;
  /** computeMs / (computeMs + wireMs): the best a step that does not overlap the two can reach. */
  noOverlapBound: number | null;
  /**
   * computeMs / max(computeMs, forward + wireMs): the best with the all-reduce overlapping the
   * whole backward pass (it cannot start before the forward pass is over).
   */
  overlapBound: number | null;
  /** CPU our ranks used during the all-reduce, as a share of all the machine's cores. */
  ringCpuShare: number;
  /** CPU ms per rank per all-reduce (JavaScript + ZeroMQ I/O threads). */
  cpuMsPerRankAllReduce: number;
  /** Busy share of all cores during the timed steps (other jobs included). */
  machineBusy: number;
  /**
   * Each rank's JavaScript thread during the all-reduce, as shares of its wall time (mean over
   * ranks and steps): on a core, runnable but waiting for a core, and blocked (waiting on the wire
   * or on a peer that is itself late).
   */
  jsThread: { running: number; waitingForCore: number; blocked: number };
  /** All threads of a rank: ms runnable but waiting for a core, per all-reduce (mean over ranks). */
  allThreadsQueueMsPerAllReduce: number;
  bytesSentPerRankPerStep: number;
}

const mean = (xs: number[]) => xs.reduce((a, b) => a + b, 0) / xs.length;

function jsShares(results: RingResult[]): CommRow['jsThread'] {
  const all = results.flatMap((r) => r.samples).filter((s) => s.allReduceMs > 0);
  const wall = all.reduce((a, s) => a + s.allReduceMs, 0);
  const running = all.reduce((a, s) => a + s.jsRunMs, 0) / wall;
  const waitingForCore = all.reduce((a, s) => a + s.jsQueueMs, 0) / wall;
  return { running, waitingForCore, blocked: Math.max(0, 1 - running - waitingForCore) };
}

function commRow(run: RingRun, world: number, o: CommOptions, batch: number, link: string, rateBits: number | null, baseline: number | null): CommRow {
  const r0 = run.results[0];
  const steps = r0.samples.length;
  const stepMs = stats(r0.samples.map((s) => s.stepMs));
  const imagesPerSec = (world * batch * steps) / (r0.timedWallMs / 1000);
  const arMs = r0.samples.map((s) => s.allReduceMs);
  const cpu = run.results.reduce((a, r) => a + r.samples.reduce((b, s: StepSample) => b + s.allReduceCpuMs, 0), 0);
  const arSum = arMs.reduce((a, b) => a + b, 0);
  const payload = o.floats * (o.fp16 ? 2 : 4);
  const wireMs = rateBits && world > 1 ? (((2 * (world - 1)) / world) * payload * 8 * 1000) / rateBits : rateBits ? 0 : null;
  return {
    world, link, rateBits, fp16: o.fp16, bucketMb: o.bucketMb, computeMs: o.computeMs, batch, stepMs, imagesPerSec,
    imagesPerSecPerStep: stats(r0.samples.map((s) => (world * batch) / (s.stepMs / 1000))),
    efficiency: baseline ? imagesPerSec / (world * baseline) : 1,
    allReduceMs: stats(arMs),
    wireMs,
    noOverlapBound: wireMs === null ? null : o.computeMs / (o.computeMs + wireMs),
    overlapBound: wireMs === null ? null : o.computeMs / Math.max(o.computeMs, FORWARD_SHARE * o.computeMs + wireMs),
    ringCpuShare: world > 1 && arSum > 0 ? cpu / (os.cpus().length * arSum) : 0,
    cpuMsPerRankAllReduce: cpu / (world * steps),
    machineBusy: run.machineBusy,
    jsThread: jsShares(run.results),
    allThreadsQueueMsPerAllReduce: mean(run.results.flatMap((r) => r.samples.map((s) => s.allQueueMs))),
    bytesSentPerRankPerStep: Math.round(r0.bytesSent / (o.warmup + steps + 1)),
  };
}

/** A plain TCP stream from worker namespace 0 to 1: what the shaped link carries here. */
async function linkCheck(l: Lan, bytes: number): Promise<{ bytes: number; ms: number; gbitPerSec: number }> {
  const port = 29_555;
  const sink = startWorker({ ns: l.ws(1), listen: addrOf(1), host: 'w1', ipc: false });
  const source = startWorker({ ns: l.ws(0), listen: addrOf(0), host: 'w0', ipc: false });
  const timeoutMs = 60_000;
  try {
    const listening = new Promise<void>((res) => sink.child.on('message', (m: { type: string }) => m.type === 'listening' && res()));
    const done = new Promise<{ bytes: number; ms: number }>((res) => sink.child.on('message', (m: { type: string; bytes?: number; ms?: number }) => m.type === 'stream' && res({ bytes: m.bytes!, ms: m.ms! })));
    sink.child.send({ role: 'sink', addr: addrOf(1), port, bytes, timeoutMs } satisfies StreamInit);
    await withTimeout(listening, timeoutMs, 'link check (sink start)');
    source.child.send({ role: 'source', addr: addrOf(1), port, bytes, timeoutMs } satisfies StreamInit);
    const r = await withTimeout(done, timeoutMs, 'link check');
    await withTimeout(Promise.all([sink.exited, source.exited]), 10_000, 'link check exit');
    return { ...r, gbitPerSec: (r.bytes * 8) / (r.ms / 1000) / 1e9 };
  } finally {
    for (const p of [sink, source]) if (p.child.exitCode === null) p.child.kill('SIGKILL');
  }
}

// ---------------------------------------------------------------- real launcher runs

interface RealRow {
  world: number;
  /** launch --bucket-mb: 0 = all-reduce after the backward pass. */
  bucketMb: number;
  batch: number;
  imageSize: number;
  stepSec: Stats;
  imagesPerSec: number;
  imagesPerSecPerStep: Stats;
  speedup: number;
  efficiency: number;
  /** Rank 0's share of step time per phase, over the timed steps. */
  share: { data: number; compute: number; allReduce: number; optimizer: number; other: number };
  /** Rank 0's mean seconds per step in each phase. */
  phaseSec: { data: number; compute: number; allReduce: number; optimizer: number };
  command: string;
  /** PyTorch DDP (gloo) with the same shape of run, when --ddp is given; ratio = ours / DDP. */
  ddp: { imagesPerSec: number; imagesPerSecPerStep: { median: number; min: number; max: number }; torch: string } | null;
  ratioToDdp: number | null;
}

interface RealOptions {
  dataset: string;
  batch: number;
  imageSize: number;
  warmup: number;
  steps: number;
  timeoutS: number;
  engine: string;
  ddp: string | null;
}

/** PyTorch DDP over gloo, `world` processes, the same per-worker batch and input as ours. */
function ddpRun(python: string, world: number, bucketMb: number, o: RealOptions): NonNullable<RealRow['ddp']> {
  const out = path.join(fs.mkdtempSync(path.join(os.tmpdir(), 'bench-ddp-')), 'ddp.json');
  const channels = o.dataset === 'cifar10' ? 3 : 1;
  const args = [path.join(REPO_ROOT, 'tools', 'bench', 'ddp_resnet.py'), '--workers', String(world), '--size', String(o.imageSize), '--channels', String(channels), '--batch', String(o.batch), '--warmup', String(o.warmup), '--steps', String(o.steps), '--bucket-mb', String(bucketMb > 0 ? bucketMb : 25), '--out', out];
  execFileSync(python, args, { stdio: ['ignore', 'ignore', 'inherit'], timeout: o.timeoutS * 1000 });
  const j = JSON.parse(fs.readFileSync(out, 'utf8')) as { imagesPerSec: number; imagesPerSecPerStep: { median: number; min: number; max: number }; torch: string };
  return { imagesPerSec: j.imagesPerSec, imagesPerSecPerStep: j.imagesPerSecPerStep, torch: j.torch };
}

async function realRun(world: number, bucketMb: number, o: RealOptions, baseline: number | null): Promise<RealRow> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'dtrain-scaling-'));
  const out = path.join(dir, 'run');
  const total = o.warmup + o.steps;
  const args = [
    'launch', '--workers', String(world), '--dataset', o.dataset, '--epochs', '1', '--batch-size', String(o.batch),
    '--image-size', String(o.imageSize), '--limit-train', String(world * o.batch * total), '--limit-test', String(8 * world),
    '--log-every', '1', '--join-timeout-s', '120', '--timeout-s', '120', '--bucket-mb', String(bucketMb), '--engine', o.engine, '--out', out,
  ];
  const command = `pnpm cli ${args.join(' ').replace(out, '<tmp>')}`;
  try {
    const p = start(process.execPath, ['--import', 'tsx', CLI, ...args], { ipc: false });
    let code: number | null;
    try {
      code = await withTimeout(p.exited, o.timeoutS * 1000, `dtrain launch --workers ${world}`);
    } catch (e) {
      if (p.child.exitCode === null) p.child.kill('SIGINT');
      await withTimeout(p.exited, 15_000, 'the launcher after SIGINT').catch(() => p.child.kill('SIGKILL'));
      throw e;
    }
    if (code !== 0) throw new Error(`dtrain launch --workers ${world} exited with ${code ?? 'a signal'}:\n${p.tail()}`);
    const steps = (await readMetrics(out)).filter((l): l is StepMetrics => l.kind === 'step').sort((a, b) => a.step - b.step).slice(o.warmup);
    if (steps.length < 1) throw new Error(`${out}/metrics.jsonl has no step lines after ${o.warmup} warm-up steps`);
    // Each line is one step of rank 0 (--log-every 1); its window is the step plus the line's write.
    const stepSec = steps.map((s) => s.images / s.imagesPerSec);
    const sum = (f: (s: StepMetrics) => number) => steps.reduce((a, s) => a + f(s), 0);
    const wall = stepSec.reduce((a, b) => a + b, 0);
    const ph = { data: sum((s) => s.phaseSec.data), compute: sum((s) => s.phaseSec.compute), allReduce: sum((s) => s.phaseSec.allReduce), optimizer: sum((s) => s.phaseSec.optimizer) };
    const imagesPerSec = (world * o.batch * steps.length) / wall;
    return {
      world, bucketMb, batch: o.batch, imageSize: o.imageSize, stepSec: stats(stepSec), imagesPerSec,
      imagesPerSecPerStep: stats(stepSec.map((s) => (world * o.batch) / s)),
      speedup: baseline ? imagesPerSec / baseline : 1,
      efficiency: baseline ? imagesPerSec / (world * baseline) : 1,
      share: {
        data: ph.data / wall, compute: ph.compute / wall, allReduce: ph.allReduce / wall, optimizer: ph.optimizer / wall,
        other: Math.max(0, 1 - (ph.data + ph.compute + ph.allReduce + ph.optimizer) / wall),
      },
      phaseSec: { data: ph.data / steps.length, compute: ph.compute / steps.length, allReduce: ph.allReduce / steps.length, optimizer: ph.optimizer / steps.length },
      command,
      ddp: null,
      ratioToDdp: null,
    };
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

// ---------------------------------------------------------------- output

const pct = (x: number | null) => (x === null || !Number.isFinite(x) ? 'n/a' : `${(100 * x).toFixed(1)}%`);
const f = (x: number, d = 1) => x.toFixed(d);
const spread = (s: Stats, d = 1) => `${f(s.median, d)} (${f(s.min, d)}-${f(s.max, d)}, sd ${f(s.stdev, d)})`;

function realTable(rows: RealRow[]): string {
  const out = [
    '| workers | all-reduce | per-worker batch | images/s | img/s per step: median (min-max, sd) | s/step median | speedup | efficiency | data | compute | all-reduce | optimizer | other | DDP gloo images/s (per step min-max) | ours / DDP |',
    '| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |',
  ];
  for (const r of rows) {
    const ddp = r.ddp ? `${f(r.ddp.imagesPerSec)} (${f(r.ddp.imagesPerSecPerStep.min)}-${f(r.ddp.imagesPerSecPerStep.max)})` : '-';
    out.push(`| ${r.world} | ${r.world > 1 ? overlapName(r.bucketMb) : 'n/a'} | ${r.batch} (${r.imageSize}px) | ${f(r.imagesPerSec)} | ${spread(r.imagesPerSecPerStep)} | ${f(r.stepSec.median, 3)} | ${f(r.speedup, 2)}x | ${pct(r.efficiency)} | ${pct(r.share.data)} | ${pct(r.share.compute)} | ${pct(r.share.allReduce)} | ${pct(r.share.optimizer)} | ${pct(r.share.other)} | ${ddp} | ${r.ratioToDdp === null ? '-' : `${f(r.ratioToDdp, 2)}x`} |`);
  }
  return out.join('\n');
}

function commTable(rows: CommRow[]): string {
  const out = [
    '| workers | link | wire dtype | all-reduce | step ms: median (min-max, sd) | images/s | efficiency | all-reduce ms median (after backward) | wire-only ms | link use (wire-only / all-reduce) | bound: no overlap / overlap | ring CPU during all-reduce (of all cores) | JS thread in all-reduce: on core / waiting for core / blocked on wire or peer | machine busy |',
    '| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |',
  ];
  for (const r of rows) {
    out.push(`| ${r.world} | ${r.link} | ${r.fp16 ? 'fp16' : 'fp32'} | ${overlapName(r.bucketMb)} | ${spread(r.stepMs)} | ${f(r.imagesPerSec)} | ${pct(r.efficiency)} | ${f(r.allReduceMs.median)} | ${r.wireMs === null ? 'n/a' : f(r.wireMs)} | ${r.wireMs && !r.bucketMb ? pct(r.wireMs / r.allReduceMs.median) : 'n/a'} | ${pct(r.noOverlapBound)} / ${pct(r.overlapBound)} | ${pct(r.ringCpuShare)} | ${r.world > 1 && !r.bucketMb ? `${pct(r.jsThread.running)} / ${pct(r.jsThread.waitingForCore)} / ${pct(r.jsThread.blocked)}` : 'n/a'} | ${pct(r.machineBusy)} |`);
  }
  return out.join('\n');
}

const overlapName = (bucketMb: number) => (bucketMb > 0 ? `${bucketMb} MiB buckets during backward` : 'after backward');

function parseRate(v: string): number {
  const m = /^(\d+(?:\.\d+)?)(k|m|g)?bit$/i.exec(v.trim());
  if (!m) throw new Error(`--rates takes values like 10gbit,1gbit, got '${v}'`);
  return Number(m[1]) * ({ k: 1e3, m: 1e6, g: 1e9 }[(m[2] ?? '').toLowerCase() as 'k' | 'm' | 'g'] ?? 1);
}

const ints = (v: string, flag: string) =>
  v.split(',').map((x) => {
    const n = Number(x);
    if (!Number.isInteger(n) || n < 1) throw new Error(`--${flag} takes positive integers separated by commas, got '${v}'`);
    return n;
  });

// ---------------------------------------------------------------- main

export async function main(args: string[]): Promise<void> {
  const o = parseArgs(args, {
    modes: 'real,comm,lan',
    workers: '1,2,4',
    'comm-workers': '1,2,4,8',
    'comm-links': 'tcp',
    'lan-workers': '2,4,8',
    rates: '10gbit,1gbit',
    fp16: 'both',
    'compute-ms': '100',
    'bucket-mb': '0,8',
    batch: '32',
    'image-size': '28',
    dataset: 'fashion-mnist',
    warmup: '2',
    steps: '6',
    'comm-warmup': '2',
    'comm-steps': '5',
    floats: String(GRADIENT_FLOATS),
    'link-check-mb': '200',
    'timeout-s': '300',
    engine: 'tfjs',
    ddp: 'no',
  });
  const modes = new Set(o.modes.split(','));
  const commLinks = o['comm-links'].split(',');
  for (const l of commLinks) if (l !== 'tcp' && l !== 'shm') throw new Error(`--comm-links takes tcp and/or shm, got '${l}'`);
  for (const m of modes) if (!['real', 'comm', 'lan'].includes(m)) throw new Error(`--modes takes real, comm and/or lan, got '${m}'`);
  if (!['both', 'on', 'off'].includes(o.fp16)) throw new Error(`--fp16 takes both, on or off, got '${o.fp16}'`);
  const cores = os.cpus().length;
  const batch = Number(o.batch);
  const command = `pnpm bench scaling ${args.join(' ')}`.trim();
  const result: Record<string, unknown> = { bench: 'scaling', date: new Date().toISOString(), machine: machine(), options: o };
  const notes: string[] = [];
  const save = () => writeResults('scaling', { ...result, notes });

  process.once('SIGINT', () => cleanupAndExit('SIGINT'));
  process.once('SIGTERM', () => cleanupAndExit('SIGTERM'));
  process.once('exit', () => {
    killAll();
    lan?.teardown();
  });

  const m = machine();
  console.log(`# pnpm bench scaling\n\ncommand: \`${command}\`\nmachine: ${m.cpus} x ${m.cpuModel}, ${m.memoryGiB} GiB, ${m.platform}, Node ${m.node}, load average ${m.loadAverage.join(' ')} at the start`);

  const bucketMbs = o['bucket-mb'].split(',').map((x) => {
    const n = Number(x);
    if (!Number.isFinite(n) || n < 0) throw new Error(`--bucket-mb takes MiB values >= 0 separated by commas (0: all-reduce after the backward pass), got '${o['bucket-mb']}'`);
    return n;
  });

  // ------------------------------------------------------------ 1. real launcher
  if (modes.has('real')) {
    const worlds = ints(o.workers, 'workers');
    const ro: RealOptions = { dataset: o.dataset, batch, imageSize: Number(o['image-size']), warmup: Number(o.warmup), steps: Number(o.steps), timeoutS: Number(o['timeout-s']), engine: o.engine, ddp: o.ddp === 'no' ? null : o.ddp };
    console.log(`\n## Real training (dtrain launch --engine ${ro.engine}, ${ro.dataset}, batch ${batch} per worker, ${ro.imageSize}px, ${ro.warmup} warm-up + ${ro.steps} timed steps per run${ro.ddp ? '; PyTorch DDP gloo after each' : ''})\n`);
    const rows: RealRow[] = [];
    let base: number | null = null;
    for (const bucketMb of bucketMbs) {
      for (const w of worlds) {
        if (w === 1 && base !== null) continue;
        process.stdout.write(`launching ${w} worker${w > 1 ? `s, all-reduce ${overlapName(bucketMb)}` : ''}... `);
        const t = Date.now();
        const r = await realRun(w, w === 1 ? 0 : bucketMb, ro, base);
        if (w === 1) base = r.imagesPerSec;
        if (base !== null && w !== 1) Object.assign(r, { speedup: r.imagesPerSec / base, efficiency: r.imagesPerSec / (w * base) });
        if (ro.ddp) {
          r.ddp = ddpRun(ro.ddp, w, w === 1 ? 0 : bucketMb, ro);
          r.ratioToDdp = r.imagesPerSec / r.ddp.imagesPerSec;
        }
        rows.push(r);
        console.log(`${f(r.imagesPerSec)} images/s (${f((Date.now() - t) / 1000)} s with startup)${r.ddp ? `; DDP gloo ${f(r.ddp.imagesPerSec)} images/s: ours / DDP ${f(r.ratioToDdp!, 2)}x` : ''}`);
      }
    }
    if (worlds[0] !== 1) notes.push('real mode: no 1-worker run, so speedup and efficiency are relative to nothing (shown as 1).');
    const note = `On ${cores} core${cores === 1 ? '' : 's'} compute cannot scale: ${Math.max(...worlds)} CPU workers share the same ${cores} cores (TensorFlow's threads in every process), so images/s stays flat or falls with N; the all-reduce share shows the communication that data parallelism adds. Real scaling needs a core (or GPU) per worker.`;
    if (Math.max(...worlds) > cores / 2) notes.push(note);
    result.real = { options: ro, rows };
    save();
    console.log(`\n${realTable(rows)}\n\nShares are of rank 0's step time (other = the rest: bookkeeping, the metrics line).`);
  }

  // ------------------------------------------------------------ 2. communication only, loopback
  const co: CommOptions = {
    floats: Number(o.floats), computeMs: Number(o['compute-ms']), warmup: Number(o['comm-warmup']), steps: Number(o['comm-steps']),
    fp16: false, timeoutMs: 60_000, bucketMb: 0,
  };
  const sampler = new CpuSampler();
  sampler.start();
  let baseline: number | null = null;
  const commRows: CommRow[] = [];
  const loop = (r: number): Placement => ({ listen: '127.0.0.1', host: `loopback-${r}`, ipc: false });
  // One host name for every rank: the ring makes each link a shared-memory one.
  const sameHost = (): Placement => ({ listen: '127.0.0.1', host: 'this-host', ipc: true });
  try {
    if (modes.has('comm') || modes.has('lan')) {
      const worlds = modes.has('comm') ? ints(o['comm-workers'], 'comm-workers') : [1];
      if (!worlds.includes(1)) worlds.unshift(1);
      for (const links of modes.has('comm') ? commLinks : ['tcp']) {
        const label = links === 'tcp' ? 'loopback tcp' : 'same host, shm';
        console.log(`\n## Communication only, ${links === 'tcp' ? 'loopback TCP (each rank a machine of its own)' : 'one host, shared-memory links'} (compute = sleep ${co.computeMs} ms, all-reduce of ${co.floats} float32 = ${f((co.floats * 4) / 1e6)} MB, mean of ${co.steps} steps after ${co.warmup} warm-up, ${batch} images per worker-step)\n`);
        // World 1 once (compute only: the baseline), then every world with every bucket size.
        for (const bucketMb of bucketMbs) {
          for (const w of worlds.sort((a, b) => a - b)) {
            if (w === 1 && baseline !== null) continue;
            const bo = { ...co, bucketMb: w === 1 ? 0 : bucketMb };
            process.stdout.write(`${w} worker${w > 1 ? 's' : ''}, ${label}, all-reduce ${overlapName(bo.bucketMb)}... `);
            const run = await runRing(w, bo, links === 'tcp' ? loop : sameHost, sampler);
            const row = commRow(run, w, bo, batch, label, null, baseline);
            if (w === 1) baseline = row.imagesPerSec;
            commRows.push(row);
            console.log(`${f(row.imagesPerSec)} images/s, efficiency ${pct(row.efficiency)}, all-reduce ${f(row.allReduceMs.median)} ms`);
          }
        }
      }
      result.comm = { options: co, transport: 'loopback tcp: tcp over 127.0.0.1 (ipc:// off, so every byte goes through the TCP stack); same host, shm: shared-memory links (headers over ipc://)', rows: commRows };
      save();
      console.log(`\n${commTable(commRows)}`);
    }

    // ---------------------------------------------------------- 3. LAN model
    if (modes.has('lan')) {
      const worlds = ints(o['lan-workers'], 'lan-workers').sort((a, b) => a - b);
      const rates = o.rates.split(',').map((r) => ({ name: r, bits: parseRate(r) }));
      const dtypes = o.fp16 === 'both' ? [false, true] : [o.fp16 === 'on'];
      console.log(`\n## LAN model: one network namespace per worker, links shaped with tc tbf (${rates.map((r) => r.name).join(', ')}, each direction), ${dtypes.map((d) => (d ? 'fp16' : 'fp32')).join(' and ')} on the wire\n`);
      let skip: string | undefined;
      if (process.getuid?.() !== 0) skip = 'not root: network namespaces and tc need root (run as root, or with sudo)';
      else {
        const stale = Lan.removeStale();
        if (stale.length) console.log(`removed namespaces left by an earlier run: ${stale.join(', ')}`);
        lan = new Lan();
        try {
          lan.setup(Math.max(2, ...worlds));
        } catch (e) {
          skip = (e as Error).message;
          lan = undefined;
        }
      }
      if (skip) {
        console.log(`SKIPPED the LAN model: ${skip}`);
        result.lan = { skipped: skip };
        save();
      } else {
        const l = lan!;
        const lanRows: CommRow[] = [];
        const checks: Record<string, unknown> = {};
        try {
          for (const rate of rates) {
            l.shape(rate.bits);
            const chk = await linkCheck(l, Number(o['link-check-mb']) * 1e6);
            checks[rate.name] = chk;
            console.log(`${rate.name}: one TCP stream between two namespaces carries ${f(chk.gbitPerSec, 2)} Gbit/s here`);
            for (const [fp16, bucketMb] of dtypes.flatMap((d) => bucketMbs.map((b) => [d, b] as const))) {
              for (const w of worlds) {
                process.stdout.write(`  ${w} workers, ${rate.name}, ${fp16 ? 'fp16' : 'fp32'}, all-reduce ${overlapName(bucketMb)}... `);
                const run = await runRing(w, { ...co, fp16, bucketMb }, (r) => ({ ns: l.ws(r), listen: addrOf(r), host: `ns-w${r}`, ipc: false }), sampler);
                const row = commRow(run, w, { ...co, fp16, bucketMb }, batch, `${rate.name} (tbf)`, rate.bits, baseline);
                lanRows.push(row);
                console.log(`${f(row.imagesPerSec)} images/s, efficiency ${pct(row.efficiency)}, all-reduce ${f(row.allReduceMs.median)} ms (wire alone ${f(row.wireMs ?? 0)} ms)`);
                result.lan = { topology: `${l.workers} namespaces with ${NS_SUBNET}.0/24 addresses, veth into a bridge in namespace ${l.hub}; tbf on both ends of every veth`, linkChecks: checks, rows: lanRows };
                save();
              }
            }
          }
        } finally {
          l.teardown();
          lan = undefined;
        }
        console.log(`\n${commTable(lanRows)}`);
        const pairs = lanRows.filter((r) => r.fp16).map((h) => [lanRows.find((r) => !r.fp16 && r.world === h.world && r.rateBits === h.rateBits && r.bucketMb === h.bucketMb), h] as const).filter(([a]) => a !== undefined);
        const slower = pairs.filter(([a, h]) => h.imagesPerSec < a!.imagesPerSec).length;
        if (pairs.length) {
          notes.push(
            `fp16 on the wire was slower than fp32 in ${slower} of ${pairs.length} (workers, rate) pairs` +
              (slower ? ': the float32 <-> binary16 conversion at every hop runs in JavaScript and costs more CPU than halving the bytes saves, when the cores (not the wire) are the bottleneck.' : '.'),
          );
        }
        const best8 = lanRows.filter((r) => r.world === 8 && r.rateBits === 10e9);
        if (best8.length) {
          const best = best8.reduce((a, b) => (b.efficiency > a.efficiency ? b : a));
          notes.push(
            `8 workers on 10 Gbit/s: best efficiency ${pct(best.efficiency)} (${best.fp16 ? 'fp16' : 'fp32'}, all-reduce ${overlapName(best.bucketMb)}); the issue's target is 90%. ` +
              `With ${co.computeMs} ms of compute an ideal wire allows ${pct(best.noOverlapBound)} when the all-reduce follows the backward pass and ${pct(best.overlapBound)} when it overlaps it; ` +
              `the rest of the gap is the ring's CPU time (see ring CPU): ${cores} cores for ${best.world} ranks.`,
          );
        }
      }
    }
  } finally {
    sampler.stop();
  }

  if (commRows.length) {
    notes.push(
      'Reading the comm tables: wire-only ms is what the link alone needs (2(n-1)/n of the payload through each link at the nominal rate); bounds: compute / (compute + wire-only) for an all-reduce after the backward pass, ' +
        `compute / max(compute, forward + wire-only) for one overlapping it (forward = ${f(FORWARD_SHARE * 100, 0)}% of compute); all-reduce ms is what is left of it after the backward pass; ` +
        'ring CPU = CPU time of all ranks during that time / (cores x that time): near 100% means the ' +
        `${cores} cores, not the wire, set the pace; machine busy includes other jobs on the machine.`,
    );
  }
  const file = save();
  if (notes.length) console.log(`\n${notes.map((n) => `- ${n}`).join('\n')}`);
  console.log(`\nwrote ${file}`);
}
