import { cloudflareTest } from "@cloudflare/vitest-plugin";
import { defineConfig } from "vitest/config";
import { TEST_BINDINGS } from "./test/worker/bindings.ts";

// The Worker's tests run inside workerd (the Workers runtime) against the local database program
// and the local authorization server, both started by the global setup on free ports.
export default defineConfig({
  plugins: [
    cloudflareTest(({ inject }) => ({
      wrangler: { configPath: "./wrangler.toml" },
      miniflare: {
        // The optional growth-path queue (see wrangler.toml), consumed by this same Worker.
        queueProducers: { REFRESH_QUEUE: { queueName: "token-refresh" } },
        queueConsumers: { "token-refresh": { maxBatchSize: 10, maxBatchTimeout: 0.1 } },
        bindings: {
          ...TEST_BINDINGS,
          TOKEN_MANAGEMENT_DATABASE_URL: inject<string>("databaseUrl"),
          NEON_LOCAL_FETCH_ENDPOINT: inject<string>("sqlEndpoint"),
          NEON_LOCAL_URL: inject<string>("neonLocalUrl"),
          OAUTH_SERVER_URL: inject<string>("oauthServerUrl"),
          // The local server's issuer is another origin than its endpoints, as Google's is.
          OAUTH_ISSUER: inject<string>("oauthIssuer"),
          OAUTH_AUTHORIZATION_URL: `${inject<string>("oauthServerUrl")}/authorize`,
          OAUTH_TOKEN_URL: `${inject<string>("oauthServerUrl")}/token`,
          OAUTH_REVOCATION_URL: `${inject<string>("oauthServerUrl")}/revoke`,
        },
      },
    })),
  ],
  test: {
    name: "worker",
    include: ["test/worker/**/*.test.ts"],
    globalSetup: ["./test/worker/global-setup.ts"],
    testTimeout: 30_000,
    hookTimeout: 60_000,
  },
});
