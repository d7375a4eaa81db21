// FOR TESTS ONLY: a worker that kills itself (SIGKILL) or loses its GPU at a chosen point, so the
// recovery from each phase can be tested on real processes (DistributedConfig.crash). It wraps the
// worker's production hooks: the production code carries none of it.
import { destroyWebGpuDevice } from '@dtrain/backend';
import type { RingCollectiveOptions } from './ring-collective.js';
import type { TrainerHooks } from './trainer.js';

/** Where a worker kills itself with SIGKILL, to test recovery at each phase. */
export interface CrashSpec {
  /** The worker's rank in the first group (its RANK). */
  rank: number;
  /** compute: in the forward/backward of step `step`; allReduce: inside its gradient all-reduce; deviceLost: its WebGPU device is lost before the compute of step `step`;
   * evaluate: at the start of the evaluation after epoch `epoch` (before it adds its share); checkpoint: right after rank 0 wrote a checkpoint;
   * final: after training completed, a second after the others sent their final reports, before its own (`at` is not used);
   * finalRegroup: at the same point, it acts as if its last collective had failed and asks to regroup (instead of dying);
   * welcomed: right after the Welcome of generation `generation` (> 1), before its new ring connects (`at` is not used). */
  phase: 'compute' | 'allReduce' | 'deviceLost' | 'evaluate' | 'checkpoint' | 'final' | 'finalRegroup' | 'welcomed';
  /** Global optimiser step (compute, allReduce) or 1-based epoch (evaluate, checkpoint). */
  at: number;
  /** Only in this ring generation (default 1: the first group), so a regrouped run does not crash again. */
  generation?: number;
}

/** The crash points of one worker (none when no spec names its rank). */
export class TestCrashes {
  private readonly crash: CrashSpec | undefined;
  private readonly welcomed: CrashSpec | undefined;
  private inNextMean = false;

  /** `generation()`: the ring generation the worker is in now (1 without --elastic). */
  constructor(
    specs: CrashSpec | CrashSpec[] | undefined,
    rank: number,
    private readonly generation: () => number,
    private readonly log: (line: string) => void,
  ) {
    const mine = [specs ?? []].flat().filter((c) => c.rank === rank);
    this.crash = mine.find((c) => c.phase !== 'welcomed');
    this.welcomed = mine.find((c) => c.phase === 'welcomed');
  }

  private now(why: string): void {
    this.log(`TEST CRASH ${why}: SIGKILL`);
    process.kill(process.pid, 'SIGKILL');
  }

  /** This worker's crash, when it applies in the current generation and phase. */
  private armed(...phases: CrashSpec['phase'][]): CrashSpec | undefined {
    const c = this.crash;
    return c && phases.includes(c.phase) && this.generation() === (c.generation ?? 1) ? c : undefined;
  }

  /** The collective's hooks, with the crash inside the gradient all-reduce. */
  wrapCollective(o: RingCollectiveOptions): RingCollectiveOptions {
    return {
      ...o,
      beforeOp: (op, buf) => {
        o.beforeOp?.(op, buf);
        if (this.inNextMean && op === 'mean') {
          this.inNextMean = false;
          setTimeout(() => this.now('inside its gradient all-reduce'), 3);
        }
      },
    };
  }

  /** The trainer's hooks, with the crash points of the step, the evaluation and the checkpoint. */
  wrapHooks(h: TrainerHooks): TrainerHooks {
    return {
      ...h,
      onCheckpoint: (file) => {
        h.onCheckpoint?.(file);
        if (this.armed('checkpoint')) this.now(`after writing ${file}`);
      },
      onEvalStart: (epoch, testImages) => {
        h.onEvalStart?.(epoch, testImages);
        // At its start: this worker never contributes to the evaluation's all-reduce.
        if (this.armed('evaluate')?.at === epoch) this.now(`at the start of the evaluation of epoch ${epoch}`);
      },
      onStep: (s) => {
        // Before the step's report: the next step's compute (this process never reaches its
        // all-reduce), or inside the next step's all-reduce (a few milliseconds after it started).
        const c = this.armed('compute', 'deviceLost', 'allReduce');
        if (c?.at === s.step + 1) {
          if (c.phase === 'compute') this.now(`before the compute of step ${c.at}`);
          if (c.phase === 'deviceLost') {
            this.log(`TEST DEVICE LOSS before the compute of step ${c.at}`);
            destroyWebGpuDevice();
          }
          if (c.phase === 'allReduce') this.inNextMean = true;
        }
        h.onStep?.(s);
      },
    };
  }

  /** Elastic: right after the Welcome of a new generation, before its ring connects. */
  onWelcome(generation: number): void {
    if (this.welcomed && generation === (this.welcomed.generation ?? 2)) this.now(`right after the Welcome of generation ${generation}`);
  }

  /** After training completed, before the final report: a crash, or a regroup as if the last collective had failed. */
  async afterTraining(regroup: () => Promise<unknown>): Promise<void> {
    const c = this.armed('final', 'finalRegroup');
    if (!c) return;
    await new Promise((r) => setTimeout(r, 1000));
    if (c.phase === 'final') this.now('after training completed, before its final report');
    this.log('TEST: acting as if the last collective had failed: regroup');
    await regroup();
  }
}
