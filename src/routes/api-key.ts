import { createMiddleware } from "hono/factory";
import type { AppEnv } from "../context";
import type { Config } from "../env";
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
    // The common case, and all that fastTokenRead (src/app.ts) lets through on its own.
    if (knownKeyAdmits(c.req.raw, c.get("config"), role)) return next();
    const presented = presentedKey(c.req.raw);
    if (!presented) {
      throw new AppError("unauthorized", "An API key is required (Authorization: Bearer <key>).", {
        headers: CHALLENGE,
      });
    }
    const address = clientAddress(c.req.raw);
    if (addressBlocked(address, Date.now())) throw tooManyFailures();
    const roles = await keyRoles(c.get("config"), presented);
    if (allows(roles, role)) return next();
    if (roles[1]) {
      throw new AppError("forbidden", "This route needs the admin API key; the service key cannot use it.");
    }
    if (await recordFailure(c.env.AUTH_FAILURES, address, Date.now())) throw tooManyFailures();
    throw new AppError("unauthorized", "The API key is not valid.", {
      headers: { "WWW-Authenticate": 'Bearer realm="token-management", error="invalid_token"' },
    });
  });
}

/**
 * Whether a presented key is an admin key and a service key. A key is checked against the configured
 * ones by constant-time comparison of SHA-256 digests (src/lib/crypto.ts); once it has matched, the
 * isolate remembers it for that configuration, so the hot path (a service reading tokens with the same
 * key) pays the digest once per isolate, not per request. Only keys that matched are remembered (at
 * most MAX_REMEMBERED_KEYS, dropped with the configuration): a wrong key is always digested, counted
 * and rate limited.
 */
async function keyRoles(config: Config, presented: string): Promise<KeyRoles> {
  const known = rememberedRoles(config, presented);
  if (known) return known;
  const [admin = false, service = false] = await matchesEach(presented, config.ADMIN_API_KEY, config.SERVICE_API_KEY);
  if (admin || service) {
    let remembered = rememberedKeys.get(config);
    if (!remembered) {
      remembered = new Map();
      rememberedKeys.set(config, remembered);
    }
    if (remembered.size >= MAX_REMEMBERED_KEYS) remembered.clear();
    remembered.set(presented, [admin, service]);
  }
  return [admin, service];
}

/** Whether a presented key is an admin key and whether it is a service key. */
type KeyRoles = readonly [admin: boolean, service: boolean];

/** Configured keys seen valid, per configuration object (one per environment and isolate). */
const rememberedKeys = new WeakMap<Config, Map<string, KeyRoles>>();
const MAX_REMEMBERED_KEYS = 16;

function rememberedRoles(config: Config, presented: string): KeyRoles | undefined {
  return rememberedKeys.get(config)?.get(presented);
}

/** The admin key opens every route; the service key only service routes. */
function allows([admin, service]: KeyRoles, role: KeyRole): boolean {
  return admin || (service && role === "service");
}

/**
 * Whether the request presents a key this isolate has already seen valid for this configuration,
 * opening routes of `role`, from an address not held back: requireKey's first step, without a
 * digest. False says only "not known here": requireKey's full check then decides.
 */
export function knownKeyAdmits(request: Request, config: Config, role: KeyRole): boolean {
  const presented = presentedKey(request);
  if (presented === undefined || addressBlocked(clientAddress(request), Date.now())) return false;
  const known = rememberedRoles(config, presented);
  return known !== undefined && allows(known, role);
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
