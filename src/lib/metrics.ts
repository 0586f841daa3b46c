/**
 * Numbers to alert on: one Workers Analytics Engine data point per refresh outcome, per webhook
 * delivery attempt and per proxied provider call, written to the METRICS dataset binding
 * (wrangler.toml). Optional: without the binding every record() is a no-op. Writing never throws
 * and never waits (Analytics Engine takes the point in memory and ships it after the invocation).
 *
 * The layout is positional (Analytics Engine has no column names) and the README's SQL relies on
 * it: append new fields, never reorder.
 *
 *   index1   the grant (tokens.id) as text, "" when none: Analytics Engine samples per index value,
 *            so a busy grant's points never crowd out a quiet grant's failure
 *   blob1    kind: refresh | webhook | proxy
 *   blob2    outcome: refresh: refreshed | failed | dead; webhook: delivered | failed | gone;
 *            proxy: the caller's choice (ok | failed)
 *   blob3    failure class, "" on success: refresh and proxy: the provider failure
 *            (invalid_grant, invalid_client, rate_limited, server_error, timeout, network, rejected,
 *            invalid_response, sealed_value_unreadable); webhook: http_4xx | http_5xx | timeout |
 *            network | gone
 *   blob4    app as text ("" when not known)
 *   blob5    source: cron | queue | request
 *   double1  latency in milliseconds (the provider call, or the webhook attempt)
 *   double2  attempt number (webhook: 1 for the first attempt; refresh and proxy: 1)
 */

export type MetricKind = "refresh" | "webhook" | "proxy";
export type MetricSource = "cron" | "queue" | "request";

export interface MetricPoint {
  kind: MetricKind;
  outcome: string;
  /** Empty or undefined on success. */
  failureClass?: string | undefined;
  app?: number | string | undefined;
  grant?: number | string | undefined;
  source: MetricSource;
  latencyMs: number;
  attempt?: number | undefined;
}

export interface Metrics {
  record(point: MetricPoint): void;
}

/** What a deployment without the METRICS binding gets. */
export const NO_METRICS: Metrics = { record: () => {} };

const text = (value: number | string | undefined) => (value === undefined ? "" : String(value));

/** The Analytics Engine data point for a metric (the layout above). */
export function dataPointOf(point: MetricPoint): AnalyticsEngineDataPoint {
  return {
    indexes: [text(point.grant)],
    blobs: [point.kind, point.outcome, point.failureClass ?? "", text(point.app), point.source],
    doubles: [Math.max(0, Math.round(point.latencyMs)), point.attempt ?? 1],
  };
}

/** Metrics written to the dataset, or NO_METRICS without one. */
export function metricsOf(dataset: AnalyticsEngineDataset | undefined): Metrics {
  if (!dataset) return NO_METRICS;
  return {
    record(point) {
      try {
        dataset.writeDataPoint(dataPointOf(point));
      } catch {
        // A metric that cannot be written (a limit, a runtime without the binding's backend) must
        // never fail the refresh or the delivery it describes.
      }
    },
  };
}

export type RefreshOutcome = "refreshed" | "failed" | "dead";

/** What the refresh code calls once per provider refresh, with the grant it refreshed. */
export type RefreshRecorder = (
  grant: { id: number; appId?: number | null },
  outcome: RefreshOutcome,
  failureClass: string | undefined,
  latencyMs: number,
) => void;

/** A RefreshRecorder writing refresh data points for one kind of invocation. */
export function refreshRecorder(metrics: Metrics, source: MetricSource): RefreshRecorder {
  return (grant, outcome, failureClass, latencyMs) =>
    metrics.record({
      kind: "refresh",
      outcome,
      failureClass,
      grant: grant.id,
      app: grant.appId ?? undefined,
      source,
      latencyMs,
    });
}
