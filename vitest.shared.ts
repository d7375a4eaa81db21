import { fileURLToPath } from 'node:url';
import { defineConfig } from 'vitest/config';

// The test settings of every package; each package's vitest.config.ts re-exports this file
// (a package-level `vitest run` needs a config of its own).

export default defineConfig({
  test: {
    include: ['src/**/*.test.ts'],
    // A temporary directory per test file, removed after it (tools/test-tmpdir.ts).
    setupFiles: [fileURLToPath(new URL('./tools/test-tmpdir.ts', import.meta.url))],
    testTimeout: 120_000,
    hookTimeout: 120_000,
    // Native TensorFlow and real sockets: one test file at a time keeps 2-core CI machines honest.
    fileParallelism: false,
  },
});
