import { describe, expect, it } from 'vitest';
import { expandHostlist, expandTasksPerNode, slurmPort, slurmTask, SlurmEnvError } from './slurm.js';
import { SECOND_OF_THREE_NODES } from './testing/slurm-env.js';

describe('expandHostlist', () => {
  // Expected values: the output of `scontrol show hostnames LIST` of Slurm 22.05.8 (Debian 12).
  const scontrol: [string, string[]][] = [
    ['node[01-03,7]', ['node01', 'node02', 'node03', 'node7']],
    ['a,b', ['a', 'b']],
    ['n[1-3],m[08-10]', ['n1', 'n2', 'n3', 'm08', 'm09', 'm10']],
    ['n[9-11]', ['n9', 'n10', 'n11']],
    ['n[010-012]', ['n010', 'n011', 'n012']],
    ['x[1-2][3-4]', ['x13', 'x14', 'x23', 'x24']],
    ['gpu-[1,3]', ['gpu-1', 'gpu-3']],
    ['n[01-3]', ['n01', 'n02', 'n03']],
    ['n[1-03]', ['n1', 'n2', 'n3']],
    [' a', ['a']],
    ['dtnode[1-3]', ['dtnode1', 'dtnode2', 'dtnode3']],
  ];
  it.each(scontrol)('%s as scontrol expands it', (list, hosts) => {
    expect(expandHostlist(list)).toEqual(hosts);
  });

  // scontrol refuses all of these but `n[1-2`, which it misreads as `n]`.
  it.each(['n[3]-ib', 'n[3-1]', 'n[]', 'n[a-b]', 'n[1-2]x', 'n[1-2', 'n]1', 'n[[1]]', '', 'n[1-1000000]'])('refuses %j in one line naming the list', (list) => {
    expect(() => expandHostlist(list, 'SLURM_STEP_NODELIST')).toThrow(SlurmEnvError);
    expect(() => expandHostlist(list, 'SLURM_STEP_NODELIST')).toThrow(new RegExp(`^SLURM_STEP_NODELIST '${list.replace(/[[\]]/g, '\\$&')}' is not a Slurm hostlist: `));
  });
});

describe('expandTasksPerNode', () => {
  it('reads counts and repeats', () => {
    expect(expandTasksPerNode('1(x3)')).toEqual([1, 1, 1]);
    expect(expandTasksPerNode('2(x3),1')).toEqual([2, 2, 2, 1]);
    expect(expandTasksPerNode('4')).toEqual([4]);
  });
  it.each(['', '0', '2(x0)', 'x', '2(3)'])('refuses %j', (spec) => {
    expect(() => expandTasksPerNode(spec)).toThrow(/^SLURM_STEP_TASKS_PER_NODE='.*' is not a task count list like 2\(x3\),1$/);
  });
});

describe('slurmTask', () => {
  const env = SECOND_OF_THREE_NODES;
  it('reads the step: nodes, this node, tasks', () => {
    expect(slurmTask(env)).toEqual({ jobId: 17, nodes: ['dtnode1', 'dtnode2', 'dtnode3'], nodeId: 1, nodeName: 'dtnode2', procId: 1, nTasks: 3, tasksPerNode: [1, 1, 1], gpus: undefined });
    expect(slurmTask({ ...env, SLURM_STEP_GPUS: '2,3' }).gpus).toEqual(['2', '3']);
  });
  it('outside a job, and in the batch script, says how to run it', () => {
    expect(() => slurmTask({})).toThrow(/^--slurm runs inside a Slurm job: srun --ntasks-per-node=1 pnpm cli launch --slurm/);
    const batch = { SLURM_JOB_ID: '17', SLURM_JOB_NODELIST: 'dtnode[1-3]', SLURM_TASKS_PER_NODE: '1(x3)', SLURM_NODEID: '0', SLURM_PROCID: '0', SLURM_NTASKS: '3', SLURMD_NODENAME: 'dtnode1' };
    expect(slurmTask(batch).nodes).toHaveLength(3);
    const { SLURM_NODEID: _, ...noNode } = batch;
    expect(() => slurmTask(noNode)).toThrow(/^SLURM_NODEID is not set: --slurm must run under srun/);
  });
  it('names the variables that disagree', () => {
    expect(() => slurmTask({ ...env, SLURMD_NODENAME: 'other' })).toThrow("Slurm's environment does not add up: SLURM_NODEID 1 is dtnode2, but SLURMD_NODENAME is other");
    expect(() => slurmTask({ ...env, SLURM_STEP_TASKS_PER_NODE: '1(x2)' })).toThrow(/3 nodes \(dtnode1,dtnode2,dtnode3\) but tasks per node for 2/);
    expect(() => slurmTask({ ...env, SLURM_STEP_NUM_TASKS: '4' })).toThrow(/4 tasks but tasks per node add up to 3/);
    expect(() => slurmTask({ ...env, SLURM_PROCID: '3' })).toThrow(/SLURM_PROCID 3 is not below the task count 3/);
    expect(() => slurmTask({ ...env, SLURM_NODEID: 'one' })).toThrow("SLURM_NODEID='one' is not a non-negative integer");
  });
});

describe('slurmPort', () => {
  it('is a registered-range port, the same for a job everywhere, different for neighbouring jobs', () => {
    expect(slurmPort(17)).toBe(20_017);
    expect(slurmPort(20_017)).toBe(20_017);
    expect(slurmPort(39_999)).toBe(39_999);
    expect(slurmPort(18)).not.toBe(slurmPort(17));
  });
});
