import { fileURLToPath } from 'node:url';
import { defineConfig } from 'vitest/config';

// The test settings of every package; each package's vitest.config.ts re-exports this file
// (a package-level `vitest run` needs a config of its own).

export default defineConfig({
  test: {
    include: ['src/**/*.test.ts'],
    // A temporary directory per test file, removed after it (tools/test-tmpdir.ts).
    setupFiles: [fileURLToPath(new URL('./tools/test-tmpdir.ts', import.meta.url))],
    // Long enough for a unit test or a CLI command that trains nothing, on a loaded 2-core machine.
    // Processes a CLI test starts (packages/cli/src/testing/processes.ts) are killed with their
    // process groups when the test ends, and at the latest KILL_MARGIN_MS (20 s) before its timeout:
    // none outlives its test, whatever the limits. Tests that train set their timeout with
    // testTimeoutFor(runs) from there: RUN_LIMIT_MS (150 s) per launch run in turn, plus the margin.
    testTimeout: 120_000,
    hookTimeout: 120_000,
    // Native TensorFlow and real sockets: one test file at a time keeps 2-core CI machines honest.
    fileParallelism: false,
  },
});
