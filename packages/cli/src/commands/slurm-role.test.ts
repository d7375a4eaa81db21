import { describe, expect, it } from 'vitest';
import { SECOND_OF_THREE_NODES } from '../testing/slurm-env.js';
import { slurmRole } from './slurm-role.js';

const env = SECOND_OF_THREE_NODES;

describe('slurmRole', () => {
  it('a node after the first joins the first node on the job port (or --port)', async () => {
    const r = await slurmRole({ workers: 2, nodes: 1 }, env);
    expect([r.coordinator, r.port, r.address]).toEqual(['dtnode1', 20_017, undefined]);
    expect((await slurmRole({ workers: 2, nodes: 1, port: 29_500 }, env)).port).toBe(29_500);
  });
  it('refuses what Slurm decides, and GPUs it did not give, in one line', async () => {
    await expect(slurmRole({ workers: 2, nodes: 1 }, { ...env, SLURM_STEP_TASKS_PER_NODE: '2(x3)', SLURM_STEP_NUM_TASKS: '6' })).rejects.toThrow(
      "launch --slurm runs one task per node and starts that node's workers itself (--workers N or --gpus N): start it with srun --ntasks-per-node=1 (this step has 2(x3) tasks per node)",
    );
    await expect(slurmRole({ workers: 2, nodes: 3 }, env)).rejects.toThrow("--nodes 3 with --slurm: the step's nodes make the run (3 here); leave --nodes out");
    await expect(slurmRole({ workers: 2, nodes: 1, listen: '0.0.0.0:1' }, env)).rejects.toThrow('--listen 0.0.0.0:1 with --slurm: the coordinator listens on the first node (dtnode1); give --port to choose its port');
    await expect(slurmRole({ gpus: 4, nodes: 1 }, { ...env, SLURM_STEP_GPUS: '0,1' })).rejects.toThrow(
      '--gpus 4, but Slurm gave this step 2 GPUs on dtnode2 (SLURM_STEP_GPUS=0,1): ask for --gpus-per-node=4, or give --gpus 2',
    );
    expect((await slurmRole({ gpus: 2, nodes: 1 }, { ...env, SLURM_STEP_GPUS: '0,1' })).task.gpus).toEqual(['0', '1']);
  });
  it('the first node binds its own address, and refuses a name that resolves to loopback', async () => {
    const first = { ...env, SLURM_NODEID: '0', SLURM_PROCID: '0', SLURMD_NODENAME: 'localhost', SLURM_STEP_NODELIST: 'localhost,dtnode2,dtnode3' };
    await expect(slurmRole({ workers: 1, nodes: 1 }, first)).rejects.toThrow(
      'localhost resolves to 127.0.0.1 on itself (a loopback address, as Debian\'s /etc/hosts does for a machine\'s own name): the other nodes cannot reach it there; make the name resolve to the node\'s network address',
    );
    const alone = await slurmRole({ workers: 1, nodes: 1 }, { ...first, SLURM_STEP_NODELIST: 'localhost', SLURM_STEP_TASKS_PER_NODE: '1', SLURM_STEP_NUM_TASKS: '1' });
    expect(alone.address).toBe('127.0.0.1');
  });
});
