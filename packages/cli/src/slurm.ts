// What a task started by `srun` learns from Slurm's environment: the job's nodes, which of them
// this task runs on, and where the run's coordinator waits. `launch --slurm` runs as one task per
// node (srun --ntasks-per-node=1); the task on the first node of the step is the coordinator (as
// torchrun under srun takes MASTER_ADDR from the first host of the node list).
import { UsageError } from './errors.js';

/** Bad or missing Slurm environment: names the variable and what it held. */
export class SlurmEnvError extends UsageError {}

/** More hosts than a list may expand to: a typo like n[1-1000000] fails here, not in memory. */
const MAX_HOSTS = 65_536;

/**
 * The host names of a Slurm hostlist, as `scontrol show hostnames` of Slurm 22.05 gives them:
 * `node[01-03,7]` -> node01 node02 node03 node7 (the lower bound's digits set the width),
 * `x[1-2][3-4]` -> x13 x14 x23 x24, `a,b` -> a b. A suffix after a bracket (`n[3]-ib`), an empty or
 * reversed range and unbalanced brackets are refused (scontrol refuses all but the last, which it
 * misreads).
 */
export function expandHostlist(list: string, what = 'the node list'): string[] {
  const fail = (why: string): never => {
    throw new SlurmEnvError(`${what} '${list}' is not a Slurm hostlist: ${why}`);
  };
  const hosts: string[] = [];
  for (const item of splitTopLevel(list.trim(), fail)) {
    const m = /^([^[\]]*)((?:\[[^[\]]*\])*)$/.exec(item);
    if (!m) fail(`'${item}' has text after a bracket or unbalanced brackets`);
    const groups = [...m![2].matchAll(/\[([^\]]*)\]/g)].map((g) => expandRanges(g[1], fail));
    let names = [m![1]];
    for (const g of groups) names = names.flatMap((n) => g.map((s) => n + s));
    if (names.some((n) => n === '')) fail('an empty host name');
    hosts.push(...names);
    if (hosts.length > MAX_HOSTS) fail(`more than ${MAX_HOSTS} hosts`);
  }
  if (hosts.length === 0) fail('no hosts');
  return hosts;
}

/** Splits at the commas outside brackets. */
function splitTopLevel(list: string, fail: (why: string) => never): string[] {
  const items: string[] = [];
  let depth = 0;
  let start = 0;
  for (let i = 0; i < list.length; i++) {
    if (list[i] === '[') depth++;
    else if (list[i] === ']') depth--;
    if (depth < 0 || depth > 1) fail('unbalanced brackets');
    if (list[i] === ',' && depth === 0) {
      items.push(list.slice(start, i));
      start = i + 1;
    }
  }
  if (depth !== 0) fail('unbalanced brackets');
  items.push(list.slice(start));
  return items.map((s) => s.trim()).filter((s) => s !== '');
}

/** `01-03,7` -> ['01', '02', '03', '7']. */
function expandRanges(spec: string, fail: (why: string) => never): string[] {
  const out: string[] = [];
  for (const r of spec.split(',')) {
    const m = /^(\d+)(?:-(\d+))?$/.exec(r.trim());
    if (!m) fail(`invalid range '${r}'`);
    const [lo, hi] = [Number(m![1]), Number(m![2] ?? m![1])];
    if (hi < lo) fail(`invalid range '${r}' (reversed)`);
    if (hi - lo >= MAX_HOSTS) fail(`more than ${MAX_HOSTS} hosts`);
    for (let v = lo; v <= hi; v++) out.push(String(v).padStart(m![1].length, '0'));
  }
  return out;
}

/** SLURM_STEP_TASKS_PER_NODE / SLURM_TASKS_PER_NODE: `2(x3),1` -> [2, 2, 2, 1]. */
export function expandTasksPerNode(spec: string, what = 'SLURM_STEP_TASKS_PER_NODE'): number[] {
  const out: number[] = [];
  for (const part of spec.split(',')) {
    const m = /^(\d+)(?:\(x(\d+)\))?$/.exec(part.trim());
    if (!m || Number(m[1]) < 1 || (m[2] !== undefined && Number(m[2]) < 1)) throw new SlurmEnvError(`${what}='${spec}' is not a task count list like 2(x3),1`);
    const n = Number(m[2] ?? 1);
    if (out.length + n > MAX_HOSTS) throw new SlurmEnvError(`${what}='${spec}' names more than ${MAX_HOSTS} nodes`);
    for (let i = 0; i < n; i++) out.push(Number(m[1]));
  }
  return out;
}

/** This task's place in a Slurm job step. */
export interface SlurmTask {
  jobId: number;
  /** The step's nodes in Slurm's order; nodes[0] hosts the coordinator. */
  nodes: string[];
  /** This task's node (index into nodes) and its name. */
  nodeId: number;
  nodeName: string;
  /** Task rank and count in the step (SLURM_PROCID, SLURM_NTASKS). */
  procId: number;
  nTasks: number;
  /** Tasks of the step on each node. */
  tasksPerNode: number[];
  /** GPUs Slurm gave this step on this node (SLURM_STEP_GPUS, else SLURM_JOB_GPUS), if any. */
  gpus?: string[];
}

/**
 * Reads and cross-checks the environment srun gives a task. Outside a job step (sbatch's batch
 * script, or no Slurm at all) it names what is missing and how to run it.
 */
export function slurmTask(env: NodeJS.ProcessEnv = process.env): SlurmTask {
  const get = (name: string, fallback?: string): string => {
    const v = env[name] ?? (fallback === undefined ? undefined : env[fallback]);
    if (v === undefined || v === '') {
      throw new SlurmEnvError(
        env.SLURM_JOB_ID === undefined
          ? '--slurm runs inside a Slurm job: srun --ntasks-per-node=1 pnpm cli launch --slurm ... (in an sbatch script or salloc)'
          : `${name} is not set: --slurm must run under srun (one task per node: srun --ntasks-per-node=1 pnpm cli launch --slurm ...), not in the batch script itself`,
      );
    }
    return v;
  };
  const int = (name: string, fallback?: string): number => {
    const v = get(name, fallback);
    if (!/^\d+$/.test(v)) throw new SlurmEnvError(`${name}='${v}' is not a non-negative integer`);
    return Number(v);
  };
  const jobId = int('SLURM_JOB_ID');
  const nodes = expandHostlist(get('SLURM_STEP_NODELIST', 'SLURM_JOB_NODELIST'), env.SLURM_STEP_NODELIST !== undefined ? 'SLURM_STEP_NODELIST' : 'SLURM_JOB_NODELIST');
  const tasksPerNode = expandTasksPerNode(get('SLURM_STEP_TASKS_PER_NODE', 'SLURM_TASKS_PER_NODE'));
  const nodeId = int('SLURM_NODEID');
  const procId = int('SLURM_PROCID');
  const nTasks = int('SLURM_STEP_NUM_TASKS', 'SLURM_NTASKS');
  const nodeName = get('SLURMD_NODENAME');
  const mismatch = (why: string): never => {
    throw new SlurmEnvError(`Slurm's environment does not add up: ${why}`);
  };
  if (tasksPerNode.length !== nodes.length) mismatch(`${nodes.length} nodes (${nodes.join(',')}) but tasks per node for ${tasksPerNode.length}`);
  if (tasksPerNode.reduce((a, b) => a + b, 0) !== nTasks) mismatch(`${nTasks} tasks but tasks per node add up to ${tasksPerNode.reduce((a, b) => a + b, 0)}`);
  if (procId >= nTasks) mismatch(`SLURM_PROCID ${procId} is not below the task count ${nTasks}`);
  if (nodeId >= nodes.length || nodes[nodeId] !== nodeName) mismatch(`SLURM_NODEID ${nodeId} is ${nodes[nodeId] ?? 'not a node of the step'}, but SLURMD_NODENAME is ${nodeName}`);
  const gpuList = env.SLURM_STEP_GPUS ?? env.SLURM_JOB_GPUS;
  return { jobId, nodes, nodeId, nodeName, procId, nTasks, tasksPerNode, gpus: gpuList ? gpuList.split(',').filter((g) => g !== '') : undefined };
}

/**
 * The coordinator's port for a job when none is given: the same on every node without talking,
 * different for jobs that share a node (the habit of torchrun scripts under Slurm).
 */
export function slurmPort(jobId: number): number {
  return 20_000 + (jobId % 20_000);
}
