import { describe, expect, it } from "vitest";
import { dataPointOf, type MetricPoint, metricsOf, NO_METRICS } from "../../src/lib/metrics";
import { recordingDataset, testEnv } from "./helpers";

/**
 * The data point layout the README's Analytics Engine SQL relies on (index1 = grant, blob1..5 =
 * kind, outcome, failure class, app, source, double1..2 = latency, attempt). The webhook wiring is
 * tested in webhooks.test.ts (against the real receiver), the refresh wiring in refresh tests.
 */

const failedRefresh: MetricPoint = {
  kind: "refresh",
  outcome: "dead",
  failureClass: "invalid_grant",
  app: 7,
  grant: 42,
  source: "cron",
  latencyMs: 183.6,
};

describe("metrics data points", () => {
  it("put the grant in the index and the fields in their fixed places", () => {
    expect(dataPointOf(failedRefresh)).toEqual({
      indexes: ["42"],
      blobs: ["refresh", "dead", "invalid_grant", "7", "cron"],
      doubles: [184, 1],
    });
  });

  it("leave empty strings, never 'undefined', for a success without grant or app", () => {
    expect(
      dataPointOf({ kind: "webhook", outcome: "delivered", source: "request", latencyMs: -3, attempt: 2 }),
    ).toEqual({ indexes: [""], blobs: ["webhook", "delivered", "", "", "request"], doubles: [0, 2] });
  });

  it("are written to the dataset when the binding exists, one per record", () => {
    const { points, dataset } = recordingDataset();
    const metrics = metricsOf(dataset);
    metrics.record(failedRefresh);
    metrics.record({ ...failedRefresh, outcome: "refreshed", failureClass: undefined });
    expect(points.map((p) => p.blobs?.[1])).toEqual(["dead", "refreshed"]);
  });

  it("are a no-op without the binding, and a failing dataset never fails the caller", () => {
    expect(metricsOf(undefined)).toBe(NO_METRICS);
    const throwing: AnalyticsEngineDataset = {
      writeDataPoint: () => {
        throw new Error("limit exceeded");
      },
    };
    expect(() => metricsOf(throwing).record(failedRefresh)).not.toThrow();
  });

  it("go through the runtime's own binding (wrangler.toml's METRICS, Miniflare's stand-in here)", () => {
    expect(testEnv.METRICS).toBeDefined();
    expect(() => metricsOf(testEnv.METRICS).record(failedRefresh)).not.toThrow();
  });
});
