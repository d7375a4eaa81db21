import { Command } from '@commander-js/extra-typings';

export function buildProgram() {
  const program = new Command()
    .name('dtrain')
    .description('Data-parallel ResNet training on CIFAR-10 and Fashion-MNIST, across GPUs and machines.')
    .showHelpAfterError('(run with --help for usage)');
  return program;
}
