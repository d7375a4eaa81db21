import { Command } from '@commander-js/extra-typings';
import { registerData } from './commands/data.js';
import { registerDoctor } from './commands/doctor.js';
import { registerModel } from './commands/model.js';
import { registerLaunch } from './commands/launch.js';
import { registerJoin } from './commands/join.js';
import { registerTrain } from './commands/train.js';
import { registerReport } from './commands/report.js';
import { registerRuns } from './commands/runs.js';
import { registerKeys } from './commands/keys.js';
import { registerExport } from './commands/export.js';

/** Commands that write runs: their files are created with umask 077. */
const PRIVATE_COMMANDS = new Set(['train', 'launch', 'join']);

export function buildProgram() {
  const program = new Command()
    .name('dtrain')
    .description('Data-parallel ResNet training on CIFAR-10 and Fashion-MNIST, across GPUs and machines.')
    .exitOverride()
    // One line and exit 2 for usage mistakes too (unknown option, missing argument), like other bad input.
    .configureOutput({ outputError: (str, write) => write(`${str.trimEnd()} (run with --help for usage)\n`) })
    // Run folders, logs and checkpoints are this user's alone (workers inherit it): config.json and
    // the logs name the run id, and the weights are the user's work (issue 19, 1.1).
    .hook('preAction', (_, action) => {
      if (PRIVATE_COMMANDS.has(action.name())) process.umask(0o077);
    });
  registerDoctor(program);
  registerData(program);
  registerModel(program);
  registerTrain(program);
  registerLaunch(program);
  registerJoin(program);
  registerReport(program);
  registerRuns(program);
  registerExport(program);
  registerKeys(program);
  return program;
}
