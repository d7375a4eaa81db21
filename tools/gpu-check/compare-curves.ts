// tools/gpu-check.sh's torch-curves step: the loss curve of a run on CUDA against the same run on
// the CPU (same seed, data order and settings; the runs differ only in float rounding).
//   node --import tsx tools/gpu-check/compare-curves.ts GPU_RUN CPU_RUN OUT_FILE
// "Within noise": every 10-step window's mean loss differs by at most 3x the standard deviation of
// the CPU curve's own window-to-window changes over the second half (how much the curve jitters by
// itself), and the first window, before rounding differences can grow, by at most 1%.
import fs from 'node:fs';
import { readMetrics, type StepMetrics } from '@dtrain/worker';

const [gpuRun, cpuRun, outFile] = process.argv.slice(2);
if (!outFile) throw new Error('usage: compare-curves.ts GPU_RUN CPU_RUN OUT_FILE');
const steps = async (dir: string) => (await readMetrics(dir)).filter((m): m is StepMetrics => m.kind === 'step').sort((a, b) => a.step - b.step);
const [gpu, cpu] = [await steps(gpuRun), await steps(cpuRun)];
if (gpu.length === 0 || gpu.length !== cpu.length) throw new Error(`the runs logged ${gpu.length} and ${cpu.length} step lines`);
const half = cpu.slice(Math.floor(cpu.length / 2));
const jumps = half.slice(1).map((m, i) => m.loss - half[i].loss);
const mean = jumps.reduce((a, b) => a + b, 0) / jumps.length;
const noise = Math.sqrt(jumps.reduce((a, b) => a + (b - mean) ** 2, 0) / Math.max(1, jumps.length - 1));
const rows = gpu.map((g, i) => ({ step: g.step, gpu: g.loss, cpu: cpu[i].loss, diff: Math.abs(g.loss - cpu[i].loss) }));
const first = rows[0].diff / rows[0].cpu;
const worst = Math.max(...rows.map((r) => r.diff));
const pass = first <= 0.01 && worst <= 3 * noise;
fs.writeFileSync(outFile, `${JSON.stringify({ pass, firstRelative: first, worstDiff: worst, noise, rows }, null, 2)}\n`);
console.log(rows.map((r) => `step ${r.step}: gpu ${r.gpu.toFixed(4)} cpu ${r.cpu.toFixed(4)}`).join('\n'));
console.log(`first window ${(100 * first).toFixed(3)}% apart; worst ${worst.toFixed(4)} vs 3 x the CPU curve's jitter ${(3 * noise).toFixed(4)}: ${pass ? 'PASS' : 'FAIL'}`);
process.exit(pass ? 0 : 1);
