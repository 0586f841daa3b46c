import { and, eq, inArray, isNotNull, isNull, ne, type SQL, sql } from "drizzle-orm";
import type { BatchItem } from "drizzle-orm/batch";
import type { Services } from "../context";
import type { Db } from "../db/client";
import { apps, clients, events, securityEvents, tokens } from "../db/schema";
import { logInfo, logWarn } from "../lib/log";
import { digestOfEventHash, prefixDigestOf } from "../lib/token-digest";
import {
  IAT_FUTURE_SKEW_SECONDS,
  MAX_SET_AGE_SECONDS,
  type OAuthTokenSubject,
  RISC_TYPE_OF_KIND,
  type RiscEvent,
  readSetHeader,
  type SecurityEventToken,
  SetRejected,
  verifySecurityEventToken,
} from "../oauth/risc";
import { type RiscKeyStore, RiscKeysUnavailable, riscKeyStore } from "../oauth/risc-keys";
import {
  changedRows,
  type EventContext,
  noteEvents,
  tokenChangeReturning,
  tokenChangeWithEvents,
  writtenEventIds,
} from "./events";

/**
 * The Cross-Account Protection receiver: a Security Event Token pushed by Google is validated
 * (src/oauth/risc.ts, keys from src/oauth/risc-keys.ts), addressed to one of our apps, then acted on.
 * Whatever is wrong with a token is a SetRejected (400, nothing changes); keys that cannot be fetched
 * are a RiscKeysUnavailable (503: Google delivers again).
 */

export interface RiscDeps extends Pick<Services, "db" | "config"> {
  /** Where the effects' connection.* events go (the invocation's context). */
  events: EventContext;
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
  /** Branches whose grant the events changed: no location may keep serving their cached token. */
  branchIds: string[];
  /** Grants a sessions-revoked event asks to check with a refresh (through the queue). */
  grantsToCheck: number[];
}

/** Validates a pushed token and acts on it once. Throws SetRejected or RiscKeysUnavailable. */
export async function receiveSecurityEvent(deps: RiscDeps, jwt: string, now: Date): Promise<Receipt> {
  const received = await validateSecurityEvent(deps, jwt, now);
  const acted = await record(deps, received, now);
  if (acted === undefined) {
    logInfo("risc_event_redelivered", { jti: received.token.jti, audience: received.audience });
    return { ...received, duplicate: true, branchIds: [], grantsToCheck: [] };
  }
  for (const [index, event] of received.token.events.entries()) logEvent(received, event, acted.changed[index]);
  return { ...received, duplicate: false, branchIds: acted.branchIds, grantsToCheck: acted.grantsToCheck };
}

/** What one delivery's effects did. */
interface Acted {
  /** Per event of the token: grants changed, or undefined for an event that changes none by itself. */
  changed: (number | undefined)[];
  branchIds: string[];
  grantsToCheck: number[];
}

/**
 * Records the jti and acts on the events, in one batch (one transaction): undefined when the jti
 * was already there (a redelivery). The statements that act on the events are guarded by this
 * delivery's receipt, so they run only for the delivery whose row was inserted (of two concurrent
 * deliveries, the second waits for the first's insert and then finds another receipt), and not at
 * all when the record fails.
 */
async function record(deps: RiscDeps, received: Received, now: Date): Promise<Acted | undefined> {
  const { db } = deps;
  const { token } = received;
  const receipt = crypto.randomUUID();
  const verification = token.events.find((event) => event.kind === "verification");
  const insert = db
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
  const scope: EffectScope = {
    audiences: token.audiences,
    ours: sql`exists (select 1 from ${securityEvents} r
      where r.issuer = ${token.iss} and r.jti = ${token.jti} and r.receipt = ${receipt})`,
  };
  // Digests first: a statement must not pass through an async function (awaiting it would run it).
  const prefixDigests = await Promise.all(
    token.events.map((event) =>
      event.kind === "token-revoked" && event.subject.tokenIdentifierAlg === "prefix"
        ? prefixDigestOf(event.subject.token)
        : undefined,
    ),
  );
  const effects = token.events.map((event, index) => effectOf(deps, scope, event, prefixDigests[index], now));
  const statements = effects.filter((effect) => effect !== undefined);
  const [inserted, ...results] = (await db.batch([insert, ...statements] as [typeof insert, ...BatchItem<"pg">[]])) as [
    unknown[],
    ...unknown[],
  ];
  if (inserted.length === 0) return undefined;
  let next = 0;
  const changed = effects.map((effect) => {
    if (effect === undefined) return undefined;
    const result = results[next++];
    noteEvents(deps.events, result);
    return changedRows(result);
  });
  const eventIds = results.flatMap(writtenEventIds);
  return {
    changed,
    branchIds: await branchesOfEvents(db, eventIds),
    grantsToCheck: token.events.some((event) => event.kind === "sessions-revoked")
      ? await grantsOfAccounts(db, token.audiences, subjectsOf(token.events, "sessions-revoked"))
      : [],
  };
}

/** Where an event's effect applies: the grants of the token's apps, once this delivery's row is in. */
interface EffectScope {
  audiences: string[];
  /** True only in the batch of the delivery that recorded the jti. */
  ours: SQL;
}

/**
 * The reason written to the grant (`last_error`, which the console shows) and to its connection.*
 * events: a code, Google's fact in words, and when it arrived.
 */
export function riscReason(code: RiscReasonCode, words: string, now: Date): string {
  return `${code}: ${words} (Cross-Account Protection, ${now.toISOString()})`;
}

export type RiscReasonCode = "provider_revoked" | "account_disabled" | "account_enabled" | "credential_change_required";

/** The reason a grant is held for: the account-disabled event's `reason` that holds rather than ends it. */
export const HOLD_REASON = "hijacking";

function ofAccount(scope: EffectScope, subject: string): SQL {
  return and(
    sql`${tokens.appId} in (select a.id from ${apps} a where a.client_id in ${scope.audiences})`,
    eq(tokens.subject, subject),
    scope.ours,
  )!;
}

/** The statement acting on one event, or undefined for an event that changes no grant by itself. */
function effectOf(
  deps: RiscDeps,
  scope: EffectScope,
  event: RiscEvent,
  prefixDigest: string | undefined,
  now: Date,
): BatchItem<"pg"> | undefined {
  switch (event.kind) {
    case "tokens-revoked":
      return revoke(
        deps,
        ofAccount(scope, event.subject.sub),
        riscReason("provider_revoked", "the user removed access at Google", now),
        now,
      );
    case "token-revoked": {
      const match = tokenMatch(scope, event.subject, prefixDigest);
      return match && revoke(deps, match, riscReason("provider_revoked", "Google revoked its refresh token", now), now);
    }
    case "account-disabled":
      if (event.reason === HOLD_REASON) {
        return change(
          deps,
          and(ofAccount(scope, event.subject.sub), isNull(tokens.heldAt)),
          { heldAt: now, heldReason: HOLD_REASON, leaseOwner: null, leaseExpiresAt: null },
          riscReason("account_disabled", "Google disabled the account (hijacking); held until it is enabled", now),
          now,
        );
      }
      return endGrant(
        deps,
        ofAccount(scope, event.subject.sub),
        riscReason("account_disabled", `Google disabled the account${event.reason ? ` (${event.reason})` : ""}`, now),
        now,
      );
    case "account-enabled":
      return change(
        deps,
        and(ofAccount(scope, event.subject.sub), isNotNull(tokens.heldAt)),
        { heldAt: null, heldReason: null },
        riscReason("account_enabled", "Google enabled the account again", now),
        now,
      );
    case "account-credential-change-required":
      return endGrant(
        deps,
        ofAccount(scope, event.subject.sub),
        riscReason("credential_change_required", "Google requires the account to change its credentials", now),
        now,
      );
    case "sessions-revoked":
    case "verification":
    case "unknown":
      return undefined;
  }
}

type GrantChange = Partial<typeof tokens.$inferInsert>;

/** One statement: the grants' change, and one connection.* event per branch of each that transitioned. */
function change(deps: RiscDeps, where: SQL | undefined, values: GrantChange, reason: string, now: Date) {
  const update = deps.db.update(tokens).set(values).where(where).returning(tokenChangeReturning("keep"));
  return tokenChangeWithEvents(deps.db, deps.events, update, { rejected: "keep", reason }, now);
}

/** Revoked (not to be served or refreshed; a new consent connects again), unless it already was. */
function revoke(deps: RiscDeps, where: SQL, reason: string, now: Date) {
  return change(
    deps,
    and(where, ne(tokens.status, "revoked")),
    { isValid: false, status: "revoked", lastError: reason, leaseOwner: null, leaseExpiresAt: null },
    reason,
    now,
  );
}

/** needs_reauth, for a live grant (a revoked one stays revoked). */
function endGrant(deps: RiscDeps, where: SQL, reason: string, now: Date) {
  return change(
    deps,
    and(where, eq(tokens.status, "active")),
    { isValid: false, status: "needs_reauth", lastError: reason, leaseOwner: null, leaseExpiresAt: null },
    reason,
    now,
  );
}

/**
 * The grant whose current refresh token the event names, by the stored digests (nothing else is
 * kept of a token). A `prefix` (16 characters) acts only when exactly one grant of the apps has it:
 * revoking another account's grant on a collision would be worse than leaving this one to fail on
 * its next refresh. Access tokens are not tracked: an event about one matches nothing.
 */
function tokenMatch(scope: EffectScope, subject: OAuthTokenSubject, prefixDigest: string | undefined): SQL | undefined {
  if (subject.tokenType !== "refresh_token") return undefined;
  const inApps = sql`${tokens.appId} in (select a.id from ${apps} a where a.client_id in ${scope.audiences})`;
  if (subject.tokenIdentifierAlg === "hash_base64_sha512_sha512") {
    const digest = digestOfEventHash(subject.token);
    return digest === null ? undefined : and(inApps, eq(tokens.refreshTokenDigest, digest), scope.ours);
  }
  if (prefixDigest === undefined) return undefined;
  return and(
    inApps,
    eq(tokens.refreshTokenPrefixDigest, prefixDigest),
    sql`(select count(*) from ${tokens} m where m.app_id = ${tokens.appId}
      and m.refresh_token_prefix_digest = ${prefixDigest}) = 1`,
    scope.ours,
  );
}

/** The branches the events were written for (one per branch of each grant that transitioned). */
async function branchesOfEvents(db: Db, eventIds: number[]): Promise<string[]> {
  if (eventIds.length === 0) return [];
  const rows = await db.selectDistinct({ branchId: events.branchId }).from(events).where(inArray(events.id, eventIds));
  return rows.map((row) => row.branchId);
}

function subjectsOf(list: RiscEvent[], kind: "sessions-revoked"): string[] {
  return list.flatMap((event) => (event.kind === kind ? [event.subject.sub] : []));
}

/** The live grants of these accounts on the token's apps that some active branch is served from. */
async function grantsOfAccounts(db: Db, audiences: string[], subjects: string[]): Promise<number[]> {
  if (subjects.length === 0) return [];
  const rows = await db
    .select({ id: tokens.id })
    .from(tokens)
    .innerJoin(apps, eq(apps.id, tokens.appId))
    .where(
      and(
        inArray(apps.clientId, audiences),
        inArray(tokens.subject, subjects),
        eq(tokens.status, "active"),
        eq(tokens.isValid, true),
        isNull(tokens.heldAt),
        sql`exists (select 1 from ${clients} where ${clients.grantId} = ${tokens.id} and ${clients.isActive})`,
      ),
    );
  return rows.map((row) => row.id);
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

function logEvent(received: Received, event: RiscEvent, changed: number | undefined): void {
  const fields = { jti: received.token.jti, audience: received.audience };
  if (event.kind === "unknown") {
    logInfo("risc_event_unknown_type", { ...fields, type: event.type });
    return;
  }
  logInfo("risc_event_received", {
    ...fields,
    kind: event.kind,
    ...(changed === undefined ? {} : { grants: changed }),
  });
  // An account (or a token) this service does not know, or grants already in the event's state; a
  // token-revoked event about an access token, or with a hash that is no SHA-512 digest, matches nothing.
  if (changed === 0 || (changed === undefined && event.kind === "token-revoked")) {
    logInfo("risc_event_changed_nothing", { ...fields, kind: event.kind });
  }
}

export { RiscKeysUnavailable, SetRejected };
