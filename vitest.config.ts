import { defineConfig } from 'vitest/config';

export default defineConfig({
  test: {
    include: ['apps/*/src/**/*.test.ts', 'packages/*/src/**/*.test.ts', 'scripts/**/*.test.ts', 'tests/**/*.test.ts'],
    testTimeout: 60_000,
    hookTimeout: 90_000,
    // cross-process tests each start a farm; two at a time fits a two-core machine
    maxWorkers: 2,
    fileParallelism: true,
  },
});
