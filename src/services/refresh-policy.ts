import type { TokenRow } from "../db/schema";
import type { IssuedTokens } from "../oauth/provider";

/**
 * Pure rules of when to refresh and how long to back off. No I/O: every function takes `now`.
 */

/** A token whose whole lifetime is shorter than the refresh-ahead window is refreshed when this share of it is left. */
export const SHORT_LIFETIME_REFRESH_FRACTION = 0.5;
/** A token with less than this left is not handed out: the caller could not use it in time. */
export const MIN_SERVE_REMAINING_SECONDS = 5;
export const BACKOFF_BASE_SECONDS = 30;
export const BACKOFF_MAX_SECONDS = 60 * 60;
/**
 * What a refresh lease must outlive besides the provider call (which OAUTH_TIMEOUT_MS bounds):
 * sealing the result and writing it with its retries (PERSIST_ATTEMPTS, about 0.7 s of backoff
 * plus four round trips), and the cron's group commit (FLUSH_INTERVAL_MS).
 */
export const LEASE_WRITE_ALLOWANCE_MS = 5_000;

/**
 * A lease is taken just before the provider call and expires this long after the database's clock
 * at the claim, so a holder that is still within its timeout always holds it; a crashed holder
 * blocks others at most this long.
 */
export function leaseMsFor(oauthTimeoutMs: number): number {
  return oauthTimeoutMs + LEASE_WRITE_ALLOWANCE_MS;
}

/** A request waiting on another's refresh re-reads after this, doubling up to WAIT_MAX_POLL_MS. */
export const WAIT_FIRST_POLL_MS = 50;
export const WAIT_MAX_POLL_MS = 1_000;

/** The pause before the n-th re-read (0-based) while waiting on another's refresh. */
export function waitPollMs(n: number): number {
  return Math.min(WAIT_FIRST_POLL_MS * 2 ** n, WAIT_MAX_POLL_MS);
}

/** Seconds before expiry at which this token should be refreshed. */
export function refreshWindowSeconds(lifetimeSeconds: number | null, refreshAheadSeconds: number): number {
  if (lifetimeSeconds !== null && lifetimeSeconds > 0 && lifetimeSeconds <= refreshAheadSeconds) {
    return lifetimeSeconds * SHORT_LIFETIME_REFRESH_FRACTION;
  }
  return refreshAheadSeconds;
}

export function secondsLeft(token: Pick<TokenRow, "expiresAt">, now: Date): number {
  return (token.expiresAt.getTime() - now.getTime()) / 1000;
}

export function needsRefresh(
  token: Pick<TokenRow, "expiresAt" | "lifetimeSeconds">,
  now: Date,
  refreshAheadSeconds: number,
): boolean {
  return secondsLeft(token, now) <= refreshWindowSeconds(token.lifetimeSeconds, refreshAheadSeconds);
}

/** Still worth handing out even though a refresh is due (or failed). */
export function isServable(token: Pick<TokenRow, "expiresAt">, now: Date): boolean {
  return secondsLeft(token, now) > MIN_SERVE_REMAINING_SECONDS;
}

/** Exponential backoff after the n-th consecutive transient failure, at least what the provider asked for. */
export function nextAttemptAt(failureCount: number, now: Date, retryAfterSeconds?: number): Date {
  const exponential = Math.min(BACKOFF_BASE_SECONDS * 2 ** Math.max(0, failureCount - 1), BACKOFF_MAX_SECONDS);
  const seconds = Math.max(exponential, Math.min(retryAfterSeconds ?? 0, BACKOFF_MAX_SECONDS));
  return new Date(now.getTime() + seconds * 1000);
}

export function inBackoff(token: Pick<TokenRow, "nextAttemptAt">, now: Date): boolean {
  return token.nextAttemptAt !== null && token.nextAttemptAt.getTime() > now.getTime();
}

/** Without `expires_in` the provider promises nothing: assume an hour, Google's lifetime. */
export const DEFAULT_ACCESS_TOKEN_LIFETIME_SECONDS = 60 * 60;

export function expiryOf(issued: IssuedTokens, requestSentAt: Date): Date {
  return new Date(requestSentAt.getTime() + lifetimeOf(issued) * 1000);
}

export function lifetimeOf(issued: IssuedTokens): number {
  return issued.expiresIn ?? DEFAULT_ACCESS_TOKEN_LIFETIME_SECONDS;
}
