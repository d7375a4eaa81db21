#!/usr/bin/env node
// Entry point of `pnpm cli` (and of the `dtrain` binary).
import { buildProgram } from './program.js';
import { reportAndExit } from './errors.js';

// Leave when the command is done: Dawn (WebGPU), ZeroMQ and TensorFlow keep native threads that can
// hold the event loop open after the work (as the workers do, worker-main.ts).
buildProgram()
  .parseAsync(process.argv)
  .then(() => process.exit(process.exitCode ?? 0))
  .catch(reportAndExit);
