import { cloudflareTest } from "@cloudflare/vitest-plugin";
import { defineConfig } from "vitest/config";
import { unstable_readConfig } from "wrangler";
import { ASSETS_DIR, copyDocsAssets } from "./scripts/docs-assets.ts";
import { TEST_BINDINGS } from "./test/worker/bindings.ts";

// The Worker as wrangler.toml declares it (entry, compatibility, [vars]), read by wrangler itself.
// Not through the plugin's `wrangler: { configPath }`: that also loads a developer's .dev.vars
// (or .env files, or with CLOUDFLARE_INCLUDE_PROCESS_ENV the whole shell environment) as bindings,
// so a user's local settings would change what the tests see. The tests are hermetic: their bindings
// are wrangler.toml's [vars] and what is set below, nothing else.
const worker = unstable_readConfig({ config: "wrangler.toml" });
type RateLimitBinding = { name: string; namespace_id: string; simple: { limit: number; period: 10 | 60 } };
// The static assets the docs page loads, as `npm run dev` and `npm run deploy` ship them.
copyDocsAssets();

// The Worker's tests run inside workerd (the Workers runtime) against the local database program
// and the local authorization server, both started by the global setup on free ports.
export default defineConfig({
  plugins: [
    cloudflareTest(({ inject }) => ({
      main: worker.main,
      miniflare: {
        compatibilityDate: worker.compatibility_date,
        compatibilityFlags: worker.compatibility_flags,
        assets: { directory: ASSETS_DIR, binding: "ASSETS", run_worker_first: true },
        // The optional growth-path queue (see wrangler.toml), consumed by this same Worker.
        queueProducers: { REFRESH_QUEUE: { queueName: "token-refresh" } },
        queueConsumers: { "token-refresh": { maxBatchSize: 10, maxBatchTimeout: 0.1 } },
        // wrangler.toml's [[ratelimits]] (AUTH_FAILURES), run locally by Miniflare.
        ratelimits: Object.fromEntries(
          worker.ratelimits.map(({ name, namespace_id, simple }: RateLimitBinding) => [name, { namespace_id, simple }]),
        ),
        // wrangler.toml's proxy quota object, defined by the Worker's main module.
        durableObjects: { PROXY_QUOTA: "ProxyQuota" },
        // wrangler.toml's METRICS dataset: Miniflare's local stand-in, which keeps nothing (hermetic).
        analyticsEngineDatasets: { METRICS: { dataset: "token_management_test" } },
        bindings: {
          ...worker.vars,
          ...TEST_BINDINGS,
          TOKEN_MANAGEMENT_DATABASE_URL: inject<string>("databaseUrl"),
          NEON_LOCAL_FETCH_ENDPOINT: inject<string>("sqlEndpoint"),
          NEON_LOCAL_URL: inject<string>("neonLocalUrl"),
          OAUTH_SERVER_URL: inject<string>("oauthServerUrl"),
          // The local server's issuer is another origin than its endpoints, as Google's is.
          OAUTH_ISSUER: inject<string>("oauthIssuer"),
          // Not WEBHOOK_URL: only the tests of events deliver (to inboxes of their own), so other
          // files' changes are logged as not_sent and never reach another test's inbox.
          WEBHOOK_RECEIVER_URL: inject<string>("webhookReceiverUrl"),
          OAUTH_AUTHORIZATION_URL: `${inject<string>("oauthServerUrl")}/authorize`,
          OAUTH_TOKEN_URL: `${inject<string>("oauthServerUrl")}/token`,
          OAUTH_REVOCATION_URL: `${inject<string>("oauthServerUrl")}/revoke`,
          // The local server's Google profile is also the RISC transmitter (dev/oauth-server/risc.ts).
          RISC_CONFIGURATION_URL: `${inject<string>("oauthServerUrl")}/.well-known/risc-configuration`,
          // Its Business Profile API too (both of Google's hosts are this one server).
          BUSINESS_PROFILE_API_BASE_URLS: `${inject<string>("oauthServerUrl")},${inject<string>("oauthServerUrl")}`,
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
