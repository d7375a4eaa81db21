// `pnpm bench train-step`: images/s of one full training step (forward, loss, backward, SGD
// update) at batch 64, for our ResNet (custom convolution gradients, flat-gradient seam) and,
// in the same process and run, the same network written with the tfjs layers API and trained
// with model.fit, on the same native backend. Reports both, their spread, the ratio, and the
// achieved GFLOP/s against the measured matmul GFLOP/s.
// --backend webgpu: ours on the GPU WebGPU opens, without the layers-API peer: there the peer is
// PyTorch on the same GPU (tools/bench/torch_resnet.py; tools/gpu-check.sh runs both and divides).
// --engines tfjs,torch,torch-cl: also the libtorch engine (NCHW; channels-last), and --pytorch
// PYTHON: PyTorch itself (tools/bench/torch_resnet.py --device cpu, fp32) in the same run, per size
// right after ours; the ratios to PyTorch are what a user of PyTorch DDP compares.
import { spawn } from 'node:child_process';
import os from 'node:os';
import path from 'node:path';
import { createInterface } from 'node:readline';
import * as tf from '@tensorflow/tfjs-core';
import * as tfl from '@tensorflow/tfjs-layers';
import { loadBackend, measureMatmulGflops } from '@dtrain/backend';
import { describeResNet, ResNet, type ResNetConfig, type TrainableModel } from '@dtrain/core';
import { REPO_ROOT, parseArgs, stats, writeResults, type Stats } from './_common.js';

/** The tutorial network in the layers API, with explicit padding so shapes match PyTorch's. */
export function buildLayersResNet(c: ResNetConfig): tfl.LayersModel {
  const L = tfl.layers;
  const init = 'glorotUniform';
  const conv = (x: tfl.SymbolicTensor, filters: number, k: number, stride: number, pad: number, useBias: boolean) => {
    const xp = pad > 0 ? (L.zeroPadding2d({ padding: pad }).apply(x) as tfl.SymbolicTensor) : x;
    return L.conv2d({ filters, kernelSize: k, strides: stride, padding: 'valid', useBias, kernelInitializer: init }).apply(xp) as tfl.SymbolicTensor;
  };
  const bn = (x: tfl.SymbolicTensor, eps: number) => L.batchNormalization({ epsilon: eps, momentum: 0.9 }).apply(x) as tfl.SymbolicTensor;
  const relu = (x: tfl.SymbolicTensor) => L.reLU().apply(x) as tfl.SymbolicTensor;
  const input = tfl.input({ shape: [c.imageSize, c.imageSize, c.inChannels] });
  let x = relu(bn(conv(input, 64, 7, 2, 0, true), 1e-3));
  x = L.maxPooling2d({ poolSize: 3, strides: 2, padding: 'valid' }).apply(L.zeroPadding2d({ padding: 1 }).apply(x)) as tfl.SymbolicTensor;
  for (const b of describeResNet(c).blocks) {
    let y = relu(bn(conv(x, b.conv1.outChannels, 3, b.conv1.stride, 1, false), 1e-5));
    y = relu(bn(conv(y, b.conv2.outChannels, 3, 1, 1, false), 1e-5));
    const sc = b.shortcut ? conv(x, b.shortcut.outChannels, 1, b.shortcut.stride, 0, true) : x;
    x = relu(L.add().apply([y, sc]) as tfl.SymbolicTensor);
  }
  x = L.globalAveragePooling2d({}).apply(x) as tfl.SymbolicTensor;
  const out = L.dense({ units: c.classes, activation: 'softmax', kernelInitializer: init }).apply(x) as tfl.SymbolicTensor;
  const model = tfl.model({ inputs: input, outputs: out });
  model.compile({ optimizer: tf.train.sgd(0.01), loss: 'categoricalCrossentropy' });
  return model;
}

function randomBatch(n: number, c: ResNetConfig) {
  const images = new Float32Array(n * c.imageSize * c.imageSize * c.inChannels);
  for (let i = 0; i < images.length; i++) images[i] = Math.random() * 2 - 1;
  const labels = Int32Array.from({ length: n }, (_, i) => i % c.classes);
  return { images, labels, n };
}

/** One model per engine name: tfjs (ours on the loaded backend), torch / torch-cl (libtorch, NCHW / channels-last). */
async function makeModel(engine: string, c: ResNetConfig): Promise<TrainableModel> {
  if (engine === 'tfjs') return new ResNet(c, { seed: 1, sgd: { lr: 0.01 } });
  const { TorchResNet } = await import('@dtrain/torch-engine');
  // Every core of the machine, as tfjs-node and PyTorch use by default.
  return new TorchResNet(c, { seed: 1, sgd: { lr: 0.01 }, threads: os.availableParallelism(), channelsLast: engine === 'torch-cl' });
}

/** Something whose training steps we time: ours on an engine, or PyTorch in its own process. */
interface Contender {
  name: string;
  /** Runs `k` steps; seconds of each. */
  steps(k: number): Promise<number[]>;
  dispose(): void;
}

async function ours(engine: string, c: ResNetConfig, batch: number): Promise<Contender> {
  const model = await makeModel(engine, c);
  const b = randomBatch(batch, c);
  const grads = new Float32Array(model.paramCount);
  return {
    name: engine,
    async steps(k) {
      const times: number[] = [];
      for (let i = 0; i < k; i++) {
        const t0 = performance.now();
        // A process training alone: the engine's fused step where it has one (as the trainer does).
        if (model.trainStep) await model.trainStep(b);
        else {
          await model.computeGradients(b, grads);
          model.applyGradients(grads);
        }
        times.push((performance.now() - t0) / 1000);
      }
      return times;
    },
    dispose: () => model.dispose(),
  };
}

/**
 * PyTorch itself on the CPU (tools/bench/torch_resnet.py --serve, fp32 in `mode`): one process
 * that keeps its model and times steps on request, so its rounds interleave with ours.
 */
function pytorch(python: string, mode: string, c: ResNetConfig, batch: number): Contender & { version: () => string | null } {
  const script = path.join(REPO_ROOT, 'tools', 'bench', 'torch_resnet.py');
  const child = spawn(python, [script, '--serve', '--device', 'cpu', '--channels', String(c.inChannels), '--batch', String(batch)], { stdio: ['pipe', 'pipe', 'inherit'] });
  const lines = createInterface({ input: child.stdout! });
  const waiting: Array<(line: string) => void> = [];
  lines.on('line', (l) => waiting.shift()?.(l));
  let version: string | null = null;
  return {
    name: `PyTorch ${mode}`,
    steps(k) {
      return new Promise((resolve, reject) => {
        const onExit = (code: number | null) => reject(new Error(`${python} ${script} --serve exited with ${code}`));
        child.once('exit', onExit);
        waiting.push((l) => {
          child.off('exit', onExit);
          const r = JSON.parse(l) as { torch: string; seconds: number[] };
          version = r.torch;
          resolve(r.seconds);
        });
        child.stdin!.write(`${c.imageSize} ${mode} ${k}\n`);
      });
    },
    dispose: () => child.stdin!.end(),
    version: () => version,
  };
}

async function timeLayers(c: ResNetConfig, batch: number, warmup: number, steps: number): Promise<number[]> {
  const model = buildLayersResNet(c);
  const b = randomBatch(batch * (warmup + steps), c);
  const x = tf.tensor4d(b.images, [b.n, c.imageSize, c.imageSize, c.inChannels]);
  const y = tf.oneHot(tf.tensor1d(b.labels, 'int32'), c.classes);
  const times: number[] = [];
  let t0 = performance.now();
  await model.fit(x, y, {
    batchSize: batch,
    epochs: 1,
    shuffle: false,
    verbose: 0,
    callbacks: {
      onBatchBegin: async () => {
        t0 = performance.now();
      },
      onBatchEnd: async (i) => {
        if (i >= warmup) times.push((performance.now() - t0) / 1000);
      },
    },
  });
  tf.dispose([x, y]);
  model.dispose();
  return times;
}

interface Measured {
  stats: Stats;
  samplesS: number[];
  imgS: number;
  /** Training GFLOP/s (3x the forward FLOPs) and its fraction of the measured matmul rate. */
  gflops: number;
  fractionOfMatmul: number;
}

interface Row {
  size: number;
  /** Every contender over all rounds: ours per engine (tfjs, torch, torch-cl), PyTorch per mode. */
  results: Record<string, Measured>;
  /** The layers-API peer (tfjs backend cpu only; not interleaved). */
  layers: Measured | null;
  /**
   * PyTorch fp32 (NCHW) median step time over each engine's, per round (the contenders take turns
   * within a round, so a noisy neighbour slows both alike): median and range over the rounds.
   * >1: ours is faster.
   */
  ratioToPyTorch: Record<string, { median: number; min: number; max: number; perRound: number[] }>;
  /** tfjs engine vs the layers API, as before. */
  ratio: number | null;
}

const BACKENDS = ['cpu', 'webgpu'] as const;
const ENGINES = ['tfjs', 'torch', 'torch-cl'];

function measured(samplesS: number[], batch: number, trainFlops: number, matmul: number): Measured {
  const st = stats(samplesS);
  return { stats: st, samplesS, imgS: batch / st.median, gflops: trainFlops / st.median / 1e9, fractionOfMatmul: trainFlops / st.median / 1e9 / matmul };
}

export async function main(args: string[]): Promise<void> {
  const o = parseArgs(args, { sizes: '32,96', batch: '64', warmup: '2', steps: '6', rounds: '1', channels: '3', backend: 'cpu', 'allow-software-gpu': 'no', engines: 'tfjs', pytorch: 'no', 'pytorch-modes': 'fp32,fp32-cl', layers: 'yes' });
  const sizes = o.sizes.split(',').map(Number);
  const batch = Number(o.batch);
  const warmup = Number(o.warmup);
  const steps = Number(o.steps);
  const rounds = Number(o.rounds);
  const kind = o.backend as (typeof BACKENDS)[number];
  if (!BACKENDS.includes(kind)) throw new Error(`--backend must be one of ${BACKENDS.join(', ')}, got '${o.backend}'`);
  const engines = o.engines.split(',');
  for (const e of engines) if (!ENGINES.includes(e)) throw new Error(`--engines: '${e}' is not one of ${ENGINES.join(', ')}`);
  if (kind !== 'cpu' && engines.some((e) => e !== 'tfjs')) throw new Error('--engines torch runs on the CPU here (on CUDA: tools/gpu-check)');
  const python = o.pytorch === 'no' ? null : o.pytorch;
  const modes = python ? o['pytorch-modes'].split(',') : [];
  const { tf: tfb, versions, adapter } = await loadBackend(kind, { allowSoftwareGpu: o['allow-software-gpu'] === 'yes' });
  const matmul = await measureMatmulGflops(tfb);
  const on = adapter ? `WebGPU on ${adapter.description || adapter.device}` : `TensorFlow ${versions.tensorflow}`;
  console.log(`backend ${kind}: tfjs ${versions.tfjs}, ${on}; matmul ${matmul.toFixed(1)} GFLOP/s; batch ${batch}; ${rounds} round(s) of ${steps} timed steps per contender after ${warmup} warm-up; engines ${engines.join(', ')}${python ? `; PyTorch (${modes.join(', ')}) via ${python}` : ''}`);
  const rows: Row[] = [];
  let pytorchVersion: string | null = null;
  const name = kind === 'cpu' ? 'train-step' : `train-step-${kind}`;
  for (const size of sizes) {
    const c: ResNetConfig = { inChannels: Number(o.channels), classes: 10, imageSize: size };
    const trainFlops = 3 * describeResNet(c).flopsPerImage * batch;
    const m = (xs: number[]) => measured(xs, batch, trainFlops, matmul);
    const contenders: Contender[] = [];
    for (const e of engines) contenders.push(await ours(e, c, batch));
    const peers = python ? modes.map((mode) => pytorch(python, mode, c, batch)) : [];
    contenders.push(...peers);
    const samples = new Map<string, number[][]>(contenders.map((x) => [x.name, []]));
    for (const x of contenders) await x.steps(warmup);
    for (let r = 0; r < rounds; r++) for (const x of contenders) samples.get(x.name)!.push(await x.steps(steps));
    for (const x of contenders) x.dispose();
    pytorchVersion = peers[0]?.version() ?? pytorchVersion;
    const row: Row = { size, results: {}, layers: null, ratioToPyTorch: {}, ratio: null };
    for (const [k, v] of samples) row.results[k] = m(v.flat());
    if (kind === 'cpu' && o.layers === 'yes') row.layers = m(await timeLayers(c, batch, warmup, steps));
    const peer = samples.get('PyTorch fp32');
    if (peer) {
      for (const e of engines) {
        const perRound = samples.get(e)!.map((s, r) => stats(peer[r]).median / stats(s).median);
        const st = stats(perRound);
        row.ratioToPyTorch[e] = { median: st.median, min: st.min, max: st.max, perRound };
      }
    }
    if (row.layers && row.results.tfjs) row.ratio = row.layers.stats.median / row.results.tfjs.stats.median;
    rows.push(row);
    // Written after every size, so a run stopped by a time limit keeps what it measured.
    writeResults(name, { backend: kind, versions, pytorch: pytorchVersion, adapter, matmulGflops: matmul, batch, warmup, steps, rounds, results: rows });
    const fmt = (label: string, x: Measured) => `${label} ${x.imgS.toFixed(1)} img/s (${x.stats.median.toFixed(3)} s/step, ${x.stats.min.toFixed(3)}-${x.stats.max.toFixed(3)})`;
    console.log(`${size}x${size}: ${[...Object.entries(row.results).map(([k, v]) => fmt(k, v)), ...(row.layers ? [fmt('layers+fit', row.layers)] : [])].join('; ')}`);
  }
  const names = rows.length ? Object.keys(rows[0].results) : [];
  const cell = (x: Measured | null | undefined) => (x ? `${x.imgS.toFixed(1)} (${x.stats.median.toFixed(3)}, ${x.stats.min.toFixed(3)}-${x.stats.max.toFixed(3)})` : '-');
  const ratioCell = (x: Row['ratioToPyTorch'][string] | undefined) => (x ? `${x.median.toFixed(2)}x (${x.min.toFixed(2)}-${x.max.toFixed(2)})` : '-');
  const withRatios = python && modes.includes('fp32') ? engines : [];
  console.log(`\n| input | ${names.map((e) => `${e} img/s (s/step median, min-max)`).join(' | ')} | layers-API fit | ${withRatios.map((e) => `${e} / PyTorch fp32 (rounds' range)`).join(' | ')} |`);
  console.log(`| --- |${' --- |'.repeat(names.length + 1 + withRatios.length)}`);
  for (const r of rows) {
    console.log(`| ${r.size}x${r.size} | ${names.map((e) => cell(r.results[e])).join(' | ')} | ${cell(r.layers)} | ${withRatios.map((e) => ratioCell(r.ratioToPyTorch[e])).join(' | ')} |`);
  }
  const file = writeResults(name, { backend: kind, versions, pytorch: pytorchVersion, adapter, matmulGflops: matmul, batch, warmup, steps, rounds, results: rows });
  console.log(`\nwrote ${file}`);
  // Dawn keeps the process alive while it holds the GPU.
  if (kind !== 'cpu') process.exit(0);
}
