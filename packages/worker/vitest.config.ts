import { defineConfig } from 'vitest/config';

export default defineConfig({
  test: {
    include: ['src/**/*.test.ts'],
    testTimeout: 120_000,
    hookTimeout: 120_000,
    // Native TensorFlow and real sockets: one test file at a time keeps 2-core CI machines honest.
    fileParallelism: false,
  },
});
