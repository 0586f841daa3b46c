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
/** How long a refresh lease lasts; a crashed holder blocks others at most this long. */
export const LEASE_SECONDS = 30;

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
