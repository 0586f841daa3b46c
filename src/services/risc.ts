import { inArray } from "drizzle-orm";
import type { Services } from "../context";
import type { Db } from "../db/client";
import { clients } from "../db/schema";
import { logInfo, logWarn } from "../lib/log";
import {
  type RiscEvent,
  readSetHeader,
  type SecurityEventToken,
  SetRejected,
  verifySecurityEventToken,
} from "../oauth/risc";
import { type RiscKeyStore, RiscKeysUnavailable, riscKeyStore } from "../oauth/risc-keys";

/**
 * The Cross-Account Protection receiver: a Security Event Token pushed by Google is validated
 * (src/oauth/risc.ts, keys from src/oauth/risc-keys.ts), addressed to one of our apps, then acted on.
 * Whatever is wrong with a token is a SetRejected (400, nothing changes); keys that cannot be fetched
 * are a RiscKeysUnavailable (503: Google delivers again).
 */

export interface RiscDeps extends Pick<Services, "db" | "config"> {
  keys?: RiscKeyStore;
  fetch?: typeof fetch;
}

export interface Received {
  token: SecurityEventToken;
  /** The app client id the token was addressed to. */
  audience: string;
}

/** Validates a pushed token and acts on it. Throws SetRejected or RiscKeysUnavailable. */
export async function receiveSecurityEvent(deps: RiscDeps, jwt: string, now: Date): Promise<Received> {
  const received = await validateSecurityEvent(deps, jwt, now);
  for (const event of received.token.events) logEvent(received, event);
  return received;
}

export async function validateSecurityEvent(deps: RiscDeps, jwt: string, now: Date): Promise<Received> {
  const { kid } = readSetHeader(jwt);
  const store = deps.keys ?? riscKeyStore;
  const lookup = await store.lookup(deps.config.RISC_CONFIGURATION_URL, kid, now, {
    fetch: deps.fetch ?? fetch,
    timeoutMs: deps.config.OAUTH_TIMEOUT_MS,
    allowInsecureHttp: deps.config.OAUTH_ALLOW_INSECURE_HTTP,
  });
  if (lookup.staleBecause) logWarn("risc_keys_stale", { error: lookup.staleBecause });
  if (!lookup.key) throw new SetRejected("invalid_key", "The token's kid is not one of the transmitter's keys.");
  const token = await verifySecurityEventToken(jwt, lookup.key, { issuer: lookup.issuer, now });
  // Only a correctly signed token reaches the database.
  const audience = await knownAudience(deps.db, token.audiences);
  if (audience === undefined)
    throw new SetRejected("invalid_audience", "The token is not addressed to a client id of this service.");
  return { token, audience };
}

/** The first of the token's audiences that is an app's client id. */
async function knownAudience(db: Db, audiences: string[]): Promise<string | undefined> {
  const rows = await db
    .select({ clientId: clients.clientId })
    .from(clients)
    .where(inArray(clients.clientId, audiences))
    .limit(1);
  return rows[0]?.clientId ?? undefined;
}

function logEvent(received: Received, event: RiscEvent): void {
  const fields = { jti: received.token.jti, audience: received.audience };
  if (event.kind === "unknown") {
    logInfo("risc_event_unknown_type", { ...fields, type: event.type });
    return;
  }
  logInfo("risc_event_received", { ...fields, kind: event.kind });
}

export { RiscKeysUnavailable, SetRejected };
