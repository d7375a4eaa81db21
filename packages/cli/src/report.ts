// `dtrain report RUN_DIR [--png FILE] [--html FILE]`: plots of a finished (or interrupted) run
// from its metrics.jsonl: loss and accuracy per epoch, throughput over time, step-phase breakdown.
//
// Plotting library, compared on this machine (Node 20, no network but the npm registry):
// - Apache ECharts 6 (`echarts`) with its server-side SVG renderer (`init(null, null, {ssr: true,
//   renderer: 'svg'})`, `renderToSVGString()`): 3 packages in all (echarts, zrender, tslib), no DOM
//   or canvas needed, stacked bars, dual series and legends built in; 67 MB on disk.
// - Vega-Lite 6 compiled to Vega 6, rendered with `new View(..., {renderer: 'none'}).toSVG()`:
//   also no canvas needed, a concise declarative spec, 25 MB but 79 packages (the d3 modules);
//   without node-canvas it estimates text widths.
// Both are well kept. ECharts is chosen: one dependency to trust instead of 79, and its SSR path is
// the documented way to use it in Node. Canvas-based libraries (chart.js with node-canvas,
// chartjs-node-canvas) were ruled out: node-canvas needs a native build or a binary download.
// SVG to PNG: @resvg/resvg-js (Rust resvg; its prebuilt binary ships as an npm package, so it
// installs offline). The HTML page inlines the same SVGs: self-contained, no script, no network.
import path from 'node:path';
import { Resvg } from '@resvg/resvg-js';
import * as echarts from 'echarts';
import { readRun, RunFolderError, runStatus, writeFileAtomic, type EpochMetrics, type RunFiles } from '@dtrain/worker';

const CHART_W = 700;
const CHART_H = 400;
const COLORS = ['#1f77b4', '#d62728', '#2ca02c', '#ff7f0e', '#9467bd', '#8c564b', '#7f7f7f'];

type Point = [number, number];

export interface Chart {
  id: string;
  title: string;
  svg: string;
}

/** Optimiser steps per epoch, from the run's own numbers (DistributedSampler pads, keeps the short batch). */
function stepsPerEpoch(run: RunFiles): number | null {
  const cfg = run.config as RunFiles['config'] & { data?: { train?: { images?: number } } };
  const images = cfg.data?.train?.images;
  if (typeof images === 'number' && images > 0) return Math.ceil(Math.ceil(images / run.config.worldSize) / (run.config.settings.batchSize * (run.config.settings.accumulate ?? 1)));
  const first = run.epochs.find((e) => e.epoch === 1);
  return first ? first.step : null;
}

/**
 * The legend of the step lines' series: config.json's logEverySteps, or in a config without it the
 * first line's window. Only for a run that has step lines.
 */
function stepSeriesName(run: RunFiles): string {
  const every = run.config.settings.logEverySteps ?? run.steps[0].steps;
  return every === 1 ? 'every step' : `every ${every} steps`;
}

function render(option: echarts.EChartsCoreOption): string {
  const chart = echarts.init(null, null, { renderer: 'svg', ssr: true, width: CHART_W, height: CHART_H });
  try {
    chart.setOption({ animation: false, color: COLORS, textStyle: { fontFamily: 'DejaVu Sans, Arial, sans-serif' }, ...option });
    return chart.renderToSVGString();
  } finally {
    chart.dispose();
  }
}

const base = (title: string, subtitle: string) => ({
  title: { text: title, subtext: subtitle, left: 'center', textStyle: { fontSize: 16 }, subtextStyle: { fontSize: 11 } },
  // ECharts estimates text widths without a font; generous gaps keep DejaVu labels apart.
  legend: { bottom: 6, itemGap: 34, textStyle: { fontSize: 11 } },
  grid: { left: 64, right: 36, top: 66, bottom: 80 },
});

const line = (name: string, data: Point[], o: { thin?: boolean } = {}) => ({
  name,
  type: 'line',
  data,
  showSymbol: !o.thin && data.length <= 60,
  symbolSize: 6,
  lineStyle: { width: o.thin ? 1 : 2.5, opacity: o.thin ? 0.55 : 1 },
});

function lossChart(run: RunFiles, spe: number | null): Chart {
  const series = [line('train (epoch mean)', run.epochs.map((e) => [e.epoch, e.loss])), line('test (after epoch)', run.epochs.map((e) => [e.epoch, e.testLoss]))];
  if (spe && run.steps.length > 0) series.push(line(`train (${stepSeriesName(run)})`, run.steps.map((s) => [s.step / spe, s.loss]), { thin: true }));
  return {
    id: 'loss',
    title: 'Loss',
    svg: render({
      ...base('Loss', run.config.settings.labelSmoothing ? `train: cross-entropy with label smoothing ${run.config.settings.labelSmoothing}, test: plain; epoch means` : 'cross-entropy; epoch means, test split after each epoch'),
      xAxis: { type: 'value', name: 'epoch', nameLocation: 'middle', nameGap: 26, min: 0 },
      yAxis: { type: 'value', name: 'loss', scale: true },
      series,
    }),
  };
}

function accuracyChart(run: RunFiles, spe: number | null): Chart {
  const pct = (x: number) => Math.round(x * 10000) / 100;
  const series = [line('train (epoch)', run.epochs.map((e) => [e.epoch, pct(e.trainAcc)])), line('test (after epoch)', run.epochs.map((e) => [e.epoch, pct(e.testAcc)]))];
  if (spe && run.steps.length > 0) series.push(line(`train (${stepSeriesName(run)})`, run.steps.map((s) => [s.step / spe, pct(s.trainAcc)]), { thin: true }));
  const best = run.epochs.reduce<EpochMetrics | null>((b, e) => (!b || e.testAcc > b.testAcc ? e : b), null);
  return {
    id: 'accuracy',
    title: 'Accuracy',
    svg: render({
      ...base('Accuracy', best ? `best test ${pct(best.testAcc)}% at epoch ${best.epoch}` : 'no finished epoch yet'),
      xAxis: { type: 'value', name: 'epoch', nameLocation: 'middle', nameGap: 26, min: 0 },
      yAxis: { type: 'value', name: '%', min: 0, max: 100 },
      series,
    }),
  };
}

/**
 * Images per second of all workers against minutes since the start: per step line and per epoch.
 * A step line's imagesPerSec already counts every rank's images (the step's global sums).
 */
export function throughputPoints(run: RunFiles): { steps: Point[]; epochs: Point[] } {
  const times = [...run.steps.map((s) => s.time), ...run.epochs.map((e) => e.time)].map((t) => Date.parse(t)).filter(Number.isFinite);
  const created = run.config.createdAt ? Date.parse(run.config.createdAt) : NaN;
  const t0 = Number.isFinite(created) ? created : Math.min(...times);
  const min = (t: string) => Math.round(((Date.parse(t) - t0) / 60_000) * 1000) / 1000;
  return { steps: run.steps.map((s) => [min(s.time), s.imagesPerSec]), epochs: run.epochs.map((e) => [min(e.time), e.imagesPerSec]) };
}

function throughputChart(run: RunFiles): Chart {
  const w = run.config.worldSize;
  const points = throughputPoints(run);
  const series = [line('epoch average', points.epochs)];
  if (run.steps.length > 0) series.unshift(line(stepSeriesName(run), points.steps, { thin: true }));
  return {
    id: 'throughput',
    title: 'Throughput',
    svg: render({
      ...base('Throughput', `training images per second, all ${w} worker${w > 1 ? 's' : ''}`),
      xAxis: { type: 'value', name: 'minutes since start', nameLocation: 'middle', nameGap: 26, min: 0 },
      yAxis: { type: 'value', name: 'images/s', min: 0 },
      series,
    }),
  };
}

const PHASES = [
  ['data', 'data'],
  ['compute', 'forward + backward'],
  ['allReduce', 'all-reduce'],
  ['optimizer', 'optimizer'],
  ['other', 'other'],
] as const;

/** Seconds per step of each phase, per epoch (rank 0's figures). */
export function phaseBreakdown(run: RunFiles): Array<{ epoch: number; perStep: Record<(typeof PHASES)[number][0], number> }> {
  if (run.epochs.length > 0) {
    const spe = stepsPerEpoch(run);
    return run.epochs.map((e, i) => {
      const before = run.epochs[i - 1];
      const prev = before && before.epoch === e.epoch - 1 ? before.step : e.epoch === 1 ? 0 : spe !== null ? e.step - spe : 0;
      const steps = Math.max(1, e.step - prev);
      const p = e.phaseSec;
      return { epoch: e.epoch, perStep: { data: p.data / steps, compute: p.compute / steps, allReduce: p.allReduce / steps, optimizer: p.optimizer / steps, other: p.other / steps } };
    });
  }
  // No finished epoch: the step lines, summed per epoch (no `other`: they time the phases only).
  const by = new Map<number, { steps: number; p: Record<string, number> }>();
  for (const s of run.steps) {
    const a = by.get(s.epoch) ?? { steps: 0, p: { data: 0, compute: 0, allReduce: 0, optimizer: 0 } };
    a.steps += s.steps;
    for (const k of ['data', 'compute', 'allReduce', 'optimizer'] as const) a.p[k] += s.phaseSec[k];
    by.set(s.epoch, a);
  }
  return [...by].map(([epoch, a]) => ({ epoch, perStep: { data: a.p.data / a.steps, compute: a.p.compute / a.steps, allReduce: a.p.allReduce / a.steps, optimizer: a.p.optimizer / a.steps, other: 0 } }));
}

function phaseChart(run: RunFiles): Chart {
  const rows = phaseBreakdown(run);
  const r3 = (x: number) => Math.round(x * 1000) / 1000;
  return {
    id: 'phases',
    title: 'Step phases',
    svg: render({
      ...base('Step-phase breakdown', 'seconds per step on rank 0, stacked: the bar is the step time'),
      xAxis: { type: 'category', name: 'epoch', nameLocation: 'middle', nameGap: 26, data: rows.map((r) => String(r.epoch)) },
      yAxis: { type: 'value', name: 's/step', min: 0 },
      series: PHASES.map(([k, label]) => ({ name: label, type: 'bar', stack: 'step', barMaxWidth: 48, data: rows.map((r) => r3(r.perStep[k])) })),
    }),
  };
}

export function buildCharts(run: RunFiles): Chart[] {
  if (run.epochs.length === 0 && run.steps.length === 0) {
    throw new RunFolderError(run.dir, 'metrics.jsonl has no step or epoch lines yet: nothing to plot (lines appear every --log-every steps and after each epoch)');
  }
  const spe = stepsPerEpoch(run);
  return [lossChart(run, spe), accuracyChart(run, spe), throughputChart(run), phaseChart(run)];
}

const esc = (s: string) => s.replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;').replace(/"/g, '&quot;');

function fmtSec(s: number): string {
  if (!Number.isFinite(s)) return '-';
  if (s < 120) return `${s.toFixed(1)} s`;
  if (s < 7200) return `${(s / 60).toFixed(1)} min`;
  return `${(s / 3600).toFixed(2)} h`;
}

/** What became of the run, as the title says it. */
function statusText(run: RunFiles): string {
  const done = run.epochs[run.epochs.length - 1]?.epoch ?? 0;
  const of = `${done} of ${run.config.settings.epochs} epochs`;
  switch (runStatus(run)) {
    case 'completed':
      return 'completed';
    case 'stopped':
      return `stopped after ${of}`;
    case 'diverged':
      return `diverged after ${of}`;
    case 'incomplete':
      return `incomplete: ${of}`;
  }
}

/** A short run logs no step line when it makes fewer steps than --log-every: say so, and what to do. */
function missingStepLines(run: RunFiles): string[] {
  const last = run.epochs[run.epochs.length - 1];
  if (run.steps.length > 0 || !last) return [];
  const every = run.config.settings.logEverySteps;
  const why = every ? ` (one every ${every} steps, and the run made ${last.step})` : '';
  return [`no step lines in metrics.jsonl${why}: the charts show epochs only; train with a smaller --log-every to see the course within an epoch`];
}

/** One line per fact about the run, for the PNG header and the HTML page. */
export function runFacts(run: RunFiles): { title: string; lines: string[] } {
  const c = run.config;
  const s = run.summary;
  const last = run.epochs[run.epochs.length - 1];
  // `??`: a summary's NaN (no finished epoch) reads back as null.
  const acc = s?.finalTestAcc ?? last?.testAcc;
  const secs = s?.totalSec ?? last?.totalElapsedSec;
  const ips = s?.imagesPerSec ?? last?.imagesPerSec;
  const best = s && s.bestEpoch > 0 ? ` (best ${(s.bestTestAcc * 100).toFixed(2)}% at epoch ${s.bestEpoch})` : '';
  return {
    title: `${run.name}: ${c.settings.dataset}, ${c.worldSize} worker${c.worldSize > 1 ? 's' : ''} (${statusText(run)})`,
    lines: [
      `epochs ${c.settings.epochs}, global batch ${c.globalBatch}, lr ${c.settings.lr}, image ${c.settings.imageSize}px, backend ${c.settings.backend ?? '-'}${c.settings.engine === 'torch' ? ' (torch engine)' : ''}${c.createdAt ? `, started ${c.createdAt.replace('T', ' ').replace(/\.\d+Z$/, ' UTC')}` : ''}`,
      `test accuracy ${acc === undefined ? '-' : `${(acc * 100).toFixed(2)}%`}${best}, ${fmtSec(secs ?? NaN)}, ${ips === undefined ? '-' : ips.toFixed(1)} images/s`,
      ...(s?.stopReason ? [`${runStatus(run)}: ${s.stopReason}`] : []),
      ...missingStepLines(run),
    ],
  };
}

/** The four charts in a 2x2 grid under a header, as one SVG. */
export function composeSvg(run: RunFiles, charts: Chart[]): string {
  const cols = 2;
  const rows = Math.ceil(charts.length / cols);
  const W = cols * CHART_W;
  const f = runFacts(run);
  // The title, then 20 px per fact line (two lines: 96 px).
  const header = 56 + 20 * f.lines.length;
  const H = header + rows * CHART_H;
  const parts = [
    `<svg xmlns="http://www.w3.org/2000/svg" xmlns:xlink="http://www.w3.org/1999/xlink" width="${W}" height="${H}" viewBox="0 0 ${W} ${H}">`,
    `<rect width="${W}" height="${H}" fill="#ffffff"/>`,
    `<text x="24" y="34" font-family="DejaVu Sans, Arial, sans-serif" font-size="20" font-weight="bold" fill="#222">${esc(f.title)}</text>`,
    ...f.lines.map((l, i) => `<text x="24" y="${60 + i * 20}" font-family="DejaVu Sans, Arial, sans-serif" font-size="13" fill="#444">${esc(l)}</text>`),
  ];
  charts.forEach((c, i) => {
    const x = (i % cols) * CHART_W;
    const y = header + Math.floor(i / cols) * CHART_H;
    parts.push(c.svg.replace(/^<svg /, `<svg x="${x}" y="${y}" `));
  });
  parts.push('</svg>');
  return parts.join('\n');
}

export function renderPng(svg: string): Buffer {
  const r = new Resvg(svg, {
    background: '#ffffff',
    font: { loadSystemFonts: true, defaultFontFamily: 'DejaVu Sans', sansSerifFamily: 'DejaVu Sans' },
  });
  return r.render().asPng();
}

export function renderHtml(run: RunFiles, charts: Chart[]): string {
  const f = runFacts(run);
  const num = (x: number, d: number) => (Number.isFinite(x) ? x.toFixed(d) : '-');
  const rows = run.epochs
    .map((e) => `<tr><td>${e.epoch}</td><td>${num(e.loss, 4)}</td><td>${num(e.testLoss, 4)}</td><td>${num(e.trainAcc * 100, 2)}%</td><td>${num(e.testAcc * 100, 2)}%</td><td>${num(e.elapsedSec, 1)}</td><td>${num(e.imagesPerSec, 1)}</td><td>${num(e.phaseShare.allReduce * 100, 1)}%</td></tr>`)
    .join('\n');
  return `<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>${esc(`dtrain report: ${run.name}`)}</title>
<style>
body { font-family: "DejaVu Sans", Arial, sans-serif; margin: 24px; color: #222; max-width: 1440px; }
h1 { font-size: 20px; margin: 0 0 8px; }
p.fact { margin: 2px 0; color: #444; font-size: 14px; }
.charts { display: flex; flex-wrap: wrap; gap: 8px; margin: 16px 0; }
figure { margin: 0; border: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 13px; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
th { background: #f3f3f3; }
</style>
</head>
<body>
<h1>${esc(f.title)}</h1>
${f.lines.map((l) => `<p class="fact">${esc(l)}</p>`).join('\n')}
<div class="charts">
${charts.map((c) => `<figure id="${c.id}" aria-label="${esc(c.title)}">\n${c.svg}\n</figure>`).join('\n')}
</div>
<h2>Epochs</h2>
<table>
<tr><th>epoch</th><th>train loss</th><th>test loss</th><th>train acc</th><th>test acc</th><th>seconds</th><th>images/s</th><th>all-reduce share</th></tr>
${rows}
</table>
<p class="fact">From ${esc(path.join(run.dir, 'metrics.jsonl'))}${run.badLines ? ` (${run.badLines} unreadable line${run.badLines > 1 ? 's' : ''} skipped)` : ''}.</p>
</body>
</html>
`;
}


export async function writeReport(runDir: string, o: { png?: string; html?: string }): Promise<{ run: RunFiles; written: string[] }> {
  const run = await readRun(runDir);
  const charts = buildCharts(run);
  const written: string[] = [];
  if (o.png) {
    await writeFileAtomic(o.png, renderPng(composeSvg(run, charts)));
    written.push(o.png);
  }
  if (o.html) {
    await writeFileAtomic(o.html, renderHtml(run, charts));
    written.push(o.html);
  }
  return { run, written };
}
