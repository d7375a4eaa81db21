// `pnpm bench train-step`: images/s of one full training step (forward, loss, backward, SGD
// update) at batch 64, for our ResNet (custom convolution gradients, flat-gradient seam) and,
// in the same process and run, the same network written with the tfjs layers API and trained
// with model.fit, on the same native backend. Reports both, their spread, the ratio, and the
// achieved GFLOP/s against the measured matmul GFLOP/s.
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

export async function main(args: string[]): Promise<void> {
  const o = parseArgs(args, { sizes: '32,96', batch: '64', warmup: '2', steps: '6', channels: '3' });
  const sizes = o.sizes.split(',').map(Number);
  const batch = Number(o.batch);
  const warmup = Number(o.warmup);
  const steps = Number(o.steps);
  const { tf: tfb, versions } = await loadBackend('cpu');
  const matmul = measureMatmulGflops(tfb);
  console.log(`native backend: tfjs ${versions.tfjs}, TensorFlow ${versions.tensorflow}; matmul ${matmul.toFixed(1)} GFLOP/s; batch ${batch}, ${warmup} warm-up + ${steps} timed steps`);
  const rows: Array<{ size: number; ours: Stats; layers: Stats; oursSamplesS: number[]; layersSamplesS: number[]; oursImgS: number; layersImgS: number; ratio: number; gflops: number; fractionOfMatmul: number }> = [];
  for (const size of sizes) {
    const c: ResNetConfig = { inChannels: Number(o.channels), classes: 10, imageSize: size };
    const trainFlops = 3 * describeResNet(c).flopsPerImage * batch;
    const oursSamplesS = await timeOurs(c, batch, warmup, steps);
    const layersSamplesS = await timeLayers(c, batch, warmup, steps);
    const ours = stats(oursSamplesS);
    const layers = stats(layersSamplesS);
    const row = {
      size,
      ours,
      layers,
      oursSamplesS,
      layersSamplesS,
      oursImgS: batch / ours.median,
      layersImgS: batch / layers.median,
      ratio: layers.median / ours.median,
      gflops: trainFlops / ours.median / 1e9,
      fractionOfMatmul: trainFlops / ours.median / 1e9 / matmul,
    };
    rows.push(row);
    console.log(
      `${size}x${size}: ours ${row.oursImgS.toFixed(1)} img/s (median ${ours.median.toFixed(3)} s/step, ${ours.min.toFixed(3)}-${ours.max.toFixed(3)}), ` +
        `layers+fit ${row.layersImgS.toFixed(1)} img/s (${layers.median.toFixed(3)} s/step, ${layers.min.toFixed(3)}-${layers.max.toFixed(3)}), ` +
        `ratio ${row.ratio.toFixed(2)}x, ${row.gflops.toFixed(1)} GFLOP/s = ${(100 * row.fractionOfMatmul).toFixed(0)}% of matmul`,
    );
  }
  console.log('\n| input | ours img/s | layers-API fit img/s | ratio | ours s/step median (min-max) | layers s/step median (min-max) | ours GFLOP/s (% of matmul) |');
  console.log('| --- | --- | --- | --- | --- | --- | --- |');
  for (const r of rows) {
    console.log(
      `| ${r.size}x${r.size} | ${r.oursImgS.toFixed(1)} | ${r.layersImgS.toFixed(1)} | ${r.ratio.toFixed(2)}x | ${r.ours.median.toFixed(3)} (${r.ours.min.toFixed(3)}-${r.ours.max.toFixed(3)}) | ${r.layers.median.toFixed(3)} (${r.layers.min.toFixed(3)}-${r.layers.max.toFixed(3)}) | ${r.gflops.toFixed(1)} (${(100 * r.fractionOfMatmul).toFixed(0)}%) |`,
    );
  }
  const file = writeResults('train-step', { versions, matmulGflops: matmul, batch, warmup, steps, results: rows });
  console.log(`\nwrote ${file}`);
}
