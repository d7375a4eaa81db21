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

export function buildProgram() {
  const program = new Command()
    .name('dtrain')
    .description('Data-parallel ResNet training on CIFAR-10 and Fashion-MNIST, across GPUs and machines.')
    .exitOverride()
    // One line and exit 2 for usage mistakes too (unknown option, missing argument), like other bad input.
    .configureOutput({ outputError: (str, write) => write(`${str.trimEnd()} (run with --help for usage)\n`) });
  registerDoctor(program);
  registerData(program);
  registerModel(program);
  registerTrain(program);
  registerLaunch(program);
  registerJoin(program);
  registerReport(program);
  registerRuns(program);
  registerKeys(program);
  return program;
}
