import { createExecutionContext, waitOnExecutionContext } from "cloudflare:test";
import { describe, expect, it } from "vitest";
import { createServices } from "../../src/context";
import worker from "../../src/index";
import { refreshDeps, refreshTokens } from "../../src/services/scheduled";
import { TEST_SERVICE_KEY } from "./bindings";
import { expireIn } from "./event-helpers";
import { BASE, recordingDataset, type TestEnv, testEnv } from "./helpers";
import { appRowOf, connectBranch, currentTokens, setProviderBehavior } from "./oauth-helpers";

/**
 * One Analytics Engine data point per provider refresh, on the cron, queue and request paths,
 * against the local authorization server: the outcome, the failure class, the source, the grant as
 * the index. Only this file's tokens are refreshed (refreshTokens with their ids, or a read of their
 * branch), so other files' tokens are left alone.
 */

/** The app id as the data point's blob carries it. */
async function appIdOf(branch: { clientId: number }): Promise<string> {
  return String((await appRowOf(branch.clientId))?.id);
}

const refreshPoints = (points: AnalyticsEngineDataPoint[], grant: number) =>
  points.filter((p) => p.blobs?.[0] === "refresh" && p.indexes?.[0] === String(grant));

describe("refresh data points", () => {
  it("the cron and the queue write one per refresh: refreshed, then dead on invalid_grant", async () => {
    const branch = await connectBranch();
    const grant = (await currentTokens(branch.clientId)).row.id;
    const { points, dataset } = recordingDataset();
    const services = await createServices({ ...testEnv, METRICS: dataset } as TestEnv);

    await expireIn(branch.clientId, 60);
    expect((await refreshTokens(refreshDeps(services), [grant], new Date())).refreshed).toBe(1);
    await expireIn(branch.clientId, 60);
    await setProviderBehavior(branch.oauthClientId, { failNext: { status: 400, error: "invalid_grant" } });
    expect((await refreshTokens(refreshDeps(services, "queue"), [grant], new Date())).dead).toBe(1);

    const mine = refreshPoints(points, grant);
    const app = await appIdOf(branch);
    expect(mine.map((p) => p.blobs)).toEqual([
      ["refresh", "refreshed", "", app, "cron"],
      ["refresh", "dead", "invalid_grant", app, "queue"],
    ]);
    for (const point of mine) {
      expect(point.doubles![0]).toBeGreaterThanOrEqual(0);
      expect(point.doubles![0]).toBeLessThan(10_000);
    }
  });

  it("a read that refreshes a due token writes one from the request; a transient failure is 'failed' with its class", async () => {
    const branch = await connectBranch();
    const grant = (await currentTokens(branch.clientId)).row.id;
    const { points, dataset } = recordingDataset();
    const read = async () => {
      const ctx = createExecutionContext();
      const response = await worker.fetch(
        new Request(`${BASE}/tokens/${branch.branchId}`, {
          headers: { authorization: `Bearer ${TEST_SERVICE_KEY}` },
        }) as Request<unknown, IncomingRequestCfProperties>,
        { ...testEnv, METRICS: dataset, TOKEN_CACHE_MAX_AGE_SECONDS: "0" as string } as TestEnv,
        ctx,
      );
      await waitOnExecutionContext(ctx);
      return response;
    };

    await expireIn(branch.clientId, 60);
    expect((await read()).status).toBe(200);
    await expireIn(branch.clientId, 60);
    await setProviderBehavior(branch.oauthClientId, { failNext: { status: 503, error: "temporarily_unavailable" } });
    // Still valid for a minute: served, and the failure recorded.
    expect((await read()).status).toBe(200);

    expect(refreshPoints(points, grant).map((p) => p.blobs)).toEqual([
      ["refresh", "refreshed", "", await appIdOf(branch), "request"],
      ["refresh", "failed", "server_error", await appIdOf(branch), "request"],
    ]);
  });
});
