/**
 * Failed credential checks (an API key that is not valid, a console sign-in with a wrong key) are
 * rate limited per client address with a Workers rate-limiting binding (`[[ratelimits]]`
 * AUTH_FAILURES in wrangler.toml: AUTH_FAILURE_LIMIT per AUTH_FAILURE_PERIOD_SECONDS).
 *
 * Only failures count, so a caller with a valid key is never slowed however busy it is. Once an
 * address is over the limit, the isolate that saw it refuses every key that address presents, valid
 * or not, until the period ends: a guess that happens to be right is not told apart from the 429s.
 * The binding's counters are per Cloudflare location and eventually consistent (its documentation
 * says so): this bounds guessing and noise, it is not an exact quota.
 *
 * The client address is `CF-Connecting-IP`, which Cloudflare sets on every request it forwards
 * (a client cannot choose it). A request without it (only outside Cloudflare's edge, e.g. a test
 * calling the handler directly) is not limited.
 */

/** What the binding offers (Workers' `RateLimit`). */
export interface FailureLimiter {
  limit(options: { key: string }): Promise<{ success: boolean }>;
}

/** wrangler.toml's [[ratelimits]] AUTH_FAILURES `simple` setting, repeated for Retry-After and the README. */
export const AUTH_FAILURE_LIMIT = 20;
export const AUTH_FAILURE_PERIOD_SECONDS = 60;
/** Addresses held back in one isolate at most (the oldest are forgotten first). */
const MAX_BLOCKED_ADDRESSES = 10_000;

const blockedUntil = new Map<string, number>();

export function clientAddress(request: Request): string | undefined {
  return request.headers.get("cf-connecting-ip")?.trim() || undefined;
}

/** Whether this isolate holds `address` back (it went over its limit less than a period ago). */
export function addressBlocked(address: string | undefined, nowMs: number): boolean {
  if (address === undefined) return false;
  const until = blockedUntil.get(address);
  if (until === undefined) return false;
  if (until > nowMs) return true;
  blockedUntil.delete(address);
  return false;
}

/**
 * Counts one failed check by `address`. True when the address is now over its limit (it is then
 * held back in this isolate for a period). A limiter that is missing or fails lets the request
 * through: rate limiting must not turn a binding outage into an outage of the API.
 */
export async function recordFailure(
  limiter: FailureLimiter | undefined,
  address: string | undefined,
  nowMs: number,
): Promise<boolean> {
  if (!limiter || address === undefined) return false;
  let allowed = true;
  try {
    allowed = (await limiter.limit({ key: address })).success;
  } catch {
    return false;
  }
  if (allowed) return false;
  if (blockedUntil.size >= MAX_BLOCKED_ADDRESSES) blockedUntil.delete(blockedUntil.keys().next().value!);
  blockedUntil.set(address, nowMs + AUTH_FAILURE_PERIOD_SECONDS * 1000);
  return true;
}
