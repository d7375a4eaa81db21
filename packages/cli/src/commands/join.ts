// `dtrain join ADDR:PORT --workers N`: add this machine's workers to a run whose coordinator
// (`dtrain launch --nodes M --listen ADDR:PORT`) waits on another machine. The protocol side is
// @dtrain/coordinator's join(); this file parses the flags and prints. Training options all come
// from the coordinator. Exit 0 only when every worker here completed.
import dgram from 'node:dgram';
import { hostname } from 'node:os';
import path from 'node:path';
import { Command, Option } from '@commander-js/extra-typings';
import { join } from '@dtrain/coordinator';
import { curveClientSecurity, describeSecurity } from '@dtrain/transport';
import { WORKER_ENTRY } from '@dtrain/worker';
import { nonNegativeInt, positiveInt, UsageError } from '../errors.js';
import { requireGpus } from './gpus.js';
import { chooseSecurity, coordinatorKeyOf, INSECURE_HELP, KEYS_HELP } from './security.js';

/** `ADDR:PORT` (IPv4 address or host name, port 1-65535). */
export function parseHostPort(flag: string, v: string): { host: string; port: number } {
  const m = /^([^:\s]+):(\d+)$/.exec(v);
  const port = m ? Number(m[2]) : NaN;
  if (!m || !(port >= 1 && port <= 65535)) throw new UsageError(`${flag} must be ADDR:PORT (e.g. 10.0.0.1:29500), got '${v}'`);
  return { host: m[1], port };
}

/** The local address the kernel would use to reach `host` (no packet is sent: a UDP connect only routes). */
export async function localAddressTowards(host: string, port: number): Promise<string | undefined> {
  const sock = dgram.createSocket('udp4');
  try {
    await new Promise<void>((resolve, reject) => {
      sock.once('error', reject);
      sock.connect(port, host, () => resolve());
    });
    return sock.address().address;
  } catch {
    return undefined;
  } finally {
    sock.close();
  }
}

export function registerJoin(program: Command) {
  program
    .command('join')
    .description("Add this machine's workers to a run whose coordinator waits at ADDR:PORT (pnpm cli launch --nodes M --listen ADDR:PORT); training options come from the coordinator")
    .argument('<addr:port>', "the coordinator's control socket, as given to launch --listen")
    .addOption(new Option('--workers <n>', 'CPU worker processes on this machine').argParser(positiveInt('--workers')))
    .addOption(new Option('--gpus <n>', 'GPU workers: worker i gets the i-th GPU of CUDA_VISIBLE_DEVICES (unset: GPU i) and sees only that one').argParser(positiveInt('--gpus')))
    .option('--advertise <addr>', 'address of this machine the other machines reach (default: the local address that routes to the coordinator)')
    .option('--host <name>', 'name of this machine in messages; must differ between machines (default: $DTRAIN_HOST, else the host name)')
    .addOption(new Option('--ring-port-base <port>', 'worker i binds its ring socket on this port + i (default: any free port; fix it to open a port range in a firewall)').argParser(nonNegativeInt('--ring-port-base')))
    .option('--data-dir <dir>', 'where data sets the coordinator sends are cached (default: $DTRAIN_DATA_DIR, else ~/.cache/dtrain/data)')
    .option('--keys [dir]', KEYS_HELP)
    .option('--coordinator-key <key>', "with --keys: the coordinator's public key (the line `pnpm cli keys show` prints there, or its name in allowed_keys; default: the one other machine in allowed_keys)")
    .option('--insecure', INSECURE_HELP)
    .option('--log-dir <dir>', 'worker logs (default: runs/join-<date>-<host>/logs)')
    .option('--out <dir>', "where this machine's worker writes the run's checkpoints and metrics should it become rank 0 of an --elastic run (default: run next to the log folder)")
    .addOption(new Option('--join-timeout-s <s>', 'fail when the coordinator does not answer or the run does not start by then').default(120).argParser(positiveInt('--join-timeout-s')))
    .addOption(new Option('--timeout-s <s>', "a worker, neighbour or coordinator silent this long is gone (use launch's value)").default(60).argParser(positiveInt('--timeout-s')))
    .action((target, o) => joinRun(target, o));
}

/** What `join` reads from its flags (and `launch --slurm` gives it on the nodes after the first). */
export interface JoinFlags {
  workers?: number;
  gpus?: number;
  advertise?: string;
  host?: string;
  ringPortBase?: number;
  dataDir?: string;
  keys?: string | true;
  coordinatorKey?: string;
  insecure?: true;
  logDir?: string;
  out?: string;
  joinTimeoutS: number;
  timeoutS: number;
  /** Under --slurm the nodes share one key directory: the coordinator's key is this one's. */
  sharedKeys?: boolean;
}

/** Joins the run at `target` (ADDR:PORT) with this machine's workers; resolves when they completed. */
export async function joinRun(target: string, o: JoinFlags): Promise<void> {
  if ((o.workers === undefined) === (o.gpus === undefined)) throw new UsageError('give exactly one of --workers N (CPU) or --gpus N');
  const n = (o.workers ?? o.gpus)!;
  const gpus = o.gpus !== undefined;
  const { host: masterAddr, port: masterPort } = parseHostPort('the coordinator address', target);
  if (gpus) requireGpus(n);
  const host = o.host || process.env.DTRAIN_HOST || hostname();
  const advertise = o.advertise ?? (await localAddressTowards(masterAddr, masterPort));
  if (!advertise) throw new UsageError(`no local address routes to ${masterAddr}: check the address, or give --advertise ADDR`);
  if (o.ringPortBase !== undefined && (o.ringPortBase < 1 || o.ringPortBase + n - 1 > 65535)) throw new UsageError(`--ring-port-base ${o.ringPortBase} with ${n} workers must stay within ports 1-65535`);
  if (o.coordinatorKey !== undefined && o.keys === undefined) throw new UsageError('--coordinator-key needs --keys [DIR] (this machine\'s key pair)');
  const keys = chooseSecurity(o, [masterAddr, advertise], 'join');
  const coordinatorKey = keys ? (o.sharedKeys && o.coordinatorKey === undefined ? keys.publicKey : coordinatorKeyOf(o.coordinatorKey, keys)) : undefined;
  console.log(`${describeSecurity(keys && coordinatorKey ? curveClientSecurity(keys, coordinatorKey) : { kind: 'none' }, `the links to ${masterAddr}:${masterPort} and the rings`)}${keys ? `; coordinator key ${coordinatorKey}` : ''}`);
  const stamp = new Date().toISOString().replace(/[-:]/g, '').replace('T', '-').slice(0, 15);
  const logDir = path.resolve(o.logDir ?? path.join('runs', `join-${stamp}-${host.replace(/[^A-Za-z0-9_.-]+/g, '_')}`, 'logs'));
  const r = await join({
    masterAddr,
    masterPort,
    workers: n,
    entry: WORKER_ENTRY,
    host,
    advertise,
    ringPortBase: o.ringPortBase,
    logDir,
    runDir: o.out,
    dataDir: o.dataDir,
    gpus,
    joinTimeoutMs: o.joinTimeoutS * 1000,
    timeoutMs: o.timeoutS * 1000,
    keys,
    coordinatorKey,
    insecure: o.insecure === true,
    onEvent: (e) => {
      if (e.kind === 'registered') console.log(`joined the coordinator at ${masterAddr}:${masterPort} as host ${host} (ring address ${advertise}); starting ${n} ${gpus ? 'GPU' : 'CPU'} workers, logs in ${logDir}`);
      else if (e.kind === 'assigned') console.log(`local worker ${e.localRank}: rank ${e.rank} of ${e.worldSize}${e.generation > 1 ? ` (regrouped, generation ${e.generation})` : ''}`);
    },
  });
  console.log(`done: ranks ${r.ranks.join(', ')} of ${r.worldSize} on host ${host} completed (logs in ${logDir})`);
}
