// One worker of a distributed run: join the coordinator (Hello -> Welcome), build the ring, train
// with the unchanged Trainer over a RingCollective, report to the coordinator, leave.
//
// Configured like torchrun's workers, so any launcher (ours, a batch system, a shell) can start it:
// the variables are listed, written and read in @dtrain/transport's env.ts.
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { makeSyntheticTestDataset, resolveDataDir } from '@dtrain/data';
import { ControlClient, dtrain, transportCounters, curveClientSecurity, curveServerSecurity, loadKeyDir, PROTOCOL_VERSION, ThreadedRing, WorkerEnvError, type WorkerEnv } from '@dtrain/transport';
import { RunCompleteError, type Collective } from './collective.js';
import { CoordinatorLink, welcomePeers, type WelcomeBody } from './coordinator-link.js';
import { checkOfferedFiles, fetchOfferedFiles, type OfferedFile } from './dataset-fetch.js';
import { ElasticRingCollective, parseAnnouncement, type RegroupReport } from './elastic-ring.js';
import { hashFloats, RingCollective, type RingCollectiveOptions } from './ring-collective.js';
import { runTraining } from './run.js';
import { TestCrashes, type CrashSpec } from './test-crashes.js';
import type { TrainSettingsInput } from './settings.js';
import type { EpochMetrics, Summary } from './run-folder.js';
import type { StartInfo } from './trainer.js';

/** What the launcher sends every worker in Welcome.config_json. */
export interface DistributedConfig {
  /** The flags the user gave (per-worker batch size); the rest comes from the defaults. */
  settings: TrainSettingsInput;
  /** Run folder (absolute); rank 0 writes it. */
  out?: string;
  /** Continue the run in this folder (absolute) from its newest checkpoint. */
  resume?: string;
  /** With `resume`: the resumed run's settings (from rank 0's checkpoint), for workers of other machines, which cannot read it. */
  resumedSettings?: TrainSettingsInput;
  /** FOR TESTS ONLY: train on synthetic patterns instead of a named data set (same bytes on every rank). */
  synthetic?: { train: number; test: number; size: number; channels?: number; seed?: number };
  /** Data set files the coordinator sends to workers on other machines that lack them (added by the coordinator). */
  offeredFiles?: OfferedFile[];
  /** `--elastic`: a lost worker makes the others regroup and continue (issue 7) instead of ending the run. */
  elastic?: boolean;
  /** In the Welcome of a worker admitted into a run in progress: whose state to adopt (see elastic-ring.ts). */
  regroup?: { root: number; stop: boolean; reason: string };
  /** FOR TESTS ONLY: make workers SIGKILL themselves at given points (see `CrashSpec`; one per worker and phase kind). */
  crash?: CrashSpec | CrashSpec[];
  /** Gradient bucket size for the all-reduce that overlaps the backward pass; 0 or absent: after it. */
  bucketBytes?: number;
}

/**
 * `--bucket-mb`'s default, for GPU and CPU workers alike. Measured with `pnpm bench scaling`
 * (README): communication only, 2 workers reach 89.7% efficiency with 8 MiB, 82.3% with 25 MiB
 * (DDP's default), 59.8% without overlap; real CPU training, 2 workers on 2 cores over
 * shared-memory links: 7% and 25% more images/s than without overlap (two runs). Before the
 * shared-memory links the ring's thread took so much CPU that CPU workers were 6-9% slower with it.
 */
export const DEFAULT_BUCKET_MB = 8;

/** A `kind: 'done'` report: every rank sends one after training completed. */
export interface DoneReport {
  kind: 'done';
  rank: number;
  host: string;
  /** sha256 of the final weights, BatchNorm statistics and momentum: equal on every rank. */
  stateSha256: string;
  /** Seconds this rank spent inside collectives, and how many calls. */
  collectiveSec: number;
  collectiveCalls: number;
  /** Rank 0 only. */
  summary?: Summary;
}

/** Rank 0's start report: what the coordinator's exporter shows as build info and run settings. */
export interface StartReport {
  kind: 'start';
  info: StartInfo;
  worldSize: number;
}

/** This process's count of messages its sockets dropped (garbage, strangers, replays), sent when it changes. */
export interface RejectedReport {
  kind: 'rejected';
  total: number;
}

export type WorkerReport = StartReport | { kind: 'epoch'; metrics: EpochMetrics } | { kind: 'checkpoint'; file: string; unixMs: number } | DoneReport | RejectedReport;

/** A worker started with a missing or wrong environment variable. */
/** Runs one worker to the end; resolves when training completed and the final report is sent. */
export async function runDistributedWorker(
  env: WorkerEnv,
  log: (line: string) => void = console.log,
  onCoordinatorLost?: (e: Error) => void,
): Promise<DoneReport | undefined> {
  let who = env.rank >= 0 ? `rank ${env.rank} on host ${env.host}` : `local rank ${env.localRank} on host ${env.host}`;
  // CURVE: the control link checks the coordinator's key; the ring's data socket admits the keys
  // of this machine's allow-list, and each link to the next rank checks that rank's key.
  const keys = env.coordinatorKey ? loadKeyDir(env.keysDir) : undefined;
  const control = new ControlClient(`tcp://${env.masterAddr}:${env.masterPort}`, {
    timeoutMs: env.joinTimeoutMs,
    who,
    security: keys && env.coordinatorKey ? curveClientSecurity(keys, env.coordinatorKey) : undefined,
  });
  // Once the coordinator acknowledged the final report it may exit at any moment: no longer a loss.
  let finished = false;
  if (onCoordinatorLost) control.onLost((e) => void (finished || onCoordinatorLost(e)));
  const remote = env.rank < 0;
  let ring: ThreadedRing | undefined;
  let linkRef: CoordinatorLink | undefined;
  let elasticRef: ElasticRingCollective | undefined;
  // Every ring of this worker (the first, and a new one at each elastic regroup) binds the same way.
  const ringOptions = { host: env.host, listen: env.listen, port: env.ringPort, advertise: env.advertise, timeoutMs: env.timeoutMs, security: keys ? curveServerSecurity(keys) : env.insecure ? { kind: 'none' as const } : undefined };
  try {
    // The ring binds first: its endpoints go into the Hello.
    // A worker without RANK binds a ring of one and takes its rank and world size from the Welcome.
    ring = await ThreadedRing.create({
      rank: Math.max(0, env.rank),
      worldSize: env.worldSize > 0 ? env.worldSize : Math.max(0, env.rank) + 1,
      ...ringOptions,
    });
    const device = process.env.CUDA_VISIBLE_DEVICES !== undefined ? `cuda:${process.env.CUDA_VISIBLE_DEVICES}` : 'cpu';
    await control.send('hello', {
      host: env.host,
      pid: process.pid,
      localRank: env.localRank,
      localWorldSize: env.localWorldSize,
      requestedRank: env.rank,
      dataEndpoints: ring.endpoints,
      device,
      curvePublicKey: ring.publicKey ?? '',
    });
    const tcp = ring.endpoints[0] ?? '';
    const bound = `${env.listen}:${tcp.slice(tcp.lastIndexOf(':') + 1)}`;
    log(`${who}: joined the coordinator at ${env.masterAddr}:${env.masterPort}, ring socket bound on ${bound} (${keys ? 'CURVE' : 'no encryption'}), advertised as ${ring.endpoints.join(' ')}, pid ${process.pid}`);
    // A worker admitted into a run in progress (--elastic) waits here until the next step boundary.
    let m = await control.receive('the rendezvous (waiting for all workers to join)', env.joinTimeoutMs);
    while (m.kind === 'heartbeat' || m.kind === 'command') m = await control.receive('the rendezvous (waiting for all workers to join)', env.joinTimeoutMs);
    if (m.kind === 'error') {
      const e = m.body as { message?: string };
      throw new WorkerEnvError(`the coordinator refused ${who}: ${e.message ?? 'no reason given'}`);
    }
    if (m.kind !== 'welcome') throw new WorkerEnvError(`${who}: expected Welcome from the coordinator, got ${m.kind}`);
    control.runId = m.runId;
    const w = m.body as WelcomeBody;
    const rank = w.rank ?? 0;
    const worldSize = w.worldSize ?? 0;
    if (env.rank >= 0 && (rank !== env.rank || (env.worldSize > 0 && worldSize !== env.worldSize))) {
      throw new WorkerEnvError(`${who}: the coordinator assigned rank ${w.rank} of ${w.worldSize}, this worker was started as RANK ${env.rank} of WORLD_SIZE ${env.worldSize}`);
    }
    if (env.rank < 0) log(`${who}: the coordinator assigned rank ${rank} of ${worldSize}`);
    env = { ...env, rank, worldSize };
    who = `rank ${rank} on host ${env.host}`;
    const config = JSON.parse(w.configJson ?? '{}') as DistributedConfig;
    const peers = welcomePeers(w);
    // The connectivity preflight: connect() returns only when both ring links answered, and names
    // both hosts and the endpoint when one does not.
    await ring.connect(peers, { runId: m.runId, generation: w.generation ?? 1, rank, worldSize });
    const links = ring.stats().shm;
    const via = (shared: boolean) => (shared ? 'shared memory' : 'socket');
    log(
      `${who}: ring of ${worldSize} connected (protocol ${PROTOCOL_VERSION}, run ${m.runId}, ${keys ? `CURVE, key ${keys.publicKey}` : 'no encryption'}` +
        `${worldSize > 1 ? `; link to the next rank: ${via(links.toNext)}, from the previous: ${via(links.fromPrev)}` : ''})`,
    );

    // A worker on another machine (started without RANK, by `dtrain join`) uses its own data
    // directory, and receives there the files the coordinator offers that it lacks.
    let settings = config.settings;
    // The run folder: the coordinator's for its own machine's workers; a worker of another machine
    // writes only to its own (if it becomes rank 0), and takes a resumed run's settings from the
    // coordinator instead of a checkpoint on the coordinator's disk.
    const out = remote ? path.resolve(process.env.DTRAIN_RUN_DIR || path.join('runs', `joined-${m.runId}`)) : config.out;
    const resume = remote ? undefined : config.resume;
    if (remote && config.resume) settings = config.resumedSettings ?? settings;
    if (remote) {
      const dataDir = resolveDataDir(process.env.DTRAIN_DATA_DIR || undefined);
      settings = { ...settings, dataDir };
      if (config.offeredFiles?.length) {
        checkOfferedFiles(config.offeredFiles);
        const got = await fetchOfferedFiles(control, config.offeredFiles, dataDir, { timeoutMs: env.timeoutMs, log, who });
        log(`${who}: data files in ${dataDir}: ${got.cached.length} cached, ${got.fetched.length} received from the coordinator`);
      }
    }

    // From here on one loop reads the control connection, and heartbeats flow both ways.
    const heartbeatMs = w.heartbeatMs || 1000;
    const link = new CoordinatorLink(control, { rank, heartbeatMs, timeoutMs: w.timeoutMs || env.timeoutMs, who, endpoint: `${env.masterAddr}:${env.masterPort}` });
    link.onLost((e) => {
      (elastic?.ring ?? ring)?.abort(e.message);
      (onCoordinatorLost ?? ((err: Error) => log(`error: ${err.message}`)))(e);
    });
    link.start();
    linkRef = link;

    const crashes = new TestCrashes(config.crash, rank, () => (elastic ? elastic.generation : 1), (line) => log(`${who}: ${line}`));
    const collectiveOptions: RingCollectiveOptions = crashes.wrapCollective({
      beforeOp: () => link.setActivity('allReduce'),
      afterOp: () => link.setActivity('compute'),
    });
    const currentRank = () => collective.rank;
    const report = (r: WorkerReport, extra: Record<string, unknown> = {}) =>
      control.send('stepReport', { rank: currentRank(), detailJson: JSON.stringify(r), ...extra }).catch(() => undefined);
    const elastic: ElasticRingCollective | undefined = config.elastic
      ? new ElasticRingCollective(ring, {
          link,
          ringOptions,
          runId: m.runId,
          report: (r: RegroupReport) => control.send('stepReport', { rank: currentRank(), detailJson: JSON.stringify(r) }),
          regroupTimeoutMs: Math.max(2 * env.timeoutMs, env.joinTimeoutMs),
          initialRoot: config.regroup ? parseAnnouncement(w).root : 0,
          collectiveOptions,
          log: (line) => log(`${who}: ${line}`),
          onWelcome: (welcome) => crashes.onWelcome(welcome.generation ?? 0),
        })
      : undefined;
    elasticRef = elastic;
    const plain = elastic ? undefined : new RingCollective(ring, collectiveOptions);
    const collective: Collective & { stats(): { seconds: number; calls: number } } = (elastic ?? plain)!;
    let stepStart = performance.now();
    let rejectedSent = 0;
    // What this worker's sockets dropped goes to the coordinator's metric (when it changed).
    const reportRejected = () => {
      const rejected = transportCounters().rejected;
      if (rejected === rejectedSent) return;
      rejectedSent = rejected;
      void report({ kind: 'rejected', total: rejected });
    };

    const data = config.synthetic ? syntheticData(config.synthetic) : undefined;
    const result = await runTraining({
      settings,
      out,
      resume,
      data,
      collective,
      bucketBytes: config.bucketBytes ?? 0,
      localWorkers: env.localWorldSize,
      hooks: crashes.wrapHooks({
        onStart: (info) => {
          log(`${who}: training epochs ${info.startEpoch}..${info.epochs}, ${info.stepsPerEpoch} steps per epoch`);
          if (collective.rank === 0) void report({ kind: 'start', info, worldSize: collective.worldSize });
          link.setActivity('compute');
        },
        onEpochStart: () => {
          stepStart = performance.now();
        },
        onCheckpoint: (file) => {
          if (collective.rank === 0) void report({ kind: 'checkpoint', file, unixMs: Date.now() });
        },
        onEvalStart: () => link.setActivity('evaluate'),
        onStep: (s) => {
          const now = performance.now();
          const cpu = process.cpuUsage();
          // Every rank, every step: the figures of the coordinator's Prometheus exporter.
          link.step = s.step;
          reportRejected();
          void control
            .send('stepReport', {
              rank: collective.rank,
              epoch: s.epoch,
              step: s.step,
              loss: s.loss,
              examples: s.n,
              correct: s.correct,
              dataMs: s.phases.data * 1000,
              computeMs: s.phases.compute * 1000,
              allReduceMs: s.phases.allReduce * 1000,
              optimizerMs: s.phases.optimizer * 1000,
              allReduceBytes: s.allReduceBytes,
              host: env.host,
              rssBytes: process.memoryUsage.rss(),
              cpuSec: (cpu.user + cpu.system) / 1e6,
              stepMs: now - stepStart,
            })
            .catch(() => undefined);
          stepStart = now;
          if (s.stepInEpoch === s.stepsInEpoch || s.stepInEpoch % 20 === 0) {
            log(`${who}: epoch ${s.epoch} step ${s.stepInEpoch}/${s.stepsInEpoch} loss ${s.loss.toFixed(4)} compute ${(s.phases.compute * 1000).toFixed(0)} ms all-reduce ${(s.phases.allReduce * 1000).toFixed(0)} ms`);
          }
        },
        onEpochEnd: (metrics) => {
          reportRejected();
          log(`${who}: epoch ${metrics.epoch} done, test accuracy ${metrics.testAcc}`);
          if (collective.rank === 0) {
            void report({ kind: 'epoch', metrics }, { epoch: metrics.epoch, step: metrics.step, loss: metrics.loss, evaluation: true, allReduceMs: metrics.phaseSec.allReduce * 1000, computeMs: metrics.phaseSec.compute * 1000, dataMs: metrics.phaseSec.data * 1000 });
          }
        },
      }),
    });
    await crashes.afterTraining(() => elastic!.regroup({ epoch: 0, done: 0, step: 0 }));
    const st = collective.stats();
    who = `rank ${collective.rank} on host ${env.host}`;
    const done: DoneReport = {
      kind: 'done',
      rank: collective.rank,
      host: env.host,
      stateSha256: hashFloats(result.weights, result.bnStats, result.momentum),
      collectiveSec: st.seconds,
      collectiveCalls: st.calls,
      summary: collective.rank === 0 ? result.summary : undefined,
    };
    link.setActivity('idle');
    reportRejected();
    await report(done, { weightsSha256: done.stateSha256, step: result.summary.steps });
    // Wait for the coordinator's STOP: exiting earlier could drop the report still in ZeroMQ's queue.
    await link.waitForStop(30_000);
    finished = true;
    link.stop();
    log(`${who}: done, state sha256 ${done.stateSha256}`);
    await (elastic?.ring ?? ring).close();
    ring = undefined;
    await control.close();
    return done;
  } catch (err) {
    const e = err as Error;
    linkRef?.stop();
    if (err instanceof RunCompleteError) {
      // Others completed the run's last collective and reported; this rank's copy of it failed.
      log(`${who}: ${e.message}; this worker stops without a final report`);
      await (elasticRef?.ring ?? ring)?.close().catch(() => undefined);
      await control.close().catch(() => undefined);
      return undefined;
    }
    await control
      .send('error', { code: dtrain.Error.Code.WORKER_FAILED, message: e.message ?? String(err), rank: env.rank, host: env.host })
      .catch(() => undefined);
    await (elasticRef?.ring ?? ring)?.close().catch(() => undefined);
    await control.close().catch(() => undefined);
    throw err;
  }
}

function syntheticData(s: NonNullable<DistributedConfig['synthetic']>) {
  const opts = { height: s.size, width: s.size, channels: s.channels ?? 1, numClasses: 10 };
  const train = makeSyntheticTestDataset({ ...opts, count: s.train, seed: s.seed ?? 1 });
  const test = makeSyntheticTestDataset({ ...opts, count: s.test, seed: (s.seed ?? 1) + 1000 });
  return { name: 'synthetic', train, test };
}

/** The worker process's script, for launchers: `spawn(process.execPath, ['--import', 'tsx', WORKER_ENTRY])`. */
export const WORKER_ENTRY = fileURLToPath(new URL('./worker-main.ts', import.meta.url));
