// pnpm bench allreduce [--world 2,4] [--floats 11200000] [--iters 10] [--warmup 2]
//                      [--transport shm,ipc,tcp] [--piece-bytes 4194304] [--fp16] [--no-mpi] [--no-kernels]
//                      [--no-default-malloc] [--baseline path/to/transport/src/index.ts]
//
// Our ring all-reduce between real processes on this machine, side by side with Open MPI's
// MPI_Allreduce on the same floats and ranks (default transport, and --mca btl tcp,self), plus
// the summing kernels on the same number of floats. Every timed call starts after a barrier; its
// time is the slowest rank's. nccl-tests' definitions: algbw = bytes / time,
// busbw = algbw * 2(n-1)/n. Also the CPU time (user + system, every thread) per timed call, summed
// over the ranks: on a shared machine it moves less with other load than the times do, and it shows
// what MPI's busy-polling costs. The load average is recorded before and after each row.
// Transports: shm = same-host links in shared memory (the ring's default between processes of one
// host; headers still go over ZeroMQ), ipc = every link a ZeroMQ ipc:// socket, tcp = loopback TCP.
// 'ring thread' is the same ring run as training workers run it (ThreadedRing: in a worker
// thread of its own, on a SharedArrayBuffer), over the first transport listed.
// --baseline adds a row (ipc://) for another copy of the transport package (e.g. an older commit
// exported with `git archive`, placed where it resolves zeromq), for before/after in the same run.
// Results: bench-results/allreduce.json and a table.
import { execFileSync, fork, spawnSync } from 'node:child_process';
import { existsSync, mkdirSync, renameSync, statSync } from 'node:fs';
import { cpus, hostname, loadavg, tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { machine, writeResults } from './_common.js';
import { addKernelNames, addPlain, addUnrolled, makeWasmAdd, Ring, sharedFloat32Array, ThreadedRing, workerEnv, type PeerInfo } from '@dtrain/transport';

const SELF = fileURLToPath(import.meta.url);
const ROOT = resolve(dirname(SELF), '..', '..');

/** shm: same-host links in shared memory (the default); ipc, tcp: every link a socket. */
type Transport = 'shm' | 'ipc' | 'tcp';
const TRANSPORTS: readonly Transport[] = ['shm', 'ipc', 'tcp'];

interface Options {
  worlds: number[];
  floats: number;
  iters: number;
  warmup: number;
  transports: Transport[];
  pieceBytes: number;
  fp16: boolean;
  mpi: boolean;
  kernels: boolean;
  defaultMalloc: boolean;
  baseline: string | undefined;
}

function parse(args: string[]): Options {
  const o: Options = {
    worlds: [2, 4], floats: 11_200_000, iters: 10, warmup: 2, transports: ['shm', 'ipc', 'tcp'],
    pieceBytes: 4 << 20, fp16: false, mpi: true, kernels: true, defaultMalloc: true, baseline: undefined,
  };
  for (let i = 0; i < args.length; i++) {
    const a = args[i];
    const val = () => {
      const v = args[++i];
      if (v === undefined) throw new Error(`${a} needs a value`);
      return v;
    };
    const int = (v: string, min: number) => {
      const n = Number(v);
      if (!Number.isInteger(n) || n < min) throw new Error(`${a} wants an integer >= ${min}, got ${v}`);
      return n;
    };
    if (a === '--world') o.worlds = val().split(',').map((v) => int(v, 1));
    else if (a === '--floats') o.floats = int(val(), 0);
    else if (a === '--iters') o.iters = int(val(), 1);
    else if (a === '--warmup') o.warmup = int(val(), 0);
    else if (a === '--piece-bytes') o.pieceBytes = int(val(), 64);
    else if (a === '--transport') {
      o.transports = val().split(',').map((t) => {
        if (!TRANSPORTS.includes(t as Transport)) throw new Error(`--transport takes shm, ipc and/or tcp, got ${t}`);
        return t as Transport;
      });
    } else if (a === '--fp16') o.fp16 = true;
    else if (a === '--no-mpi') o.mpi = false;
    else if (a === '--no-kernels') o.kernels = false;
    else if (a === '--no-default-malloc') o.defaultMalloc = false;
    else if (a === '--baseline') o.baseline = resolve(val());
    else throw new Error(`unknown option ${a} (see the top of tools/bench/allreduce.ts)`);
  }
  return o;
}

interface Stats {
  meanMs: number;
  medianMs: number;
  minMs: number;
  maxMs: number;
  stdevMs: number;
  algbwGBs: number;
  busbwGBs: number;
  /** CPU time (user + system) per timed call, summed over the ranks. */
  cpuMsPerOp: number | undefined;
  samplesMs: number[];
}

interface Run {
  ms: number[];
  cpuMsPerOp?: number;
}

function stats({ ms, cpuMsPerOp }: Run, bytes: number, n: number): Stats {
  const s = [...ms].sort((a, b) => a - b);
  const mean = ms.reduce((a, b) => a + b, 0) / ms.length;
  const stdev = Math.sqrt(ms.reduce((a, b) => a + (b - mean) ** 2, 0) / ms.length);
  const algbw = bytes / (mean / 1e3) / 1e9;
  return {
    meanMs: mean, medianMs: s[Math.floor(s.length / 2)], minMs: s[0], maxMs: s[s.length - 1], stdevMs: stdev,
    algbwGBs: algbw, busbwGBs: n > 1 ? (algbw * 2 * (n - 1)) / n : 0, cpuMsPerOp, samplesMs: ms,
  };
}

// ---------------------------------------------------------------- summing kernels

function benchKernels(floats: number, pieceBytes: number): Record<string, { medianMs: number; minMs: number; GBs: number }> {
  const n = Math.max(floats, 1);
  const acc = new Float32Array(n).map(() => Math.random() - 0.5);
  const local = new Float32Array(n).map(() => Math.random() - 0.5);
  const kernels: Record<string, (o: Float32Array, x: Float32Array, y: Float32Array) => void> = {
    'js plain loop': addPlain,
    'js unrolled x8': addUnrolled,
    'wasm simd, 4K-float blocks': makeWasmAdd(4096)!,
    'wasm simd, 16K-float blocks': makeWasmAdd(16384)!,
    'wasm simd, 64K-float blocks': makeWasmAdd(65536)!,
  };
  // As the ring sums: in place (acc += local), one piece at a time. Kernels take turns in each
  // round so that noise from other processes spreads over all of them.
  const piece = Math.max(1, Math.floor(pieceBytes / 4));
  const times: Record<string, number[]> = {};
  for (let round = 0; round < 9; round++) {
    for (const [name, k] of Object.entries(kernels)) {
      const t = performance.now();
      for (let o = 0; o < n; o += piece) {
        const a = acc.subarray(o, Math.min(n, o + piece));
        k(a, a, local.subarray(o, o + a.length));
      }
      (times[name] ??= []).push(performance.now() - t);
    }
  }
  const res: Record<string, { medianMs: number; minMs: number; GBs: number }> = {};
  for (const [name, ts] of Object.entries(times)) {
    ts.sort((x, y) => x - y);
    const med = ts[Math.floor(ts.length / 2)];
    res[name] = { medianMs: med, minMs: ts[0], GBs: (3 * 4 * n) / (med / 1e3) / 1e9 };
  }
  return res;
}

// ---------------------------------------------------------------- our all-reduce

interface ChildInit {
  rank: number;
  world: number;
  floats: number;
  iters: number;
  warmup: number;
  transport: Transport;
  pieceBytes: number;
  fp16: boolean;
  /** Take Ring from this module instead of @dtrain/transport. */
  ringModule?: string;
  /** Run the ring in its own thread (ThreadedRing), as training workers do. */
  threaded?: boolean;
}

async function child(): Promise<void> {
  const init = await new Promise<ChildInit>((res) => process.once('message', (m) => res(m as ChildInit)));
  const RingClass = init.ringModule === undefined ? Ring : ((await import(init.ringModule)) as { Ring: typeof Ring }).Ring;
  const ringOpts = {
    rank: init.rank, worldSize: init.world, timeoutMs: 60_000, pieceBytes: init.pieceBytes,
    ipc: init.transport !== 'tcp', preferIpc: init.transport !== 'tcp', sharedMemory: init.transport === 'shm', runId: 'bench',
  };
  const ring = init.threaded ? await ThreadedRing.create(ringOpts) : await RingClass.create(ringOpts);
  process.send!({ endpoints: ring.endpoints });
  const peers = await new Promise<PeerInfo[]>((res) => process.once('message', (m) => res((m as { peers: PeerInfo[] }).peers)));
  await ring.connect(peers);
  const data = init.threaded ? sharedFloat32Array(init.floats) : new Float32Array(init.floats);
  for (let i = 0; i < data.length; i++) data[i] = 0.5 + Math.random();
  const barrier = init.threaded ? sharedFloat32Array(init.world) : new Float32Array(init.world);
  const ms: number[] = [];
  let cpu0 = process.cpuUsage();
  for (let it = 0; it < init.warmup + init.iters; it++) {
    if (it === init.warmup) cpu0 = process.cpuUsage();
    await ring.allReduce(barrier);
    const t0 = performance.now();
    await ring.allReduce(data, { fp16: init.fp16 });
    const dt = performance.now() - t0;
    if (it >= init.warmup) ms.push(dt);
  }
  const cpu = process.cpuUsage(cpu0);
  const st = ring.stats();
  await ring.close();
  if (init.transport === 'shm' && !st.shm.toNext) throw new Error(`rank ${init.rank}: its link to the next rank is not a shared-memory one (see the transport's log line above)`);
  process.send!({ ms, cpuMs: (cpu.user + cpu.system) / 1e3 / init.iters, spilled: st.piecesViaSocket });
  process.disconnect();
}

async function runOurs(world: number, o: Options, transport: Transport, tunedMalloc: boolean, ringModule?: string, threaded = false): Promise<Run> {
  // Workers get the environment a launcher gives them (workerEnv), unless measuring without it.
  const env = tunedMalloc ? workerEnv() : { ...process.env, GLIBC_TUNABLES: '' };
  const kids = Array.from({ length: world }, () =>
    fork(SELF, ['--child'], { execArgv: ['--import', 'tsx'], stdio: ['ignore', 'inherit', 'inherit', 'ipc'], env }),
  );
  const endpoints: string[][] = new Array(world);
  const results: number[][] = new Array(world);
  const cpuMs: number[] = new Array(world).fill(0);
  let spilled = 0;
  let got = 0;
  const exits = kids.map((k, rank) => new Promise<void>((res, rej) => {
    k.on('exit', (code) => (code === 0 ? res() : rej(new Error(`bench worker rank ${rank} exited with ${code}`))));
    k.on('message', (m: { endpoints?: string[]; ms?: number[]; cpuMs?: number; spilled?: number }) => {
      if (m.endpoints !== undefined) {
        endpoints[rank] = m.endpoints;
        if (++got === world) {
          const peers: PeerInfo[] = endpoints.map((e, r) => ({ rank: r, host: hostname(), endpoints: e }));
          for (const kid of kids) kid.send({ peers });
        }
      }
      if (m.ms !== undefined) results[rank] = m.ms;
      if (m.cpuMs !== undefined) cpuMs[rank] = m.cpuMs;
      if (m.spilled !== undefined) spilled += m.spilled;
    });
    k.send({ rank, world, floats: o.floats, iters: o.iters, warmup: o.warmup, transport, pieceBytes: o.pieceBytes, fp16: o.fp16, ringModule, threaded } satisfies ChildInit);
  }));
  try {
    await Promise.all(exits);
  } finally {
    for (const k of kids) if (k.exitCode === null) k.kill('SIGKILL');
  }
  // Each call's time is its slowest rank's, as for MPI.
  if (transport === 'shm' && spilled > 0) console.log(`  (shm, ${world} ranks: ${spilled} pieces went in socket frames because every slot was still unread)`);
  return { ms: results[0].map((_, i) => Math.max(...results.map((r) => r[i]))), cpuMsPerOp: cpuMs.reduce((a, b) => a + b, 0) };
}

// ---------------------------------------------------------------- Open MPI

function mpiBinary(): string | { missing: string } {
  const hasMpicc = spawnSync('mpicc', ['--version'], { stdio: 'ignore' }).status === 0;
  const hasMpirun = spawnSync('mpirun', ['--version'], { stdio: 'ignore' }).status === 0;
  if (!hasMpicc || !hasMpirun) {
    return { missing: 'Open MPI not found: install it with `sudo apt-get install -y openmpi-bin libopenmpi-dev` (Debian/Ubuntu) and run again, or pass --no-mpi.' };
  }
  const src = join(dirname(SELF), 'allreduce_mpi.c');
  const dir = join(tmpdir(), 'dtrain-bench');
  mkdirSync(dir, { recursive: true });
  const bin = join(dir, 'allreduce_mpi');
  if (!existsSync(bin) || statSync(bin).mtimeMs < statSync(src).mtimeMs) {
    execFileSync('mpicc', ['-O2', '-o', `${bin}.tmp`, src], { stdio: 'inherit' });
    renameSync(`${bin}.tmp`, bin);
  }
  return bin;
}

function runMpi(bin: string, world: number, o: Options, tcp: boolean): Run {
  const args = ['--allow-run-as-root', '--oversubscribe', '-np', String(world)];
  if (tcp) args.push('--mca', 'btl', 'tcp,self');
  args.push(bin, String(o.floats), String(o.iters), String(o.warmup));
  const out = execFileSync('mpirun', args, {
    encoding: 'utf8', env: { ...process.env, OMPI_ALLOW_RUN_AS_ROOT: '1', OMPI_ALLOW_RUN_AS_ROOT_CONFIRM: '1' },
    stdio: ['ignore', 'pipe', 'inherit'], timeout: 600_000,
  });
  const line = out.split('\n').find((l) => l.startsWith('{'));
  if (line === undefined) throw new Error(`mpirun printed no result:\n${out}`);
  return JSON.parse(line) as Run;
}

// ---------------------------------------------------------------- main

const fmt = (x: number, d = 1) => x.toFixed(d);

export async function main(args: string[]): Promise<void> {
  if (args[0] === '--child') return child();
  const o = parse(args);
  const bytes = o.floats * 4;
  const result: Record<string, unknown> = {
    bench: 'allreduce', date: new Date().toISOString(), host: hostname(), machine: machine(), options: o, kernelUsed: addKernelNames(),
  };
  console.log(`all-reduce of ${o.floats} float32 (${(bytes / 1e6).toFixed(1)} MB), ${o.iters} timed calls after ${o.warmup} warm-up, on ${cpus().length} CPUs`);

  if (o.kernels) {
    const k = benchKernels(o.floats, o.pieceBytes);
    result.kernels = k;
    console.log(`\nsumming kernel: acc += local in place over ${o.floats} floats, in pieces of ${o.pieceBytes} bytes (9 interleaved rounds; chosen here: in place ${addKernelNames().inPlace}, into another buffer ${addKernelNames().outOfPlace})`);
    for (const [name, r] of Object.entries(k)) console.log(`  ${name.padEnd(30)} median ${fmt(r.medianMs).padStart(6)} ms  min ${fmt(r.minMs).padStart(6)} ms  ${fmt(r.GBs, 2)} GB/s`);
  }

  let mpi: string | { missing: string } = { missing: 'skipped (--no-mpi)' };
  if (o.mpi) mpi = mpiBinary();
  if (typeof mpi !== 'string') console.log(`\n${mpi.missing}`);

  const rows: Record<string, unknown>[] = [];
  for (const world of o.worlds) {
    const row: Record<string, unknown> = { world, loadAverageBefore: loadavg() };
    for (const t of o.transports) row[`ours_${t}`] = stats(await runOurs(world, o, t, true), bytes, world);
    // As training workers run it: in its own thread, on a SharedArrayBuffer.
    const first = o.transports[0];
    row.ours_thread = { transport: first, ...stats(await runOurs(world, o, first, true, undefined, true), bytes, world) };
    if (o.transports.includes('ipc') && o.defaultMalloc) row.ours_ipc_default_malloc = stats(await runOurs(world, o, 'ipc', false), bytes, world);
    if (o.baseline !== undefined) row.ours_baseline_ipc = stats(await runOurs(world, o, 'ipc', true, o.baseline), bytes, world);
    if (typeof mpi === 'string') {
      row.mpi_default = stats(runMpi(mpi, world, o, false), bytes, world);
      row.mpi_tcp = stats(runMpi(mpi, world, o, true), bytes, world);
    }
    row.loadAverageAfter = loadavg();
    rows.push(row);
  }
  result.rows = rows;

  console.log(`\n${'ranks'.padEnd(6)}${'implementation'.padEnd(26)}${'mean ms'.padStart(9)}${'median'.padStart(9)}${'min'.padStart(8)}${'max'.padStart(8)}${'stdev'.padStart(8)}${'algbw GB/s'.padStart(12)}${'busbw GB/s'.padStart(12)}${'cpu ms/op'.padStart(11)}${'ours/MPI dflt'.padStart(15)}${'ours/MPI tcp'.padStart(14)}`);
  for (const row of rows) {
    const world = row.world as number;
    const md = row.mpi_default as Stats | undefined;
    const mt = row.mpi_tcp as Stats | undefined;
    for (const [key, label] of [
      ['ours_shm', 'dtrain ring, shared mem'], ['ours_ipc', 'dtrain ring, ipc://'], ['ours_thread', `ring thread, ${o.transports[0]}`], ['ours_tcp', 'dtrain ring, tcp://'], ['ours_ipc_default_malloc', 'ring ipc, default malloc'],
      ['ours_baseline_ipc', 'baseline ring, ipc://'], ['mpi_default', 'Open MPI default (sm)'], ['mpi_tcp', 'Open MPI btl tcp,self'],
    ] as const) {
      const s = row[key] as Stats | undefined;
      if (s === undefined) continue;
      // Ratio of busbw (higher is better for us): ours/MPI > 1 means we are faster.
      const ratio = (m: Stats | undefined) => (key.startsWith('ours') && m !== undefined ? fmt(s.busbwGBs / m.busbwGBs, 2) : '');
      console.log(`${String(world).padEnd(6)}${label.padEnd(26)}${fmt(s.meanMs).padStart(9)}${fmt(s.medianMs).padStart(9)}${fmt(s.minMs).padStart(8)}${fmt(s.maxMs).padStart(8)}${fmt(s.stdevMs).padStart(8)}${fmt(s.algbwGBs, 3).padStart(12)}${fmt(s.busbwGBs, 3).padStart(12)}${(s.cpuMsPerOp === undefined ? '' : fmt(s.cpuMsPerOp)).padStart(11)}${ratio(md).padStart(15)}${ratio(mt).padStart(14)}`);
    }
    const la = (k: string) => (row[k] as number[]).map((x) => fmt(x, 2)).join(' ');
    console.log(`${''.padEnd(6)}load average before ${la('loadAverageBefore')}, after ${la('loadAverageAfter')}`);
  }
  console.log('ratio = busbw(ours) / busbw(MPI): above 1 means ours is faster. cpu ms/op: user + system time per call, all ranks.');

  const mpiVersion = spawnSync('mpirun', ['--version'], { encoding: 'utf8' }).stdout?.split('\n')[0] || null;
  console.log(`\nwrote ${writeResults('allreduce', { ...result, mpiVersion })}`);
}

if (process.argv[1] !== undefined && resolve(process.argv[1]) === SELF) {
  main(process.argv.slice(2)).catch((e: unknown) => {
    console.error(e instanceof Error ? e.message : e);
    process.exit(1);
  });
}
