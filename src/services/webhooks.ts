import type { Services } from "../context";
import type { Db } from "../db/client";
import type { EventRow } from "../db/schema";
import { type Config, WEBHOOK_SECRET_PREFIX } from "../env";
import { forEachLane, MAX_OUTBOUND_CONNECTIONS } from "../lib/concurrency";
import type { Keyring } from "../lib/crypto";
import { fromBase64, utf8 } from "../lib/encoding";
import { describeError, logInfo, logWarn } from "../lib/log";
import type { MetricPoint, MetricSource, Metrics } from "../lib/metrics";
import {
  claimDueEvents,
  type DeliveryOutcome,
  pruneEvents,
  recordDeliveries,
  releaseClaims,
  stopPendingDeliveries,
} from "./events";
import { clientsAwaitingConsent, signLoginLink } from "./login-links";
import { pruneSecurityEvents } from "./risc";

/**
 * Webhooks by the Standard Webhooks specification (https://www.standardwebhooks.com): each delivery
 * carries `webhook-id` (the same on every retry, so receivers can deduplicate), `webhook-timestamp`
 * (Unix seconds of this attempt) and `webhook-signature` (`v1,<base64 HMAC-SHA256 over
 * id.timestamp.body>`, once per secret during a rotation). Delivery is at least once: an event is
 * marked delivered only after a 2xx, and until then the cron retries it on a growing ladder.
 */

/** Waits after the failed attempt number i+1 (attempt 1 is right after the change commits). */
export const RETRY_LADDER_SECONDS = [5, 5 * 60, 30 * 60, 2 * 3600, 5 * 3600, 10 * 3600, 10 * 3600] as const;
export const MAX_ATTEMPTS = RETRY_LADDER_SECONDS.length + 1;
/** Events claimed per statement, and at most this many per delivery pass. */
export const DELIVERY_PAGE_SIZE = 100;
export const DELIVERY_MAX_PER_RUN = 1_000;
export const DELIVERY_CONCURRENCY = MAX_OUTBOUND_CONNECTIONS;
/** Room beyond a page's longest run before its events may be claimed again (a crashed pass). */
const CLAIM_MARGIN_MS = 30_000;
/**
 * A login link in a needs_reauth webhook works at most this long after the event: long enough for
 * the receiver to pass it to someone at the branch the same day, short enough that a payload kept
 * in a receiver's logs is soon worthless. Later attempts and redeliveries carry `login_hint`
 * instead (an operator asks for a fresh link), and none carries a link once the branch has
 * reconnected. Never longer than LOGIN_LINK_TTL_SECONDS.
 */
export const WEBHOOK_LOGIN_LINK_TTL_SECONDS = 24 * 60 * 60;
/** Kept from a receiver's answer in `last_error`: enough to diagnose, never the whole body. */
const ERROR_BODY_CHARS = 200;
/** Read of a receiver's error answer: at most this much, the rest cancelled unread (it may never end). */
const ERROR_BODY_MAX_BYTES = 4 * 1024;

export interface WebhookTarget {
  url: string;
  /** `whsec_…` secrets: the current one first, then the previous ones. */
  secrets: readonly string[];
  timeoutMs: number;
}

/** The configured receiver, or undefined when events are only logged. */
export function webhookTarget(config: Config): WebhookTarget | undefined {
  if (!config.WEBHOOK_URL || !config.WEBHOOK_SECRET) return undefined;
  return {
    url: config.WEBHOOK_URL,
    secrets: [config.WEBHOOK_SECRET, ...config.WEBHOOK_PREVIOUS_SECRETS],
    timeoutMs: config.WEBHOOK_TIMEOUT_MS,
  };
}

const hmacKeys = new Map<string, Promise<CryptoKey>>();

function hmacKey(secret: string): Promise<CryptoKey> {
  let key = hmacKeys.get(secret);
  if (!key) {
    const raw = fromBase64(secret.slice(WEBHOOK_SECRET_PREFIX.length));
    key = crypto.subtle.importKey("raw", raw, { name: "HMAC", hash: "SHA-256" }, false, ["sign"]);
    hmacKeys.set(secret, key);
  }
  return key;
}

/** `v1,<sig>` for each secret, space-separated: a receiver holding any one of them verifies. */
export async function signWebhook(
  secrets: readonly string[],
  id: string,
  timestampSeconds: number,
  body: string,
): Promise<string> {
  const content = utf8(`${id}.${timestampSeconds}.${body}`);
  const signatures = await Promise.all(
    secrets.map(async (secret) => {
      const mac = new Uint8Array(await crypto.subtle.sign("HMAC", await hmacKey(secret), content));
      let binary = "";
      for (const byte of mac) binary += String.fromCharCode(byte);
      return `v1,${btoa(binary)}`;
    }),
  );
  return signatures.join(" ");
}

export const webhookId = (eventId: number) => `evt_${eventId}`;

/** The thin payload: what happened to which branch, never a token or a secret. */
export interface WebhookPayload {
  type: EventRow["type"];
  timestamp: string;
  data: {
    event_id: string;
    /** The branch as callers use it in /tokens/{branch_id}. */
    branch_id: string;
    /** The internal client id (the API's client_id). */
    client_id: number;
    /** Per-branch order: deliveries may overtake each other, this does not. */
    sequence: number;
    status_before: string;
    status_after: string;
    reason: string | null;
    /**
     * needs_reauth only, while the branch still needs a consent: a login link to send to someone
     * at the branch, working until WEBHOOK_LOGIN_LINK_TTL_SECONDS after the event.
     */
    login_url?: string;
    login_url_expires_at?: string;
    /** needs_reauth while consent is still needed but no link is sent (no public URL, or too late): where an operator gets one. */
    login_hint?: string;
  };
}

export interface PayloadDeps {
  keyring: Keyring;
  /** The service's public root; without it a needs_reauth payload carries `login_hint` instead of a link. */
  baseUrl: string | undefined;
  loginLinkTtlSeconds: number;
}

/**
 * `awaitingConsent`: the branch still exists and still needs a consent now (a branch that has
 * reconnected, or was deleted, gets neither a link nor a hint).
 */
export async function buildPayload(
  deps: PayloadDeps,
  event: EventRow,
  awaitingConsent: boolean,
  now: Date,
): Promise<WebhookPayload> {
  const data: WebhookPayload["data"] = {
    event_id: webhookId(event.id),
    branch_id: event.branchId,
    client_id: event.clientId,
    sequence: event.seq,
    status_before: event.statusBefore,
    status_after: event.statusAfter,
    reason: event.reason,
  };
  if (event.type === "connection.needs_reauth" && awaitingConsent) {
    // Counted from the event, not from this attempt: a late retry or a redelivery revives nothing.
    const endsMs = event.createdAt.getTime() + WEBHOOK_LOGIN_LINK_TTL_SECONDS * 1000;
    const ttlSeconds = Math.min(deps.loginLinkTtlSeconds, Math.floor((endsMs - now.getTime()) / 1000));
    if (deps.baseUrl && ttlSeconds > 0) {
      // Issued now: single use and revocable like any link (see login-links.ts).
      const link = await signLoginLink(deps.keyring, deps.baseUrl, event.clientId, now, ttlSeconds);
      data.login_url = link.url;
      data.login_url_expires_at = link.expiresAt.toISOString();
    } else {
      data.login_hint = `/token-management/clients/${event.clientId}/login-url`;
    }
  }
  return { type: event.type, timestamp: event.createdAt.toISOString(), data };
}

export type AttemptResult =
  | { kind: "delivered"; status: number }
  | { kind: "gone"; status: 410 }
  | { kind: "failed"; error: string; failureClass: WebhookFailureClass };

/** Why an attempt failed, for metrics (src/lib/metrics.ts). */
export type WebhookFailureClass = "http_4xx" | "http_5xx" | "timeout" | "network";

/** One POST to the receiver, bounded by the timeout. Never throws. */
export async function sendWebhook(
  target: WebhookTarget,
  id: string,
  body: string,
  now: Date,
  fetcher: typeof fetch = fetch,
): Promise<AttemptResult> {
  const timestamp = Math.floor(now.getTime() / 1000);
  const headers = {
    "content-type": "application/json",
    "user-agent": "token-management-webhooks/1",
    "webhook-id": id,
    "webhook-timestamp": String(timestamp),
    "webhook-signature": await signWebhook(target.secrets, id, timestamp, body),
  };
  try {
    const response = await fetcher(target.url, {
      method: "POST",
      headers,
      body,
      redirect: "manual",
      signal: AbortSignal.timeout(target.timeoutMs),
    });
    if (response.status >= 200 && response.status < 300) {
      await response.body?.cancel();
      return { kind: "delivered", status: response.status };
    }
    if (response.status === 410) {
      await response.body?.cancel();
      return { kind: "gone", status: 410 };
    }
    const text = (await readPrefix(response, ERROR_BODY_MAX_BYTES)).slice(0, ERROR_BODY_CHARS);
    return {
      kind: "failed",
      error: `HTTP ${response.status}${text ? `: ${text}` : ""}`,
      failureClass: response.status < 500 ? "http_4xx" : "http_5xx",
    };
  } catch (error) {
    const timedOut = error instanceof DOMException && error.name === "TimeoutError";
    return timedOut
      ? { kind: "failed", error: `no answer within ${target.timeoutMs} ms`, failureClass: "timeout" }
      : { kind: "failed", error: describeError(error), failureClass: "network" };
  }
}

/** The first `maxBytes` of a body as text (less if it ends first; "" if it fails), the rest cancelled. */
async function readPrefix(response: Response, maxBytes: number): Promise<string> {
  if (!response.body) return "";
  const reader = response.body.getReader();
  const bytes = new Uint8Array(maxBytes);
  let size = 0;
  try {
    while (size < maxBytes) {
      const { done, value } = await reader.read();
      if (done) break;
      const take = Math.min(value.byteLength, maxBytes - size);
      bytes.set(value.subarray(0, take), size);
      size += take;
    }
  } catch {
    // A body cut off or timed out: what arrived is still worth keeping.
  } finally {
    await reader.cancel().catch(() => undefined);
  }
  return new TextDecoder().decode(bytes.subarray(0, size));
}

/** When the next attempt is due after `attempts` failed ones, or undefined when the ladder is spent. */
export function nextAttemptAfter(attempts: number, now: Date): Date | undefined {
  const wait = RETRY_LADDER_SECONDS[attempts - 1];
  return wait === undefined ? undefined : new Date(now.getTime() + wait * 1000);
}

export interface DeliveryDeps extends PayloadDeps {
  db: Db;
  target: WebhookTarget;
  fetcher?: typeof fetch;
  /** One data point per attempt (src/lib/metrics.ts), and which invocation made it. */
  metrics?: Metrics;
  source?: MetricSource;
}

export interface DeliverySummary {
  attempted: number;
  delivered: number;
  failed: number;
  /** Events whose ladder ran out in this pass. */
  exhausted: number;
  stopped: number;
}

/**
 * How long a claim holds a page of `pageSize` events: the longest the page can take (its events go
 * out DELIVERY_CONCURRENCY at a time, each waiting up to the timeout) and a margin, so another pass
 * never claims an event this one has yet to send or record. (One attempt's timeout was too short: a
 * page of 100 at 15 s could run 4 minutes 15 s against a 45 s claim.)
 */
export function deliveryClaimMs(pageSize: number, timeoutMs: number): number {
  return Math.ceil(pageSize / DELIVERY_CONCURRENCY) * timeoutMs + CLAIM_MARGIN_MS;
}

/**
 * Delivers what is due as one stream: DELIVERY_CONCURRENCY lanes post events while the next page
 * is claimed ahead of them (each claim holds its events for as long as everything ahead of them
 * and the page itself can take, so a concurrent pass cannot send them too), and outcomes are
 * recorded a page at a time in the background. No lane waits for a page boundary. `onlyIds` limits
 * the pass to the events a change just wrote (the first attempt, from waitUntil). A failed claim or
 * record stops new sends; what was sent is still recorded, and what was claimed but not sent given
 * back, before the failure is rethrown.
 */
export async function deliverDueEvents(
  deps: DeliveryDeps,
  now: Date,
  options: { onlyIds?: number[]; max?: number } = {},
): Promise<DeliverySummary> {
  const summary: DeliverySummary = { attempted: 0, delivered: 0, failed: 0, exhausted: 0, stopped: 0 };
  const started = Date.now();
  const at = () => new Date(now.getTime() + (Date.now() - started));
  const max = options.max ?? DELIVERY_MAX_PER_RUN;
  const ready: { event: EventRow; awaitingConsent: boolean }[] = [];
  // Claimed and not yet taken by a lane: given back if the pass stops early (releaseClaims).
  const unsent = new Map<number, Date>();
  let claimedAll = false;
  let claiming: Promise<void> | undefined;
  let failure: { error: unknown } | undefined;
  let gone = false;
  const recorder = new OutcomeRecorder(deps.db);

  const claimPage = async () => {
    const limit = Math.min(DELIVERY_PAGE_SIZE, max - summary.attempted);
    // The events already waiting go out before this page does: the claim covers them too.
    const claimUntil = new Date(at().getTime() + deliveryClaimMs(ready.length + limit, deps.target.timeoutMs));
    const page = await claimDueEvents(deps.db, at(), claimUntil, limit, options.onlyIds);
    for (const event of page) unsent.set(event.id, claimUntil);
    summary.attempted += page.length;
    if (page.length < limit || options.onlyIds || summary.attempted >= max) claimedAll = true;
    const awaiting = await clientsAwaitingConsent(
      deps.db,
      page.filter((event) => event.type === "connection.needs_reauth").map((event) => event.clientId),
    );
    for (const event of page) ready.push({ event, awaitingConsent: awaiting.has(event.clientId) });
  };
  const next = async () => {
    for (;;) {
      if (gone || failure || recorder.failed) return undefined;
      // Claim ahead while half a page is still waiting, so lanes rarely wait on the database.
      if (!claiming && !claimedAll && ready.length < DELIVERY_PAGE_SIZE / 2) {
        claiming = claimPage()
          .catch((error) => {
            failure ??= { error };
          })
          .finally(() => {
            claiming = undefined;
          });
      }
      const item = ready.shift();
      if (item) return item;
      if (!claiming) return undefined;
      await claiming;
    }
  };
  const lanes = forEachLane(DELIVERY_CONCURRENCY, async () => {
    for (let item = await next(); item; item = await next()) {
      const { event, awaitingConsent } = item;
      const attemptAt = at();
      const body = JSON.stringify(await buildPayload(deps, event, awaitingConsent, attemptAt));
      // From here on the event is this pass's to record (sent, or its claim stands).
      unsent.delete(event.id);
      const sentAt = Date.now();
      const result = await sendWebhook(deps.target, webhookId(event.id), body, attemptAt, deps.fetcher);
      deps.metrics?.record(attemptMetric(event, result, Date.now() - sentAt, deps.source));
      const outcome = outcomeOf(event, result, at());
      if (outcome.state === "delivered") summary.delivered++;
      else if (outcome.state === "stopped") {
        summary.stopped++;
        // 410 Gone: the receiver asked for no more; no lane starts another attempt.
        gone = true;
      } else {
        summary.failed++;
        if (outcome.state === "failed") summary.exhausted++;
      }
      recorder.push(outcome);
    }
  }).catch((error) => {
    failure ??= { error };
  });
  await lanes;
  await claiming;
  const recorded = await recorder.drain();
  if ((failure || recorded) && !gone && unsent.size > 0) {
    // Stopped early: what was claimed and not sent is due again now, not when its claim ends (up to
    // minutes for a page), and keeps its attempt count. Best effort: the database may be what failed.
    try {
      const released = await releaseClaims(deps.db, unsent, at());
      summary.attempted -= released;
      logWarn("webhook_claims_released", { released, claimed_unsent: unsent.size });
    } catch (error) {
      logWarn("webhook_claims_not_released", { claimed_unsent: unsent.size, error: describeError(error) });
    }
  }
  if (gone) {
    // Every event waiting for this URL stops too (those claimed here and not sent included); they
    // stay in the log and can be redelivered once the receiver wants them again.
    summary.stopped += await stopPendingDeliveries(deps.db, "the receiver answered 410 Gone");
    logWarn("webhook_gone", { url_host: new URL(deps.target.url).host });
  }
  if (summary.attempted > 0) logInfo("webhook_delivery", { ...summary, duration_ms: Date.now() - started });
  if (failure) throw failure.error;
  if (recorded) throw recorded.error;
  return summary;
}

/**
 * Writes outcomes a page at a time, one write after the other, while the lanes go on sending. The
 * first failure is kept for the caller (the events stay claimed until their claim ends, then the
 * cron sends them again: at least once).
 */
class OutcomeRecorder {
  private pending: DeliveryOutcome[] = [];
  private chain: Promise<void> = Promise.resolve();
  private failure: { error: unknown } | undefined;

  constructor(private readonly db: Db) {}

  push(outcome: DeliveryOutcome): void {
    this.pending.push(outcome);
    if (this.pending.length >= DELIVERY_PAGE_SIZE) this.flush();
  }

  /** Whether a write failed (the pass then starts no new sends). */
  get failed(): boolean {
    return this.failure !== undefined;
  }

  async drain(): Promise<{ error: unknown } | undefined> {
    this.flush();
    await this.chain;
    return this.failure;
  }

  private flush(): void {
    const outcomes = this.pending.splice(0);
    if (outcomes.length === 0) return;
    this.chain = this.chain.then(() =>
      recordDeliveries(this.db, outcomes).catch((error) => {
        this.failure ??= { error };
      }),
    );
  }
}

/** The data point of one attempt (event.attempts counts the attempts before this one). */
export function attemptMetric(
  event: EventRow,
  result: AttemptResult,
  latencyMs: number,
  source: MetricSource = "request",
): MetricPoint {
  return {
    kind: "webhook",
    outcome: result.kind,
    failureClass: result.kind === "failed" ? result.failureClass : result.kind === "gone" ? "gone" : undefined,
    source,
    latencyMs,
    // The claim counted this attempt already.
    attempt: event.attempts,
    // The grant the change happened to, when it was one (the sampling index).
    grant: event.grantId ?? undefined,
  };
}

function outcomeOf(event: EventRow, result: AttemptResult, now: Date): DeliveryOutcome {
  const attempts = event.attempts;
  if (result.kind === "delivered")
    return { id: event.id, state: "delivered", attemptedAt: now, error: null, nextAttemptAt: null };
  if (result.kind === "gone") {
    return { id: event.id, state: "stopped", attemptedAt: now, error: "HTTP 410 Gone", nextAttemptAt: null };
  }
  const next = nextAttemptAfter(attempts, now);
  return next
    ? { id: event.id, state: "pending", attemptedAt: now, error: result.error, nextAttemptAt: next }
    : { id: event.id, state: "failed", attemptedAt: now, error: result.error, nextAttemptAt: null };
}

/** The delivery dependencies of an invocation, or undefined when no WEBHOOK_URL is configured. */
export function deliveryDeps(
  services: Services,
  requestBaseUrl?: string,
  source: MetricSource = "request",
): DeliveryDeps | undefined {
  const target = webhookTarget(services.config);
  if (!target) return undefined;
  return {
    metrics: services.metrics,
    source,
    db: services.db,
    keyring: services.keyring,
    target,
    baseUrl: services.config.PUBLIC_BASE_URL?.replace(/\/+$/, "") ?? requestBaseUrl,
    loginLinkTtlSeconds: services.config.LOGIN_LINK_TTL_SECONDS,
  };
}

/**
 * The first attempt, right after an invocation's changes committed (from waitUntil, so it never
 * delays the response). Never throws: what it cannot deliver stays pending for the cron.
 */
export async function deliverAfterChange(services: Services, now: Date, requestBaseUrl?: string): Promise<void> {
  const onlyIds = [...new Set(services.events.written)];
  const deps = onlyIds.length > 0 ? deliveryDeps(services, requestBaseUrl) : undefined;
  if (!deps) return;
  try {
    await deliverDueEvents(deps, now, { onlyIds });
  } catch (error) {
    logWarn("webhook_delivery_failed", { error: describeError(error) });
  }
}

/** One bounded delivery pass over what is due. Never throws. */
export async function deliverPending(services: Services, now: Date, requestBaseUrl?: string): Promise<void> {
  const deps = deliveryDeps(services, requestBaseUrl, "queue");
  if (!deps) return;
  try {
    await deliverDueEvents(deps, now, { max: DELIVERY_PAGE_SIZE });
  } catch (error) {
    logWarn("webhook_delivery_failed", { error: describeError(error) });
  }
}

export interface EventCronSummary extends DeliverySummary {
  pruned: number;
  /** Received Security Event Tokens forgotten (src/services/risc.ts). */
  securityEventsPruned: number;
}

/** The cron's share: retry what is due (bounded), then prune what is past retention (bounded). */
export async function runScheduledEvents(services: Services, now: Date): Promise<EventCronSummary> {
  const deps = deliveryDeps(services, undefined, "cron");
  const delivered = deps
    ? await deliverDueEvents(deps, now)
    : { attempted: 0, delivered: 0, failed: 0, exhausted: 0, stopped: 0 };
  const pruned = await pruneEvents(services.db, now, services.config.EVENT_RETENTION_DAYS);
  if (pruned > 0) logInfo("events_pruned", { pruned });
  const securityEventsPruned = await pruneSecurityEvents(services.db, now);
  if (securityEventsPruned > 0) logInfo("security_events_pruned", { pruned: securityEventsPruned });
  return { ...delivered, pruned, securityEventsPruned };
}
