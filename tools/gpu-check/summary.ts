// tools/gpu-check.sh's last step: one summary of the run in OUT_DIR/gpu-check.json, and the table
// for the README and the issue note, ours / PyTorch on the same GPU in the same run.
//   node --import tsx tools/gpu-check/summary.ts OUT_DIR
import fs from 'node:fs';
import path from 'node:path';

const out = process.argv[2];
if (!out) throw new Error('usage: summary.ts OUT_DIR');
const read = <T>(name: string): T | null => {
  try {
    return JSON.parse(fs.readFileSync(path.join(out, name), 'utf8')) as T;
  } catch {
    return null;
  }
};
const text = (name: string) => (fs.existsSync(path.join(out, name)) ? fs.readFileSync(path.join(out, name), 'utf8') : '');

interface OursRow { size: number; results: Record<string, { imgS: number; stats: { median: number; min: number; max: number }; gflops: number }> }
interface TorchRow { size: number; mode: string; imgPerSec: number; secPerStep: { median: number; min: number; max: number } }
const steps = text('steps.jsonl').trim().split('\n').filter(Boolean).map((l) => JSON.parse(l) as { step: string; exit: number; seconds: number });
const ours = read<{ adapter?: unknown; batch: number; results: OursRow[] }>('train-step-webgpu.json');
const torch = read<{ torch: string; cuda: string | null; device: string; batch: number; results: TorchRow[] }>('torch.json');
const gradients = read<{ pass: boolean; rows: unknown[] }>('gradients.json');
const launchLog = text('launch.log');
const replicas = /replicas identical: state sha256 ([0-9a-f]{16}) on all (\d+) workers/.exec(launchLog);
const done = /done: .*\n\s+.* ([\d.]+) images\/s/.exec(launchLog);

const sizes = [...new Set([...(ours?.results ?? []).map((r) => r.size), ...(torch?.results ?? []).map((r) => r.size)])].sort((a, b) => a - b);
const speed = sizes.map((size) => {
  const o = ours?.results.find((r) => r.size === size);
  const t = (mode: string) => torch?.results.find((r) => r.size === size && r.mode === mode);
  const tfjs = o?.results.tfjs;
  const ratio = (mode: string) => (tfjs && t(mode) ? tfjs.imgS / t(mode)!.imgPerSec : null);
  return {
    size,
    oursImgS: tfjs?.imgS ?? null,
    oursSecPerStep: tfjs?.stats ?? null,
    torchImgS: Object.fromEntries(['fp32', 'tf32', 'bf16-cl'].map((m) => [m, t(m)?.imgPerSec ?? null])),
    ratio: { fp32: ratio('fp32'), tf32: ratio('tf32'), 'bf16-cl': ratio('bf16-cl') },
  };
});
const at96 = speed.find((s) => s.size === 96);
const summary = {
  writtenAt: new Date().toISOString(),
  gpu: text('nvidia-smi.log').trim().split('\n').slice(1).join('; ') || null,
  adapter: ours?.adapter ?? null,
  torch: torch && { version: torch.torch, cuda: torch.cuda, device: torch.device },
  steps,
  gradients: gradients && { pass: gradients.pass, rows: gradients.rows },
  speed,
  launch: { replicasIdentical: replicas !== null, stateSha256: replicas?.[1] ?? null, workers: replicas ? Number(replicas[2]) : null, imagesPerSec: done ? Number(done[1]) : null },
  target: { what: 'WebGPU training at >= 0.5x PyTorch fp32 images/s at 96x96 batch 64, same GPU, same run', ratio: at96?.ratio.fp32 ?? null, met: at96?.ratio.fp32 != null ? at96.ratio.fp32 >= 0.5 : null },
};
fs.writeFileSync(path.join(out, 'gpu-check.json'), `${JSON.stringify(summary, null, 2)}\n`);

const f = (x: number | null | undefined, d = 1) => (x == null ? '-' : x.toFixed(d));
console.log(`GPU: ${summary.gpu ?? '?'}; PyTorch ${torch?.torch ?? '?'} (CUDA ${torch?.cuda ?? '?'})`);
console.log(`steps: ${steps.map((s) => `${s.step} ${s.exit === 0 ? 'ok' : `exit ${s.exit}`} ${s.seconds.toFixed(0)} s`).join(', ')}`);
console.log(`gradients vs the CPU reference: ${gradients ? (gradients.pass ? 'within the bounds' : 'OUTSIDE the bounds') : 'not run'}`);
console.log(`launch --gpus 2 --share-gpu: ${replicas ? `replicas identical (${replicas[1]})` : 'no identical-replicas line'}${done ? `, ${done[1]} images/s` : ''}`);
console.log(`\n| input, batch ${ours?.batch ?? torch?.batch ?? '?'} | ours (WebGPU) img/s | PyTorch fp32 | PyTorch TF32 | PyTorch bf16 channels_last | ours / fp32 | ours / TF32 | ours / bf16 |`);
console.log('| --- | --- | --- | --- | --- | --- | --- | --- |');
for (const s of speed) {
  console.log(`| ${s.size}x${s.size} | ${f(s.oursImgS)} | ${f(s.torchImgS.fp32)} | ${f(s.torchImgS.tf32)} | ${f(s.torchImgS['bf16-cl'])} | ${f(s.ratio.fp32, 2)} | ${f(s.ratio.tf32, 2)} | ${f(s.ratio['bf16-cl'], 2)} |`);
}
console.log(`\ntarget (>= 0.5x PyTorch fp32 at 96x96): ${summary.target.met === null ? 'not measured' : summary.target.met ? 'met' : 'NOT met'} (${f(summary.target.ratio, 2)})`);
