import { inArray, sql } from "drizzle-orm";
import type { Services } from "../context";
import type { Db } from "../db/client";
import { apps, securityEvents } from "../db/schema";
import { logInfo, logWarn } from "../lib/log";
import {
  IAT_FUTURE_SKEW_SECONDS,
  MAX_SET_AGE_SECONDS,
  RISC_TYPE_OF_KIND,
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

/**
 * A received jti is kept until a redelivery of its token would be refused for its age anyway (iat
 * older than MAX_SET_AGE_SECONDS, with the future skew), plus a day: about 8 days.
 */
export const SECURITY_EVENT_RETENTION_SECONDS = MAX_SET_AGE_SECONDS + IAT_FUTURE_SKEW_SECONDS + 24 * 60 * 60;
const PRUNE_BATCH_SIZE = 1_000;
const PRUNE_MAX_BATCHES = 10;

export interface Received {
  token: SecurityEventToken;
  /** The app client id the token was addressed to. */
  audience: string;
}

export interface Receipt extends Received {
  /** The jti was already recorded: nothing was done this time. */
  duplicate: boolean;
}

/** Validates a pushed token and acts on it once. Throws SetRejected or RiscKeysUnavailable. */
export async function receiveSecurityEvent(deps: RiscDeps, jwt: string, now: Date): Promise<Receipt> {
  const received = await validateSecurityEvent(deps, jwt, now);
  const duplicate = await record(deps.db, received, now);
  if (duplicate) {
    logInfo("risc_event_redelivered", { jti: received.token.jti, audience: received.audience });
  } else {
    for (const event of received.token.events) logEvent(received, event);
  }
  return { ...received, duplicate };
}

/**
 * Records the jti; true when it was already there (a redelivery). The statements that act on the
 * events go in the same batch, guarded by this delivery's receipt, so they run only for the
 * delivery whose row was inserted, and not at all when the record fails.
 */
async function record(db: Db, received: Received, now: Date): Promise<boolean> {
  const { token } = received;
  const receipt = crypto.randomUUID();
  const verification = token.events.find((event) => event.kind === "verification");
  const inserted = await db
    .insert(securityEvents)
    .values({
      issuer: token.iss,
      jti: token.jti,
      audience: received.audience,
      eventTypes: token.events.map(eventTypeOf).join(" "),
      verificationState: verification?.kind === "verification" ? verification.state : null,
      issuedAt: token.issuedAt,
      receivedAt: now,
      receipt,
    })
    .onConflictDoNothing()
    .returning({ jti: securityEvents.jti });
  return inserted.length === 0;
}

/** When the verification event carrying `state` arrived, or null (what `npm run risc:verify` waits for). */
export async function verificationReceivedAt(db: Db, state: string): Promise<Date | null> {
  const rows = await db
    .select({ receivedAt: securityEvents.receivedAt })
    .from(securityEvents)
    .where(sql`${securityEvents.verificationState} = ${state}`)
    .limit(1);
  return rows[0]?.receivedAt ?? null;
}

/** The cron's share: forgets jtis past SECURITY_EVENT_RETENTION_SECONDS (bounded per run). */
export async function pruneSecurityEvents(db: Db, now: Date): Promise<number> {
  const cutoff = new Date(now.getTime() - SECURITY_EVENT_RETENTION_SECONDS * 1000);
  let pruned = 0;
  for (let batch = 0; batch < PRUNE_MAX_BATCHES; batch++) {
    const deleted = await db.execute<{ jti: string }>(sql`
      delete from ${securityEvents}
      where (${securityEvents.issuer}, ${securityEvents.jti}) in (
        select ${securityEvents.issuer}, ${securityEvents.jti} from ${securityEvents}
        where ${securityEvents.issuedAt} < ${cutoff}
        limit ${PRUNE_BATCH_SIZE}
      )
      returning ${securityEvents.jti}`);
    pruned += deleted.rows.length;
    if (deleted.rows.length < PRUNE_BATCH_SIZE) break;
  }
  return pruned;
}

function eventTypeOf(event: RiscEvent): string {
  return event.kind === "unknown" ? event.type : RISC_TYPE_OF_KIND[event.kind];
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
    .select({ clientId: apps.clientId })
    .from(apps)
    .where(inArray(apps.clientId, audiences))
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
