import { createMiddleware } from "hono/factory";
import type { AppEnv } from "../context";
import { AppError } from "../errors";
import { matchesEach } from "../lib/crypto";
import { AUTH_FAILURE_PERIOD_SECONDS, addressBlocked, clientAddress, recordFailure } from "../lib/rate-limit";

export type KeyRole = "admin" | "service";

const CHALLENGE = { "WWW-Authenticate": 'Bearer realm="token-management"' };

/**
 * API keys come as `Authorization: Bearer <key>` (or `X-API-Key`). The admin key opens every
 * route; the service key opens only service routes (reading tokens). A key that is not valid counts
 * against its client address's failure limit (src/lib/rate-limit.ts).
 */
export function requireKey(role: KeyRole) {
  return createMiddleware<AppEnv>(async (c, next) => {
    const presented = presentedKey(c.req.raw);
    if (!presented) {
      throw new AppError("unauthorized", "An API key is required (Authorization: Bearer <key>).", {
        headers: CHALLENGE,
      });
    }
    const address = clientAddress(c.req.raw);
    if (addressBlocked(address, Date.now())) throw tooManyFailures();
    const { ADMIN_API_KEY, SERVICE_API_KEY } = c.get("config");
    const [admin, service] = await matchesEach(presented, ADMIN_API_KEY, SERVICE_API_KEY);
    if (admin) return next();
    if (service) {
      if (role === "service") return next();
      throw new AppError("forbidden", "This route needs the admin API key; the service key cannot use it.");
    }
    if (await recordFailure(c.env.AUTH_FAILURES, address, Date.now())) throw tooManyFailures();
    throw new AppError("unauthorized", "The API key is not valid.", {
      headers: { "WWW-Authenticate": 'Bearer realm="token-management", error="invalid_token"' },
    });
  });
}

function tooManyFailures(): AppError {
  return new AppError(
    "rate_limited",
    "Too many requests with a key that is not valid came from your address: wait and try again.",
    {
      retryAfterSeconds: AUTH_FAILURE_PERIOD_SECONDS,
    },
  );
}

/** The API key a request presents, if any. */
export function presentedKey(request: Request): string | undefined {
  return bearer(request.headers.get("authorization") ?? undefined) ?? request.headers.get("x-api-key") ?? undefined;
}

function bearer(header: string | undefined): string | undefined {
  const match = header ? /^Bearer\s+(\S+)\s*$/i.exec(header) : null;
  return match?.[1];
}
