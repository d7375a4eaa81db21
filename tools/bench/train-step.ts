// `pnpm bench train-step`: images/s of one full training step (forward, loss, backward, SGD
// update) at batch 64, for our ResNet (custom convolution gradients, flat-gradient seam) and,
// in the same process and run, the same network written with the tfjs layers API and trained
// with model.fit, on the same native backend. Reports both, their spread, the ratio, and the
// achieved GFLOP/s against the measured matmul GFLOP/s.
// --backend webgpu: ours on the GPU WebGPU opens, without the layers-API peer: there the peer is
// PyTorch on the same GPU (tools/bench/torch_resnet.py; tools/gpu-check.sh runs both and divides).
import * as tf from '@tensorflow/tfjs-core';
import * as tfl from '@tensorflow/tfjs-layers';
import { loadBackend, measureMatmulGflops } from '@dtrain/backend';
import { describeResNet, ResNet, type ResNetConfig } from '@dtrain/core';
import { parseArgs, stats, writeResults, type Stats } from './_common.js';

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

async function timeOurs(c: ResNetConfig, batch: number, warmup: number, steps: number): Promise<number[]> {
  const model = new ResNet(c, { seed: 1, sgd: { lr: 0.01 } });
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

interface Row {
  size: number;
  ours: Stats;
  oursSamplesS: number[];
  oursImgS: number;
  gflops: number;
  fractionOfMatmul: number;
  /** The layers-API peer, CPU only (on a GPU the peer is PyTorch: tools/bench/torch_resnet.py). */
  layers: Stats | null;
  layersSamplesS: number[] | null;
  layersImgS: number | null;
  ratio: number | null;
}

const BACKENDS = ['cpu', 'webgpu'] as const;

export async function main(args: string[]): Promise<void> {
  const o = parseArgs(args, { sizes: '32,96', batch: '64', warmup: '2', steps: '6', channels: '3', backend: 'cpu', 'allow-software-gpu': 'no' });
  const sizes = o.sizes.split(',').map(Number);
  const batch = Number(o.batch);
  const warmup = Number(o.warmup);
  const steps = Number(o.steps);
  const kind = o.backend as (typeof BACKENDS)[number];
  if (!BACKENDS.includes(kind)) throw new Error(`--backend must be one of ${BACKENDS.join(', ')}, got '${o.backend}'`);
  const { tf: tfb, versions, adapter } = await loadBackend(kind, { allowSoftwareGpu: o['allow-software-gpu'] === 'yes' });
  const matmul = await measureMatmulGflops(tfb);
  const on = adapter ? `WebGPU on ${adapter.description || adapter.device}` : `TensorFlow ${versions.tensorflow}`;
  console.log(`backend ${kind}: tfjs ${versions.tfjs}, ${on}; matmul ${matmul.toFixed(1)} GFLOP/s; batch ${batch}, ${warmup} warm-up + ${steps} timed steps`);
  const rows: Row[] = [];
  for (const size of sizes) {
    const c: ResNetConfig = { inChannels: Number(o.channels), classes: 10, imageSize: size };
    const trainFlops = 3 * describeResNet(c).flopsPerImage * batch;
    const oursSamplesS = await timeOurs(c, batch, warmup, steps);
    const layersSamplesS = kind === 'cpu' ? await timeLayers(c, batch, warmup, steps) : null;
    const ours = stats(oursSamplesS);
    const layers = layersSamplesS && stats(layersSamplesS);
    const row: Row = {
      size,
      ours,
      layers,
      oursSamplesS,
      layersSamplesS,
      oursImgS: batch / ours.median,
      layersImgS: layers && batch / layers.median,
      ratio: layers && layers.median / ours.median,
      gflops: trainFlops / ours.median / 1e9,
      fractionOfMatmul: trainFlops / ours.median / 1e9 / matmul,
    };
    rows.push(row);
    // Written after every size, so a run stopped by a time limit keeps what it measured.
    writeResults(kind === 'cpu' ? 'train-step' : `train-step-${kind}`, { backend: kind, versions, adapter, matmulGflops: matmul, batch, warmup, steps, results: rows });
    const peer = layers ? `layers+fit ${row.layersImgS!.toFixed(1)} img/s (${layers.median.toFixed(3)} s/step, ${layers.min.toFixed(3)}-${layers.max.toFixed(3)}), ratio ${row.ratio!.toFixed(2)}x, ` : '';
    console.log(
      `${size}x${size}: ours ${row.oursImgS.toFixed(1)} img/s (median ${ours.median.toFixed(3)} s/step, ${ours.min.toFixed(3)}-${ours.max.toFixed(3)}), ` +
        `${peer}${row.gflops.toFixed(1)} GFLOP/s = ${(100 * row.fractionOfMatmul).toFixed(0)}% of matmul`,
    );
  }
  console.log('\n| input | ours img/s | layers-API fit img/s | ratio | ours s/step median (min-max) | layers s/step median (min-max) | ours GFLOP/s (% of matmul) |');
  console.log('| --- | --- | --- | --- | --- | --- | --- |');
  const f = (x: number | null, d: number, unit = '') => (x === null ? '-' : `${x.toFixed(d)}${unit}`);
  for (const r of rows) {
    const l = r.layers ? `${r.layers.median.toFixed(3)} (${r.layers.min.toFixed(3)}-${r.layers.max.toFixed(3)})` : '-';
    console.log(
      `| ${r.size}x${r.size} | ${r.oursImgS.toFixed(1)} | ${f(r.layersImgS, 1)} | ${f(r.ratio, 2, 'x')} | ${r.ours.median.toFixed(3)} (${r.ours.min.toFixed(3)}-${r.ours.max.toFixed(3)}) | ${l} | ${r.gflops.toFixed(1)} (${(100 * r.fractionOfMatmul).toFixed(0)}%) |`,
    );
  }
  const file = writeResults(kind === 'cpu' ? 'train-step' : `train-step-${kind}`, { backend: kind, versions, adapter, matmulGflops: matmul, batch, warmup, steps, results: rows });
  console.log(`\nwrote ${file}`);
  // Dawn keeps the process alive while it holds the GPU.
  if (kind !== 'cpu') process.exit(0);
}
