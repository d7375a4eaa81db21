/**
 * The Slurm variables srun -N3 --ntasks-per-node=1 gave the task on the second node of a real
 * Slurm 22.05 (job id aside): the fixture of the Slurm unit tests.
 */
export const SECOND_OF_THREE_NODES = {
  SLURM_JOB_ID: '17',
  SLURM_STEP_NODELIST: 'dtnode[1-3]',
  SLURM_STEP_TASKS_PER_NODE: '1(x3)',
  SLURM_NODEID: '1',
  SLURM_PROCID: '1',
  SLURM_STEP_NUM_TASKS: '3',
  SLURMD_NODENAME: 'dtnode2',
} as const;
