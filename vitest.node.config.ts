import { defineConfig } from "vitest/config";

// Tests of the Node-side programs (the local database, the local authorization server).
// The Worker's own tests run inside workerd: see vitest.config.ts.
export default defineConfig({
  test: {
    name: "node",
    include: ["test/node/**/*.test.ts"],
    environment: "node",
    testTimeout: 30_000,
    hookTimeout: 60_000,
  },
});
