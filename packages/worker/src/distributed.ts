// The worker process's main: everything one worker of a distributed run does, from its start by a
// launcher (worker-main.ts, WORKER_ENTRY, is the script) to its exit. In order (WorkerProcess.run):
// bind the ring, join the coordinator (Hello -> Welcome: rank, world size, the run's config),
// connect the ring, on another machine receive the data files it lacks, train with the unchanged
// Trainer over a RingCollective (an ElasticRingCollective with --elastic) while reporting to the
// coordinator, send the final report, wait for the coordinator's STOP, close both connections.
//
// Configured like torchrun's workers, so any launcher (ours, a batch system, a shell) can start it:
// the variables are listed, written and read in @dtrain/transport's env.ts.
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { makeSyntheticTestDataset, resolveDataDir } from '@dtrain/data';
import { ControlClient, dtrain, transportCounters, curveClientSecurity, curveServerSecurity, loadKeyDir, PROTOCOL_VERSION, ThreadedRing, WorkerEnvError, type ControlMessage, type KeyMaterial, type RingOptions, type WorkerEnv } from '@dtrain/transport';
import { RunCompleteError, type Collective } from './collective.js';
import { CoordinatorLink, welcomePeers, type WelcomeBody } from './coordinator-link.js';
import { checkOfferedFiles, fetchOfferedFiles } from './dataset-fetch.js';
import { ElasticRingCollective, parseAnnouncement, type RegroupReport } from './elastic-ring.js';
import { hashFloats, RingCollective, type RingCollectiveOptions } from './ring-collective.js';
import { runTraining, type RunTrainingResult } from './run.js';
import { TestCrashes, type CrashSpec } from './test-crashes.js';
import type { TrainSettingsInput } from './settings.js';
import type { EpochMetrics, Summary } from './run-folder.js';
import type { StartInfo, StepInfo, TrainerHooks } from './trainer.js';

/**
 * The launcher's training request, which every worker receives in Welcome.config_json (a document
 * of the settings schema; the coordinator passes it on unread). The run's own facts (offered
 * files, elastic, a regroup's root) are Welcome's protobuf fields.
 */
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

/** Runs one worker to the end; resolves when training completed and the final report is sent. */
export async function runDistributedWorker(
  env: WorkerEnv,
  log: (line: string) => void = console.log,
  onCoordinatorLost?: (e: Error) => void,
): Promise<DoneReport | undefined> {
  const worker = new WorkerProcess(env, log, onCoordinatorLost);
  try {
    return await worker.run();
  } catch (err) {
    return worker.fail(err);
  }
}

/** The ring's binding, the same for the first ring and for each new one at an elastic regroup. */
type RingBinding = Omit<RingOptions, 'rank' | 'worldSize' | 'generation' | 'runId'>;

/**
 * One worker process from its Hello to its last report. It owns the two connections, the control
 * link to the coordinator and the ring to the other workers (a new ring at each elastic regroup),
 * and closes both however the run ends.
 */
class WorkerProcess {
  /** How log lines and errors name this worker: by rank once the coordinator assigned one. */
  private who: string;
  /** The rank and world size are the Welcome's once it came. */
  private env: WorkerEnv;
  /** Started without RANK (`dtrain join` on another machine): its own data and run folder. */
  private readonly remote: boolean;
  private readonly keys: KeyMaterial | undefined;
  private readonly control: ControlClient;
  private readonly ringBinding: RingBinding;
  private ring: ThreadedRing | undefined;
  private elastic: ElasticRingCollective | undefined;
  private link: CoordinatorLink | undefined;
  /** Once the coordinator acknowledged the final report it may exit at any moment: no longer a loss. */
  private finished = false;

  constructor(
    env: WorkerEnv,
    private readonly log: (line: string) => void,
    private readonly onCoordinatorLost: ((e: Error) => void) | undefined,
  ) {
    this.env = env;
    this.who = env.rank >= 0 ? `rank ${env.rank} on host ${env.host}` : `local rank ${env.localRank} on host ${env.host}`;
    this.remote = env.rank < 0;
    // CURVE: the control link checks the coordinator's key; the ring's data socket admits the keys
    // of this machine's allow-list, and each link to the next rank checks that rank's key.
    this.keys = env.coordinatorKey ? loadKeyDir(env.keysDir) : undefined;
    this.control = new ControlClient(`tcp://${env.masterAddr}:${env.masterPort}`, {
      timeoutMs: env.joinTimeoutMs,
      who: this.who,
      security: this.keys && env.coordinatorKey ? curveClientSecurity(this.keys, env.coordinatorKey) : undefined,
    });
    if (onCoordinatorLost) this.control.onLost((e) => void (this.finished || onCoordinatorLost(e)));
    this.ringBinding = { host: env.host, listen: env.listen, port: env.ringPort, advertise: env.advertise, timeoutMs: env.timeoutMs, security: this.keys ? curveServerSecurity(this.keys) : env.insecure ? { kind: 'none' as const } : undefined };
  }

  /** The ring in use: the elastic collective's newest, else the first. */
  private get currentRing(): ThreadedRing | undefined {
    return this.elastic?.ring ?? this.ring;
  }

  /** Rendezvous, ring, data, training, final report. */
  async run(): Promise<DoneReport> {
    const env = this.env;
    // The ring binds first: its endpoints go into the Hello.
    // A worker without RANK binds a ring of one and takes its rank and world size from the Welcome.
    this.ring = await ThreadedRing.create({ rank: Math.max(0, env.rank), worldSize: env.worldSize > 0 ? env.worldSize : Math.max(0, env.rank) + 1, ...this.ringBinding });
    const { runId, welcome } = await this.join(this.ring);
    const config = JSON.parse(welcome.configJson ?? '{}') as DistributedConfig;
    await this.connectRing(this.ring, runId, welcome);
    const place = await this.placeRun(config, runId, welcome);
    const link = this.startLink(welcome);
    const crashes = new TestCrashes(config.crash, this.env.rank, () => (this.elastic ? this.elastic.generation : 1), (line) => this.log(`${this.who}: ${line}`));
    const collective = this.createCollective(runId, welcome, link, crashes);
    const reports = new CoordinatorReports(this.control, collective, this.env.host);
    const result = await runTraining({
      ...place,
      data: config.synthetic ? syntheticData(config.synthetic) : undefined,
      collective,
      bucketBytes: config.bucketBytes ?? 0,
      localWorkers: env.localWorldSize,
      hooks: crashes.wrapHooks(this.trainingHooks(collective, link, reports)),
    });
    await crashes.afterTraining(() => this.elastic!.regroup({ epoch: 0, done: 0, step: 0 }));
    return this.finish(result, collective, reports);
  }

  /** Hello (with the ring's endpoints), then the rendezvous: the Welcome, with this worker's rank. */
  private async join(ring: ThreadedRing): Promise<{ runId: string; welcome: WelcomeBody }> {
    const env = this.env;
    const device = process.env.CUDA_VISIBLE_DEVICES !== undefined ? `cuda:${process.env.CUDA_VISIBLE_DEVICES}` : 'cpu';
    await this.control.send('hello', {
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
    this.log(`${this.who}: joined the coordinator at ${env.masterAddr}:${env.masterPort}, ring socket bound on ${bound} (${this.keys ? 'CURVE' : 'no encryption'}), advertised as ${ring.endpoints.join(' ')}, pid ${process.pid}`);
    const m = await this.receiveWelcome();
    this.control.runId = m.runId;
    const welcome = m.body as WelcomeBody;
    this.adoptRank(welcome);
    return { runId: m.runId, welcome };
  }

  /** A worker admitted into a run in progress (--elastic) waits here until the next step boundary. */
  private async receiveWelcome(): Promise<ControlMessage> {
    const during = 'the rendezvous (waiting for all workers to join)';
    let m = await this.control.receive(during, this.env.joinTimeoutMs);
    while (m.kind === 'heartbeat' || m.kind === 'command') m = await this.control.receive(during, this.env.joinTimeoutMs);
    if (m.kind === 'error') {
      const e = m.body as { message?: string };
      throw new WorkerEnvError(`the coordinator refused ${this.who}: ${e.message ?? 'no reason given'}`);
    }
    if (m.kind !== 'welcome') throw new WorkerEnvError(`${this.who}: expected Welcome from the coordinator, got ${m.kind}`);
    return m;
  }

  /** The coordinator's rank and world size: checked against RANK and WORLD_SIZE where given, else taken. */
  private adoptRank(w: WelcomeBody): void {
    const env = this.env;
    const rank = w.rank ?? 0;
    const worldSize = w.worldSize ?? 0;
    if (env.rank >= 0 && (rank !== env.rank || (env.worldSize > 0 && worldSize !== env.worldSize))) {
      throw new WorkerEnvError(`${this.who}: the coordinator assigned rank ${w.rank} of ${w.worldSize}, this worker was started as RANK ${env.rank} of WORLD_SIZE ${env.worldSize}`);
    }
    if (env.rank < 0) this.log(`${this.who}: the coordinator assigned rank ${rank} of ${worldSize}`);
    this.env = { ...env, rank, worldSize };
    this.who = `rank ${rank} on host ${env.host}`;
  }

  /**
   * The connectivity preflight: connect() returns only when both ring links answered, and names
   * both hosts and the endpoint when one does not.
   */
  private async connectRing(ring: ThreadedRing, runId: string, w: WelcomeBody): Promise<void> {
    const { rank, worldSize } = this.env;
    await ring.connect(welcomePeers(w), { runId, generation: w.generation ?? 1, rank, worldSize });
    const links = ring.stats().shm;
    const via = (shared: boolean) => (shared ? 'shared memory' : 'socket');
    this.log(
      `${this.who}: ring of ${worldSize} connected (protocol ${PROTOCOL_VERSION}, run ${runId}, ${this.keys ? `CURVE, key ${this.keys.publicKey}` : 'no encryption'}` +
        `${worldSize > 1 ? `; link to the next rank: ${via(links.toNext)}, from the previous: ${via(links.fromPrev)}` : ''})`,
    );
  }

  /**
   * The settings, run folder and resume of this worker's training. The coordinator's machine's
   * workers take them from the config. A worker on another machine (started without RANK, by
   * `dtrain join`) uses its own data directory and receives there the files the coordinator offers
   * that it lacks; it writes only to its own run folder (if it becomes rank 0), and takes a resumed
   * run's settings from the coordinator instead of a checkpoint on the coordinator's disk.
   */
  private async placeRun(config: DistributedConfig, runId: string, w: WelcomeBody): Promise<{ settings: TrainSettingsInput; out?: string; resume?: string }> {
    if (!this.remote) return { settings: config.settings, out: config.out, resume: config.resume };
    const out = path.resolve(process.env.DTRAIN_RUN_DIR || path.join('runs', `joined-${runId}`));
    const dataDir = resolveDataDir(process.env.DTRAIN_DATA_DIR || undefined);
    const settings = { ...(config.resume ? (config.resumedSettings ?? config.settings) : config.settings), dataDir };
    const offered = (w.offeredFiles ?? []).map((f) => ({ name: f.name ?? '', size: f.size ?? 0, sha256: f.sha256 ?? '' }));
    if (offered.length) {
      checkOfferedFiles(offered);
      const got = await fetchOfferedFiles(this.control, offered, dataDir, { timeoutMs: this.env.timeoutMs, log: this.log, who: this.who });
      this.log(`${this.who}: data files in ${dataDir}: ${got.cached.length} cached, ${got.fetched.length} received from the coordinator`);
    }
    return { settings, out, resume: undefined };
  }

  /** From here on one loop reads the control connection, and heartbeats flow both ways. */
  private startLink(w: WelcomeBody): CoordinatorLink {
    const env = this.env;
    const link = new CoordinatorLink(this.control, { rank: env.rank, heartbeatMs: w.heartbeatMs || 1000, timeoutMs: w.timeoutMs || env.timeoutMs, who: this.who, endpoint: `${env.masterAddr}:${env.masterPort}` });
    link.onLost((e) => {
      this.currentRing?.abort(e.message);
      (this.onCoordinatorLost ?? ((err: Error) => this.log(`error: ${err.message}`)))(e);
    });
    link.start();
    this.link = link;
    return link;
  }

  /**
   * The trainer's collective over the ring: elastic (--elastic: a lost worker makes the others
   * regroup) or plain. Either marks the link's activity around each collective.
   */
  private createCollective(runId: string, w: WelcomeBody, link: CoordinatorLink, crashes: TestCrashes): StatsCollective {
    const collectiveOptions: RingCollectiveOptions = crashes.wrapCollective({
      beforeOp: () => link.setActivity('allReduce'),
      afterOp: () => link.setActivity('compute'),
    });
    if (!w.elastic) return new RingCollective(this.ring!, collectiveOptions);
    const elastic: ElasticRingCollective = new ElasticRingCollective(this.ring!, {
      link,
      ringOptions: this.ringBinding,
      runId,
      report: (r: RegroupReport) => this.control.send('stepReport', { rank: elastic.rank, regroup: r }),
      regroupTimeoutMs: Math.max(2 * this.env.timeoutMs, this.env.joinTimeoutMs),
      initialRoot: parseAnnouncement(w).root, // 0 unless this Welcome admits a joiner into a running group
      collectiveOptions,
      log: (line) => this.log(`${this.who}: ${line}`),
      onWelcome: (welcome) => crashes.onWelcome(welcome.generation ?? 0),
    });
    this.elastic = elastic;
    return elastic;
  }

  /** The trainer's events as log lines, link activity and reports to the coordinator. */
  private trainingHooks(collective: Collective, link: CoordinatorLink, reports: CoordinatorReports): TrainerHooks {
    return {
      onStart: (info) => {
        this.log(`${this.who}: training epochs ${info.startEpoch}..${info.epochs}, ${info.stepsPerEpoch} steps per epoch`);
        if (collective.rank === 0) void reports.send({ kind: 'start', info, worldSize: collective.worldSize });
        link.setActivity('compute');
      },
      onEpochStart: () => reports.epochStarted(),
      onCheckpoint: (file) => {
        if (collective.rank === 0) void reports.send({ kind: 'checkpoint', file, unixMs: Date.now() });
      },
      onEvalStart: () => link.setActivity('evaluate'),
      onStep: (s) => {
        link.step = s.step;
        reports.sendRejected();
        reports.sendStep(s);
        if (s.stepInEpoch === s.stepsInEpoch || s.stepInEpoch % 20 === 0) {
          this.log(`${this.who}: epoch ${s.epoch} step ${s.stepInEpoch}/${s.stepsInEpoch} loss ${s.loss.toFixed(4)} compute ${(s.phases.compute * 1000).toFixed(0)} ms all-reduce ${(s.phases.allReduce * 1000).toFixed(0)} ms`);
        }
      },
      onEpochEnd: (metrics) => {
        reports.sendRejected();
        this.log(`${this.who}: epoch ${metrics.epoch} done, test accuracy ${metrics.testAcc}`);
        if (collective.rank === 0) void reports.sendEpoch(metrics);
      },
    };
  }

  /** The final report (the state's hash, equal on every rank), the coordinator's STOP, both connections closed. */
  private async finish(result: RunTrainingResult, collective: StatsCollective, reports: CoordinatorReports): Promise<DoneReport> {
    const st = collective.stats();
    this.who = `rank ${collective.rank} on host ${this.env.host}`;
    const done: DoneReport = {
      kind: 'done',
      rank: collective.rank,
      host: this.env.host,
      stateSha256: hashFloats(result.weights, result.bnStats, result.momentum),
      collectiveSec: st.seconds,
      collectiveCalls: st.calls,
      summary: collective.rank === 0 ? result.summary : undefined,
    };
    this.link!.setActivity('idle');
    reports.sendRejected();
    await reports.send(done, { weightsSha256: done.stateSha256, step: result.summary.steps });
    // Wait for the coordinator's STOP: exiting earlier could drop the report still in ZeroMQ's queue.
    await this.link!.waitForStop(30_000);
    this.finished = true;
    this.link!.stop();
    this.log(`${this.who}: done, state sha256 ${done.stateSha256}`);
    await this.currentRing!.close();
    this.ring = undefined;
    await this.control.close();
    return done;
  }

  /** After a failure anywhere in run(): the coordinator is told (unless the run completed), the connections close, `err` is rethrown. */
  async fail(err: unknown): Promise<undefined> {
    const e = err as Error;
    this.link?.stop();
    if (err instanceof RunCompleteError) {
      // Others completed the run's last collective and reported; this rank's copy of it failed.
      this.log(`${this.who}: ${e.message}; this worker stops without a final report`);
      await this.closeQuietly();
      return undefined;
    }
    await this.control
      .send('error', { code: dtrain.Error.Code.WORKER_FAILED, message: e.message ?? String(err), rank: this.env.rank, host: this.env.host })
      .catch(() => undefined);
    await this.closeQuietly();
    throw err;
  }

  private async closeQuietly(): Promise<void> {
    await this.currentRing?.close().catch(() => undefined);
    await this.control.close().catch(() => undefined);
  }
}

/** A collective that counts its time and calls (for the final report). */
type StatsCollective = Collective & { stats(): { seconds: number; calls: number } };

/**
 * What the coordinator learns of the training as `stepReport` messages (its Prometheus exporter,
 * its run log), each with the sender's current rank (an elastic regroup changes it). One that
 * cannot be sent is dropped: the link's heartbeats, not the reports, notice a lost coordinator.
 */
class CoordinatorReports {
  private stepStart = performance.now();
  private rejectedSent = 0;

  constructor(
    private readonly control: ControlClient,
    private readonly collective: Collective,
    private readonly host: string,
  ) {}

  send(r: WorkerReport, extra: Record<string, unknown> = {}): Promise<void | undefined> {
    return this.control.send('stepReport', { rank: this.collective.rank, ...reportField(r), ...extra }).catch(() => undefined);
  }

  /** What this worker's sockets dropped goes to the coordinator's metric (when it changed). */
  sendRejected(): void {
    const rejected = transportCounters().rejected;
    if (rejected === this.rejectedSent) return;
    this.rejectedSent = rejected;
    void this.send({ kind: 'rejected', total: rejected });
  }

  /** The first step's time counts from here, not from the previous epoch's last step (the evaluation lies between). */
  epochStarted(): void {
    this.stepStart = performance.now();
  }

  /** Every rank, every step: the figures of the coordinator's Prometheus exporter. */
  sendStep(s: StepInfo): void {
    const now = performance.now();
    const cpu = process.cpuUsage();
    void this.control
      .send('stepReport', {
        rank: this.collective.rank,
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
        host: this.host,
        rssBytes: process.memoryUsage.rss(),
        cpuSec: (cpu.user + cpu.system) / 1e6,
        stepMs: now - this.stepStart,
      })
      .catch(() => undefined);
    this.stepStart = now;
  }

  /** Rank 0's epoch line, with the figures the exporter keeps per epoch. */
  sendEpoch(metrics: EpochMetrics): Promise<void | undefined> {
    return this.send({ kind: 'epoch', metrics }, { epoch: metrics.epoch, step: metrics.step, loss: metrics.loss, evaluation: true, allReduceMs: metrics.phaseSec.allReduce * 1000, computeMs: metrics.phaseSec.compute * 1000, dataMs: metrics.phaseSec.data * 1000 });
  }
}

/** A report as its StepReport.report field (the protobuf messages have the fields of these types, by the same names). */
export function reportField(r: WorkerReport): dtrain.StepReport.$Properties {
  switch (r.kind) {
    case 'start':
      return { start: { info: r.info, worldSize: r.worldSize } };
    case 'epoch':
      return { epochMetrics: r.metrics };
    case 'checkpoint':
      return { checkpoint: { file: r.file, unixMs: r.unixMs } };
    case 'done':
      return { final: r };
    case 'rejected':
      return { rejected: { total: r.total } };
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
