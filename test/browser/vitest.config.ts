import { defineConfig } from "vitest/config";

// The console in a real browser (`npm run test:browser`): headless Chromium (the system's, through
// playwright-core) against a stack this file's test starts itself. One file, its steps in order.
export default defineConfig({
  test: {
    name: "browser",
    include: ["test/browser/**/*.test.ts"],
    environment: "node",
    fileParallelism: false,
    testTimeout: 60_000,
    hookTimeout: 240_000,
  },
});
