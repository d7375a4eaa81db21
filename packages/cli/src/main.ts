#!/usr/bin/env node
// Entry point of `pnpm cli` (and of the `dtrain` binary).
import { buildProgram } from './program.js';
import { reportAndExit } from './errors.js';

buildProgram()
  .parseAsync(process.argv)
  .catch(reportAndExit);
