/**
 * An app's budgets at its provider, as one Durable Object holds them (src/proxy/quota.ts): requests
 * per minute for the whole app, edits per minute per resource, and a pause after the provider's own
 * 429. Sliding one-minute windows of the times requests were let through: a burst can never exceed
 * the limit within any 60 s, which is how the provider counts. Pure: time is a parameter.
 */

export const QUOTA_WINDOW_MS = 60_000;
/** Above this many tracked resources, resources with no edit in the window are forgotten. */
const RESOURCE_SWEEP_THRESHOLD = 1_000;
const MS_PER_SECOND = 1_000;

export interface QuotaLimits {
  requestsPerMinute: number;
  /** For writes that edit `resource`; 0 means no edit budget. */
  editsPerMinutePerResource: number;
}

export interface QuotaAsk {
  limits: QuotaLimits;
  /** The resource the request edits (src/lib/proxy-rules.ts editedResource), if any. */
  resource?: string | undefined;
}

export type QuotaAnswer =
  | { granted: true }
  | { granted: false; reason: "requests" | "edits" | "paused"; retryAfterSeconds: number };

export class QuotaLedger {
  /** When each request in the window was let through, oldest first. */
  private readonly requests: number[] = [];
  private readonly edits = new Map<string, number[]>();
  private pausedUntilMs = 0;

  /** Lets one request through (counting it, and its edit) or says how long until one would be. */
  take(ask: QuotaAsk, nowMs: number): QuotaAnswer {
    if (nowMs < this.pausedUntilMs) {
      return { granted: false, reason: "paused", retryAfterSeconds: secondsUntil(this.pausedUntilMs, nowMs) };
    }
    prune(this.requests, nowMs);
    if (this.requests.length >= ask.limits.requestsPerMinute) {
      return { granted: false, reason: "requests", retryAfterSeconds: freedAfter(this.requests, nowMs) };
    }
    let edits: number[] | undefined;
    if (ask.resource !== undefined && ask.limits.editsPerMinutePerResource > 0) {
      this.sweepResources(nowMs);
      edits = this.edits.get(ask.resource) ?? [];
      prune(edits, nowMs);
      if (edits.length >= ask.limits.editsPerMinutePerResource) {
        return { granted: false, reason: "edits", retryAfterSeconds: freedAfter(edits, nowMs) };
      }
    }
    this.requests.push(nowMs);
    if (edits && ask.resource !== undefined) {
      edits.push(nowMs);
      this.edits.set(ask.resource, edits);
    }
    return { granted: true };
  }

  /** No request goes through before `untilMs` (a later pause wins); true when this changed it. */
  pause(untilMs: number): boolean {
    if (untilMs <= this.pausedUntilMs) return false;
    this.pausedUntilMs = untilMs;
    return true;
  }

  get pausedUntil(): number {
    return this.pausedUntilMs;
  }

  private sweepResources(nowMs: number): void {
    if (this.edits.size < RESOURCE_SWEEP_THRESHOLD) return;
    for (const [resource, times] of this.edits) {
      prune(times, nowMs);
      if (times.length === 0) this.edits.delete(resource);
    }
  }
}

/** Drops the times that left the window. */
function prune(times: number[], nowMs: number): void {
  let expired = 0;
  while (expired < times.length && times[expired]! <= nowMs - QUOTA_WINDOW_MS) expired++;
  if (expired > 0) times.splice(0, expired);
}

/** Seconds until the oldest time in the window leaves it (at least 1). */
function freedAfter(times: number[], nowMs: number): number {
  return secondsUntil(times[0]! + QUOTA_WINDOW_MS, nowMs);
}

function secondsUntil(whenMs: number, nowMs: number): number {
  return Math.max(1, Math.ceil((whenMs - nowMs) / MS_PER_SECOND));
}
