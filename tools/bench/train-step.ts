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
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
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

async function timeOurs(engine: string, c: ResNetConfig, batch: number, warmup: number, steps: number): Promise<number[]> {
  const model = await makeModel(engine, c);
  const b = randomBatch(batch, c);
  const grads = new Float32Array(model.paramCount);
  const times: number[] = [];
  for (let i = 0; i < warmup + steps; i++) {
    const t0 = performance.now();
    await model.computeGradients(b, grads);
    model.applyGradients(grads);
    if (i >= warmup) times.push((performance.now() - t0) / 1000);
  }
  model.dispose();
  return times;
}

/** PyTorch itself on the CPU (tools/bench/torch_resnet.py, fp32): seconds per step, and its version. */
function timePyTorch(python: string, c: ResNetConfig, batch: number, warmup: number, steps: number): { samplesS: number[]; torch: string } {
  const out = path.join(fs.mkdtempSync(path.join(os.tmpdir(), 'bench-torch-')), 'result.json');
  const script = path.join(REPO_ROOT, 'tools', 'bench', 'torch_resnet.py');
  const args = [script, '--device', 'cpu', '--modes', 'fp32', '--sizes', String(c.imageSize), '--channels', String(c.inChannels), '--batch', String(batch), '--warmup', String(warmup), '--steps', String(steps), '--out', out];
  const r = spawnSync(python, args, { encoding: 'utf8', stdio: ['ignore', 'inherit', 'inherit'] });
  if (r.status !== 0) throw new Error(`${python} ${args.join(' ')} failed (exit ${r.status ?? r.signal})`);
  const j = JSON.parse(fs.readFileSync(out, 'utf8')) as { torch: string; results: Array<{ samplesS: number[] }> };
  return { samplesS: j.results[0].samplesS, torch: j.torch };
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
  /** Ours, per engine (tfjs, torch, torch-cl). */
  engines: Record<string, Measured>;
  /** The layers-API peer (tfjs backend cpu only). */
  layers: Measured | null;
  /** PyTorch itself, fp32 on the CPU (--pytorch). */
  pytorch: Measured | null;
  /** Median step time of PyTorch over each engine's: >1 means ours is faster. */
  ratioToPyTorch: Record<string, number>;
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
  const o = parseArgs(args, { sizes: '32,96', batch: '64', warmup: '2', steps: '6', channels: '3', backend: 'cpu', 'allow-software-gpu': 'no', engines: 'tfjs', pytorch: 'no', layers: 'yes' });
  const sizes = o.sizes.split(',').map(Number);
  const batch = Number(o.batch);
  const warmup = Number(o.warmup);
  const steps = Number(o.steps);
  const kind = o.backend as (typeof BACKENDS)[number];
  if (!BACKENDS.includes(kind)) throw new Error(`--backend must be one of ${BACKENDS.join(', ')}, got '${o.backend}'`);
  const engines = o.engines.split(',');
  for (const e of engines) if (!ENGINES.includes(e)) throw new Error(`--engines: '${e}' is not one of ${ENGINES.join(', ')}`);
  if (kind !== 'cpu' && engines.some((e) => e !== 'tfjs')) throw new Error('--engines torch runs on the CPU here (on CUDA: tools/gpu-check)');
  const python = o.pytorch === 'no' ? null : o.pytorch;
  const { tf: tfb, versions, adapter } = await loadBackend(kind, { allowSoftwareGpu: o['allow-software-gpu'] === 'yes' });
  const matmul = await measureMatmulGflops(tfb);
  const on = adapter ? `WebGPU on ${adapter.description || adapter.device}` : `TensorFlow ${versions.tensorflow}`;
  console.log(`backend ${kind}: tfjs ${versions.tfjs}, ${on}; matmul ${matmul.toFixed(1)} GFLOP/s; batch ${batch}, ${warmup} warm-up + ${steps} timed steps; engines ${engines.join(', ')}${python ? `; PyTorch via ${python}` : ''}`);
  const rows: Row[] = [];
  let pytorchVersion: string | null = null;
  const name = kind === 'cpu' ? 'train-step' : `train-step-${kind}`;
  for (const size of sizes) {
    const c: ResNetConfig = { inChannels: Number(o.channels), classes: 10, imageSize: size };
    const trainFlops = 3 * describeResNet(c).flopsPerImage * batch;
    const m = (xs: number[]) => measured(xs, batch, trainFlops, matmul);
    const row: Row = { size, engines: {}, layers: null, pytorch: null, ratioToPyTorch: {}, ratio: null };
    for (const e of engines) row.engines[e] = m(await timeOurs(e, c, batch, warmup, steps));
    if (kind === 'cpu' && o.layers === 'yes') row.layers = m(await timeLayers(c, batch, warmup, steps));
    if (python) {
      const p = timePyTorch(python, c, batch, warmup, steps);
      pytorchVersion = p.torch;
      row.pytorch = m(p.samplesS);
      for (const e of engines) row.ratioToPyTorch[e] = row.pytorch.stats.median / row.engines[e].stats.median;
    }
    if (row.layers && row.engines.tfjs) row.ratio = row.layers.stats.median / row.engines.tfjs.stats.median;
    rows.push(row);
    // Written after every size, so a run stopped by a time limit keeps what it measured.
    writeResults(name, { backend: kind, versions, pytorch: pytorchVersion, adapter, matmulGflops: matmul, batch, warmup, steps, results: rows });
    const fmt = (label: string, x: Measured) => `${label} ${x.imgS.toFixed(1)} img/s (${x.stats.median.toFixed(3)} s/step, ${x.stats.min.toFixed(3)}-${x.stats.max.toFixed(3)})`;
    const parts = [...engines.map((e) => fmt(e, row.engines[e])), ...(row.layers ? [fmt('layers+fit', row.layers)] : []), ...(row.pytorch ? [fmt('PyTorch', row.pytorch)] : [])];
    console.log(`${size}x${size}: ${parts.join('; ')}`);
  }
  const f = (x: number | undefined | null, d: number, unit = '') => (x === null || x === undefined ? '-' : `${x.toFixed(d)}${unit}`);
  const cell = (x: Measured | null | undefined) => (x ? `${x.imgS.toFixed(1)} (${x.stats.median.toFixed(3)}, ${x.stats.min.toFixed(3)}-${x.stats.max.toFixed(3)})` : '-');
  console.log(`\n| input | ${engines.map((e) => `${e} img/s (s/step median, min-max)`).join(' | ')} | layers-API fit | PyTorch fp32 | ${engines.map((e) => `${e} / PyTorch`).join(' | ')} |`);
  console.log(`| --- |${' --- |'.repeat(2 * engines.length + 2)}`);
  for (const r of rows) {
    console.log(`| ${r.size}x${r.size} | ${engines.map((e) => cell(r.engines[e])).join(' | ')} | ${cell(r.layers)} | ${cell(r.pytorch)} | ${engines.map((e) => f(r.ratioToPyTorch[e], 2, 'x')).join(' | ')} |`);
  }
  const file = writeResults(name, { backend: kind, versions, pytorch: pytorchVersion, adapter, matmulGflops: matmul, batch, warmup, steps, results: rows });
  console.log(`\nwrote ${file}`);
  // Dawn keeps the process alive while it holds the GPU.
  if (kind !== 'cpu') process.exit(0);
}
