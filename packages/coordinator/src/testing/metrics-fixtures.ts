// A realistic two-worker run fed to TrainingMetrics through the same methods the launcher calls.
import net from 'node:net';
import type { EpochReport, TrainingMetrics, WorkerStepReport } from '../metrics.js';

/** A port nobody listens on now (bound and released on 127.0.0.1). */
export function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.once('error', reject);
    s.listen(0, '127.0.0.1', () => {
      const { port } = s.address() as net.AddressInfo;
      s.close(() => resolve(port));
    });
  });
}

/** The tutorial ResNet's flat gradient: 11,180,810 float32. */
export const GRADIENT_BYTES = 11_180_810 * 4;

export interface FedTotals {
  images: number;
  steps: number;
  imagesByRank: number[];
  allReduceBytes: number;
  phaseSec: Record<'data' | 'compute' | 'allReduce' | 'optimizer', number>;
  epochs: EpochReport[];
}

/**
 * Steps of 2 workers on 2 hosts; rank 1 is a straggler (its compute takes 1.5x). Batch 64, the
 * last batch of each epoch short, as the trainer's sampler gives. Returns what was fed.
 */
export function feedSteps(m: TrainingMetrics, o: { epoch: number; fromStep: number; steps: number; totals: FedTotals; stepsPerEpoch?: number }): void {
  const hosts = ['gpu-a', 'gpu-b'];
  for (let k = 0; k < o.steps; k++) {
    const step = o.fromStep + k;
    for (let rank = 0; rank < 2; rank++) {
      const last = o.stepsPerEpoch !== undefined && step % o.stepsPerEpoch === 0;
      const images = last ? 17 : 64;
      const phaseSec = { data: 0.012 + 0.001 * rank, compute: rank === 1 ? 0.18 : 0.12, allReduce: 0.04 + 0.002 * (k % 3), optimizer: 0.008 };
      const r: WorkerStepReport = {
        rank,
        host: hosts[rank],
        epoch: o.epoch,
        step,
        images,
        loss: 2.3 / Math.sqrt(step),
        phaseSec,
        allReduceBytes: GRADIENT_BYTES,
        rssBytes: 900e6 + rank * 1e6,
        cpuSec: step * 0.3,
      };
      m.observeStep(r);
      o.totals.images += images;
      o.totals.imagesByRank[rank] += images;
      o.totals.steps++;
      o.totals.allReduceBytes += GRADIENT_BYTES;
      for (const key of Object.keys(phaseSec) as (keyof typeof phaseSec)[]) o.totals.phaseSec[key] += phaseSec[key];
    }
  }
}

export function emptyTotals(): FedTotals {
  return { images: 0, steps: 0, imagesByRank: [0, 0], allReduceBytes: 0, phaseSec: { data: 0, compute: 0, allReduce: 0, optimizer: 0 }, epochs: [] };
}

export function epochReport(epoch: number, elapsedSec: number): EpochReport {
  return { epoch, epochs: 3, loss: 1.9 / epoch, trainAcc: 0.3 + 0.1 * epoch, testLoss: 2 / epoch, testAcc: 0.28 + 0.1 * epoch, elapsedSec, imagesPerSec: 512.5, lr: 0.01 };
}
