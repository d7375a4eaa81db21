// `launch --slurm`: what this srun task does in the run. The task on the step's first node is the
// coordinator (launch --nodes N, listening on that node's address); the others join it, each with
// its node's workers. The port is the same on every node without talking (slurmPort of the job id,
// or --port), as torchrun scripts under Slurm derive MASTER_PORT.
import { lookup } from 'node:dns/promises';
import { isLoopback } from '@dtrain/transport';
import { UsageError } from '../errors.js';
import { slurmPort, slurmTask, SlurmEnvError, type SlurmTask } from '../slurm.js';

export interface SlurmRole {
  task: SlurmTask;
  /** The first node's name, where the coordinator runs. */
  coordinator: string;
  port: number;
  /** The first node's address (resolved on the first node only, where the coordinator binds it). */
  address?: string;
}

export interface SlurmFlags {
  workers?: number;
  gpus?: number;
  nodes: number;
  listen?: string;
  port?: number;
}

export async function slurmRole(f: SlurmFlags, env: NodeJS.ProcessEnv = process.env): Promise<SlurmRole> {
  const task = slurmTask(env);
  if (task.tasksPerNode.some((t) => t !== 1)) {
    throw new SlurmEnvError(
      `launch --slurm runs one task per node and starts that node's workers itself (--workers N or --gpus N): start it with srun --ntasks-per-node=1 (this step has ${env.SLURM_STEP_TASKS_PER_NODE ?? env.SLURM_TASKS_PER_NODE} tasks per node)`,
    );
  }
  if (f.nodes !== 1) throw new UsageError(`--nodes ${f.nodes} with --slurm: the step's nodes make the run (${task.nodes.length} here); leave --nodes out`);
  if (f.listen !== undefined) throw new UsageError(`--listen ${f.listen} with --slurm: the coordinator listens on the first node (${task.nodes[0]}); give --port to choose its port`);
  if (f.gpus !== undefined && task.gpus !== undefined && f.gpus > task.gpus.length) {
    throw new SlurmEnvError(`--gpus ${f.gpus}, but Slurm gave this step ${task.gpus.length} GPU${task.gpus.length === 1 ? '' : 's'} on ${task.nodeName} (SLURM_STEP_GPUS=${task.gpus.join(',')}): ask for --gpus-per-node=${f.gpus}, or give --gpus ${task.gpus.length}`);
  }
  const role: SlurmRole = { task, coordinator: task.nodes[0], port: f.port ?? slurmPort(task.jobId) };
  if (task.nodeId === 0) {
    const { address } = await lookup(role.coordinator, { family: 4 }).catch(() => {
      throw new SlurmEnvError(`the first node's name ${role.coordinator} does not resolve on itself: fix the cluster's name resolution, or run join by hand`);
    });
    if (task.nodes.length > 1 && isLoopback(address)) {
      throw new SlurmEnvError(`${role.coordinator} resolves to ${address} on itself (a loopback address, as Debian's /etc/hosts does for a machine's own name): the other nodes cannot reach it there; make the name resolve to the node's network address`);
    }
    role.address = address;
  }
  return role;
}
