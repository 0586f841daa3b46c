import { and, eq, isNull, lt, ne, or, type SQL, sql } from "drizzle-orm";
import type { BatchItem } from "drizzle-orm/batch";
import type { Db } from "../db/client";
import { leaseExpiry, leaseIsFree } from "../db/queries";
import { type AppRow, apps, type ClientRow, clients, type TokenRow, tokens } from "../db/schema";
import { AppError } from "../errors";
import { type Keyring, open, type SealedValueError, seal } from "../lib/crypto";
import { describeError, type LogFields, logError, logInfo, logWarn } from "../lib/log";
import { refreshTokenDigests } from "../lib/token-digest";
import type { Providers } from "../oauth/profiles";
import { type IssuedTokens, ProviderError, refreshGrant } from "../oauth/provider";
import { appCredentials, SEALED_VALUE_PARKED } from "./apps";
import { revokeGrant } from "./clients";
import {
  changedRows,
  DEGRADED_AFTER_FAILURES,
  type EventContext,
  noteEvents,
  tokenChangeReturning,
  tokenChangeWithEvents,
  writtenEventIds,
} from "./events";
import { testingSuspicion } from "./grants";
import { expiryOf, inBackoff, isServable, lifetimeOf, needsRefresh, nextAttemptAt, waitPollMs } from "./refresh-policy";

/**
 * Serving and refreshing tokens. A refresh is single-flight across isolates: the refresher holds a
 * lease on the token row, taken with one conditional UPDATE … RETURNING just before the provider
 * call and long enough to outlive it and the write; the others re-read (plain reads, growing
 * intervals) until the new token lands, or serve the current one while it is still good. Every
 * write of a result is conditional on the lease (see successStatement and failureStatements).
 */

export interface TokenDeps {
  db: Db;
  keyring: Keyring;
  providers: Providers;
  refreshAheadSeconds: number;
  /** How long a refresh lease lasts: leaseMsFor(OAUTH_TIMEOUT_MS); tests inject a shorter one. */
  leaseMs: number;
  /** Where work that must outlive the response goes (the request's waitUntil). */
  background: Background;
  /** Waiting between re-reads while another isolate refreshes; replaceable in tests. */
  sleep?: (ms: number) => Promise<void>;
  /** Where the result writes' events go (see events.ts): the invocation's context. */
  events: EventContext;
  /** One data point per provider refresh (a RefreshRecorder of src/lib/metrics.ts). */
  onRefreshOutcome?: (
    grant: { id: number; appId?: number | null },
    outcome: "refreshed" | "failed" | "dead",
    failureClass: string | undefined,
    latencyMs: number,
  ) => void;
}

/** Work that continues after the answer, and for how long it may. */
export interface Background {
  defer(task: Promise<unknown>): void;
  budgetMs: number;
}

/** The columns a token read needs: the hot path reads nothing else. */
export type ReadClient = Pick<ClientRow, "id" | "branchId" | "isActive" | "appId" | "providerResource"> & {
  /** The app's: the provider rejected its credentials. */
  credentialsRejectedAt: Date | null;
};
export type ReadToken = Pick<
  TokenRow,
  | "id"
  | "clientId"
  | "refreshTokenExpiresAt"
  | "accessToken"
  | "tokenType"
  | "scope"
  | "expiresAt"
  | "lifetimeSeconds"
  | "isValid"
  | "status"
  | "nextAttemptAt"
  | "heldAt"
>;

export interface ServedToken {
  client: ReadClient;
  token: ReadToken;
  accessToken: string;
  refreshed: boolean;
}

/** A rotated refresh token exists nowhere else: its write is retried this many times at once… */
export const PERSIST_ATTEMPTS = 4;
const PERSIST_RETRY_BASE_MS = 100;
/** …then in the background, pausing this long first, doubling up to the maximum. */
export const BACKGROUND_FIRST_RETRY_MS = 500;
export const BACKGROUND_MAX_RETRY_MS = 4_000;
/**
 * A Worker's waitUntil keeps running for up to 30 s after the response is sent; background work
 * after a request stops short of that.
 */
export const REQUEST_BACKGROUND_BUDGET_MS = 25_000;

const defaultSleep = (ms: number) => new Promise<void>((resolve) => setTimeout(resolve, ms));

/** GET /tokens/{branch_id}: one database round trip when the token is fresh. */
export async function getBranchToken(deps: TokenDeps, branchId: string, now: Date): Promise<ServedToken> {
  const { client, token } = requireGrant(await findForRead(deps.db, { branchId }), branchId);
  if (!needsRefresh(token, now, deps.refreshAheadSeconds)) return serve(deps, client, token, false);
  return refreshOrServe(deps, client, token, now, false);
}

/**
 * POST /tokens/refresh: refresh now, whatever the expiry and backoff say (still single-flight).
 * With `rejected` (an access token the provider's API refused), a servable token that has replaced
 * it since is served as it is: someone else's refresh already answered the rejection.
 */
export async function forceRefresh(
  deps: TokenDeps,
  target: { clientId: number } | { branchId: string },
  now: Date,
  options: { rejected?: string } = {},
): Promise<ServedToken> {
  const found = await findForRead(deps.db, target);
  const { client, token } = requireGrant(found, "branchId" in target ? target.branchId : `client ${target.clientId}`);
  if (options.rejected !== undefined && isServable(token, now)) {
    const current = await serve(deps, client, token, false);
    if (current.accessToken !== options.rejected) return current;
  }
  return refreshOrServe(deps, client, token, now, true);
}

/**
 * DELETE /tokens/{branch_id}: revokes the branch's grant at the provider (best effort; at Google
 * that ends the account's whole authorization of the app) and marks it revoked, with
 * `connection.revoked` for every branch served from it in the same statement (none when it already
 * was). Returns those branches: none of them may be served the grant's token any more.
 */
export async function revokeBranchToken(
  deps: Pick<TokenDeps, "db" | "keyring" | "providers" | "events">,
  branchId: string,
  now: Date,
): Promise<{ client: ClientRow; revokedAtProvider: boolean; branchIds: string[] }> {
  const [found] = await deps.db
    .select({ client: clients, token: tokens, app: apps })
    .from(clients)
    .leftJoin(tokens, eq(tokens.id, clients.grantId))
    .leftJoin(apps, eq(apps.id, clients.appId))
    .where(eq(clients.branchId, branchId));
  if (!found?.client) throw new AppError("not_found", `No client is registered for branch ${branchId}.`);
  const { client, token, app } = found;
  if (!token) throw new AppError("not_found", `Branch ${branchId} has no token to revoke.`);
  let revokedAtProvider = false;
  if (token.isValid && app) {
    try {
      await revokeGrant(deps.keyring, deps.providers.of(app), await appCredentials(deps.keyring, app), token);
      revokedAtProvider = true;
    } catch (error) {
      logWarn("revocation_failed", { client: client.id, grant: token.id, error: describeError(error) });
    }
  }
  const result = await tokenChangeWithEvents(
    deps.db,
    deps.events,
    deps.db
      .update(tokens)
      .set({ isValid: false, status: "revoked", leaseOwner: null, leaseExpiresAt: null })
      // Not already revoked: of concurrent revocations the first writes the row and the events (a
      // later one, having waited for its lock, finds it revoked and changes nothing).
      .where(and(eq(tokens.id, token.id), ne(tokens.status, "revoked")))
      .returning(tokenChangeReturning("keep")),
    {
      rejected: "keep",
      reason: `revoked by an administrator${revokedAtProvider ? "" : "; the provider could not be reached or had nothing to revoke"}`,
    },
    now,
  );
  noteEvents(deps.events, result);
  const sharing = await deps.db
    .select({ branchId: clients.branchId })
    .from(clients)
    .where(eq(clients.grantId, token.id));
  return { client, revokedAtProvider, branchIds: [...new Set([branchId, ...sharing.map((row) => row.branchId)])] };
}

interface Found {
  client: ReadClient | undefined;
  token: ReadToken | null;
}

export type ReadKey = { branchId: string } | { clientId: number };

/**
 * The token read's query, the hot path: written out once rather than built by drizzle on every
 * request (building cost more CPU than the rest of the read), and answered as one JSON array so the
 * database, the protocol and the driver carry one column instead of thirteen. The latest token
 * comes from a LATERAL subquery over the (client_id, id) index.
 */
const READ_SELECT = `select json_build_array(
    c.id, c.branch_id, c.is_active, a.credentials_rejected_at,
    t.id, t.access_token, t.token_type, t.scope, t.expires_at, t.lifetime_seconds, t.is_valid, t.status, t.next_attempt_at,
    t.client_id, t.refresh_token_expires_at, c.app_id, c.provider_resource, t.held_at
  ) as row
  from clients c
  left join apps a on a.id = c.app_id
  left join tokens t on t.id = c.grant_id`;
const READ_BY_BRANCH = sql.raw(`${READ_SELECT} where c.branch_id = `);
const READ_BY_CLIENT = sql.raw(`${READ_SELECT} where c.id = `);

type ReadRow = [
  number,
  string,
  boolean,
  string | null,
  number | null,
  string | null,
  string | null,
  string | null,
  string | null,
  number | null,
  boolean | null,
  ReadToken["status"] | null,
  string | null,
  number | null,
  string | null,
  number | null,
  string | null,
  string | null,
];

/** One query: the client's identity and state, and its latest token's serving columns. */
export async function findForRead(db: Db, key: ReadKey): Promise<Found> {
  const query = "branchId" in key ? sql`${READ_BY_BRANCH}${key.branchId}` : sql`${READ_BY_CLIENT}${key.clientId}`;
  const result = await db.execute<{ row: ReadRow | string }>(query);
  const raw = result.rows[0]?.row;
  if (raw === undefined) return { client: undefined, token: null };
  const [
    clientId,
    branchId,
    isActive,
    rejectedAt,
    tokenId,
    accessToken,
    tokenType,
    scope,
    expiresAt,
    lifetime,
    isValid,
    status,
    nextAttempt,
    sealOwner,
    accessEnds,
    appId,
    providerResource,
    heldAt,
  ] = typeof raw === "string" ? (JSON.parse(raw) as ReadRow) : raw;
  const client: ReadClient = {
    id: clientId,
    branchId,
    isActive,
    appId,
    providerResource,
    credentialsRejectedAt: rejectedAt === null ? null : new Date(rejectedAt),
  };
  if (tokenId === null) return { client, token: null };
  return {
    client,
    token: {
      id: tokenId,
      clientId: sealOwner!,
      refreshTokenExpiresAt: accessEnds === null ? null : new Date(accessEnds),
      accessToken: accessToken!,
      tokenType: tokenType!,
      scope,
      expiresAt: new Date(expiresAt!),
      lifetimeSeconds: lifetime,
      isValid: isValid!,
      status: status!,
      nextAttemptAt: nextAttempt === null ? null : new Date(nextAttempt),
      heldAt: heldAt === null ? null : new Date(heldAt),
    },
  };
}

function requireGrant(found: Found, label: string): { client: ReadClient; token: ReadToken } {
  const { client, token } = found;
  if (!client?.isActive) throw new AppError("not_found", `No active client is registered for ${label}.`);
  if (!token) {
    throw new AppError(
      "not_connected",
      `Branch ${client.branchId} was never connected. Send its login link (GET /token-management/clients/${client.id}/login-url) to someone at the branch.`,
      { fields: connectionHint(client) },
    );
  }
  if (token.status === "revoked") {
    throw new AppError(
      "not_connected",
      `Branch ${client.branchId}'s token was revoked. Connect it again with a new login link.`,
      { fields: connectionHint(client) },
    );
  }
  if (token.heldAt) {
    throw new AppError(
      "account_disabled",
      `Google disabled the account behind branch ${client.branchId}'s grant (it may have been hijacked): its tokens are held until Google enables the account again.`,
      { fields: { client_id: client.id, branch_id: client.branchId, held_since: token.heldAt.toISOString() } },
    );
  }
  if (token.status === "needs_reauth" || !token.isValid) throw reauthorizationRequired(client);
  return { client, token };
}

/** Where an operator gets a new login link for the branch. */
function connectionHint(client: ReadClient) {
  return {
    client_id: client.id,
    branch_id: client.branchId,
    login_hint: `/token-management/clients/${client.id}/login-url`,
  };
}

function reauthorizationRequired(client: ReadClient): AppError {
  return new AppError(
    "reauthorization_required",
    `The provider no longer accepts branch ${client.branchId}'s grant. Someone at the branch must sign in again with a new login link.`,
    { fields: connectionHint(client) },
  );
}

async function refreshOrServe(
  deps: TokenDeps,
  client: ReadClient,
  seen: ReadToken,
  now: Date,
  force: boolean,
): Promise<ServedToken> {
  const started = Date.now();
  const at = () => new Date(now.getTime() + (Date.now() - started));
  const sleep = deps.sleep ?? defaultSleep;
  const owner = crypto.randomUUID();
  let current: ReadToken = seen;
  let polls = 0;
  if (accessEnded(current, at())) {
    if (isServable(current, at())) return serve(deps, client, current, false);
    throw new AppError(
      "reauthorization_required",
      `The account granted branch ${client.branchId}'s access for a limited time, and it ended. Someone at the branch must sign in again with a new login link.`,
      { fields: connectionHint(client) },
    );
  }
  for (;;) {
    if (!force) {
      const blocked = refreshBlocked(client, current, at());
      if (blocked) {
        if (isServable(current, at())) return serve(deps, client, current, false);
        throw blocked;
      }
    }
    // Even a forced refresh yields to one that completed since we read the token.
    const [leased] = await claimLeases(
      deps.db,
      and(
        eq(tokens.id, current.id),
        eq(tokens.isValid, true),
        eq(tokens.status, "active"),
        isNull(tokens.heldAt),
        // Nobody refreshed since we read it. The database keeps microseconds and JS dates keep
        // milliseconds, so compare against the next millisecond.
        lt(tokens.expiresAt, new Date(seen.expiresAt.getTime() + 1)),
      ),
      owner,
      deps.leaseMs,
    );
    if (leased) return refreshHeld(deps, client, leased, owner, at);

    // Someone else holds the lease, or refreshed since we looked: wait with plain reads, at
    // growing intervals, for its result; claim again if its lease ends without one.
    for (;;) {
      await sleep(waitPollMs(polls++));
      const latest = await readForWait(deps.db, current.id);
      if (latest?.token.status !== "active" || !latest.token.isValid || latest.token.heldAt) {
        requireGrant({ client, token: latest?.token ?? null }, client.branchId);
        throw reauthorizationRequired(client);
      }
      const { token, leaseFree } = latest;
      if (token.expiresAt.getTime() > seen.expiresAt.getTime()) return serve(deps, client, token, true);
      if (!force && isServable(token, at())) return serve(deps, client, token, false);
      current = token;
      const waitedMs = Date.now() - started;
      // A lease that ends without a new token: claim it (once more at most, past the bound).
      if (leaseFree && waitedMs <= 2 * deps.leaseMs) break;
      if (waitedMs > deps.leaseMs) {
        throw new AppError("provider_unavailable", "The token is being refreshed and no fresh token arrived in time.", {
          retryAfterSeconds: 1,
        });
      }
    }
  }
}

/** Time-limited access that has ended: no refresh can succeed, so none is attempted. */
function accessEnded(token: Pick<ReadToken, "refreshTokenExpiresAt">, now: Date): boolean {
  return token.refreshTokenExpiresAt !== null && token.refreshTokenExpiresAt.getTime() <= now.getTime();
}

/** Why an automatic refresh must not be attempted now, if it must not. */
function refreshBlocked(client: ReadClient, token: Pick<TokenRow, "nextAttemptAt">, now: Date): AppError | undefined {
  if (client.credentialsRejectedAt) {
    return new AppError(
      "client_credentials_rejected",
      `The provider rejected the client credentials of branch ${client.branchId}'s app. An administrator must update the app's client secret (PATCH /token-management/apps/${client.appId}).`,
      { fields: { app_id: client.appId } },
    );
  }
  if (token.nextAttemptAt !== null && token.nextAttemptAt.getTime() >= PARKED_UNTIL.getTime()) {
    return new AppError(
      "sealed_value_unreadable",
      `A stored secret or token of branch ${client.branchId}'s grant cannot be opened (altered, copied from another row, or sealed with a key that is no longer configured), so it is no longer refreshed. To recover, set the app's client secret again (PATCH /token-management/apps/${client.appId}) or connect the branch again with a new login link (GET /token-management/clients/${client.id}/login-url).`,
      { fields: connectionHint(client) },
    );
  }
  if (inBackoff(token, now)) {
    return new AppError("provider_unavailable", "The provider is failing; the next refresh attempt is scheduled.", {
      retryAfterSeconds: Math.max(1, secondsLeftUntil(token.nextAttemptAt!, now)),
    });
  }
  return undefined;
}

function secondsLeftUntil(when: Date, now: Date): number {
  return Math.ceil((when.getTime() - now.getTime()) / 1000);
}

/**
 * Whether the row was still leased by someone else (a lapsed, unreleased lease), read from the
 * statement's snapshot. Renewing our own claim is no take-over.
 */
function tookOverFrom(owner: string) {
  return sql<boolean>`(select p.lease_owner is not null and p.lease_owner <> ${owner} from tokens p where p.id = ${tokens.id})`.mapWith(
    (value: unknown) => value === true || value === "t",
  );
}

/**
 * One statement: lease every token matching `condition` whose lease is free, for `leaseMs` from the
 * database's clock, and return each with its client's credentials. Callers claim only tokens whose
 * provider call starts right away (or within a window the lease is lengthened by; see
 * src/services/scheduled.ts), so the lease outlives the call and the write of its result. With
 * `renewOwn`, rows this owner already leases (claimed ahead, call not started) are leased again.
 */
export async function claimLeases(
  db: Db,
  condition: SQL | undefined,
  owner: string,
  leaseMs: number,
  options: { renewOwn?: boolean } = {},
): Promise<Leased[]> {
  const claimable = options.renewOwn ? or(leaseIsFree(), eq(tokens.leaseOwner, owner)) : leaseIsFree();
  return db
    .update(tokens)
    .set({ leaseOwner: owner, leaseExpiresAt: leaseExpiry(leaseMs) })
    .from(apps)
    .where(and(eq(apps.id, tokens.appId), claimable, condition))
    .returning({
      token: tokens,
      app: {
        id: apps.id,
        profile: apps.profile,
        settings: apps.settings,
        clientId: apps.clientId,
        clientSecret: apps.clientSecret,
      },
      tookOver: tookOverFrom(owner),
    });
}

/** The leased grant row with its app (the secret still sealed). */
export interface Leased {
  token: TokenRow;
  app: Pick<AppRow, "id" | "profile" | "settings" | "clientId" | "clientSecret">;
  /**
   * The claim took over a lease that ran out without being released: its holder may still be
   * in flight, and may have rotated the refresh token we are about to use.
   */
  tookOver: boolean;
}

/** A lease held on a token row, and what every write of its result checks. */
export interface LeaseHold {
  tokenId: number;
  owner: string;
  /** The sealed refresh token the result is computed from: the result may only replace it. */
  usedRefreshToken: string | null;
  tookOver: boolean;
}

export function holdOf(leased: Leased, owner: string): LeaseHold {
  return {
    tokenId: leased.token.id,
    owner,
    usedRefreshToken: leased.token.refreshToken,
    tookOver: leased.tookOver,
  };
}

/** The row still carries the refresh token the result was computed from. */
function computedFrom(hold: LeaseHold) {
  return hold.usedRefreshToken === null ? isNull(tokens.refreshToken) : eq(tokens.refreshToken, hold.usedRefreshToken);
}

/** The row is leased by `hold` (whether or not the lease ran out: nobody took it over). */
function heldBy(hold: LeaseHold) {
  return and(eq(tokens.id, hold.tokenId), eq(tokens.leaseOwner, hold.owner), computedFrom(hold));
}

async function readForWait(db: Db, tokenId: number): Promise<{ token: TokenRow; leaseFree: boolean } | undefined> {
  const [row] = await db
    .select({
      token: tokens,
      leaseFree: sql<boolean>`(${leaseIsFree()})`.mapWith((value: unknown) => value === true || value === "t"),
    })
    .from(tokens)
    .where(eq(tokens.id, tokenId));
  return row;
}

async function readToken(db: Db, tokenId: number): Promise<TokenRow | undefined> {
  const [row] = await db.select().from(tokens).where(eq(tokens.id, tokenId));
  return row;
}

/** We hold the lease on `leased`: refresh at the provider and record the outcome. */
async function refreshHeld(
  deps: TokenDeps,
  client: ReadClient,
  leased: Leased,
  owner: string,
  at: () => Date,
): Promise<ServedToken> {
  const { token: row, app } = leased;
  const hold = holdOf(leased, owner);
  if (!row.refreshToken) {
    noteWritten(deps.events, await applyResult(deps.db, [recordDead(deps.db, deps.events, hold, at())]));
    throw reauthorizationRequired(client);
  }
  const sentAt = at();
  const callStarted = Date.now();
  let issued: IssuedTokens;
  try {
    issued = await refreshGrant(
      deps.providers.of(app),
      await appCredentials(deps.keyring, app),
      await open(deps.keyring, row.refreshToken, { column: "tokens.refresh_token", clientId: row.clientId }),
    );
  } catch (error) {
    if (!(error instanceof ProviderError)) {
      await releaseLease(deps.db, hold).catch(() => undefined);
      throw error;
    }
    deps.onRefreshOutcome?.(
      row,
      recordsDeadGrant(error, hold) ? "dead" : "failed",
      error.kind,
      Date.now() - callStarted,
    );
    return handleRefreshFailure(deps, client, row, hold, error, at());
  }
  deps.onRefreshOutcome?.(row, "refreshed", undefined, Date.now() - callStarted);
  const values = await refreshedValues(deps.keyring, row.clientId, issued, sentAt);
  const rotated = values.refreshToken !== undefined;
  const write: ResultWrite = [successStatement(deps.db, deps.events, hold, values)];
  const sleep = deps.sleep ?? defaultSleep;
  const written = await persistWithRetry(deps.db, write, sleep, { token: row.id, rotated });
  if (written) noteWritten(deps.events, written);
  if (written === undefined) {
    if (rotated) deps.background.defer(persistInBackground(deps.db, write, hold, deps.background.budgetMs, sleep));
    else {
      // Nothing is lost: the stored refresh token still works. The lease runs out by itself.
      logWarn("refreshed_token_not_persisted", { token: row.id, rotated });
    }
  } else if (!written.written) {
    logWarn("refresh_result_dropped", { token: row.id, outcome: "refreshed", rotated, reason: "superseded" });
  }
  logInfo("token_refreshed", { client: client.id, expires_in: lifetimeOf(issued), rotated });
  return { client, token: { ...row, ...values }, accessToken: issued.accessToken, refreshed: true };
}

export interface RefreshedValues {
  accessToken: string;
  refreshToken?: string;
  /** With a rotated refresh token: what a token-revoked event names it by (src/lib/token-digest.ts). */
  refreshTokenPrefixDigest?: string;
  refreshTokenDigest?: string;
  tokenType: string;
  scope: string | null;
  expiresAt: Date;
  lifetimeSeconds: number;
  lastRefreshedAt: Date;
  refreshTokenExpiresAt?: Date;
  failureCount: 0;
  lastError: null;
  nextAttemptAt: null;
}

/**
 * Column values after a successful refresh of a token of client `clientId` (the internal id the
 * sealed values are bound to). Expiry counts from when the request was sent.
 */
export async function refreshedValues(
  keyring: Keyring,
  clientId: number,
  issued: IssuedTokens,
  sentAt: Date,
): Promise<RefreshedValues> {
  const lifetime = lifetimeOf(issued);
  return {
    accessToken: await seal(keyring, issued.accessToken, { column: "tokens.access_token", clientId }),
    // No refresh token in the answer: keep the one we have (the column is left out of the update).
    ...(issued.refreshToken === undefined
      ? {}
      : {
          refreshToken: await seal(keyring, issued.refreshToken, { column: "tokens.refresh_token", clientId }),
          ...(await digestColumns(issued.refreshToken)),
        }),
    tokenType: issued.tokenType,
    scope: issued.scope ?? null,
    expiresAt: expiryOf(issued, sentAt),
    lifetimeSeconds: lifetime,
    lastRefreshedAt: sentAt,
    // Time-limited access: the provider says again how long the refresh token has left.
    ...(issued.refreshTokenExpiresIn === undefined
      ? {}
      : { refreshTokenExpiresAt: new Date(sentAt.getTime() + issued.refreshTokenExpiresIn * 1000) }),
    failureCount: 0,
    lastError: null,
    nextAttemptAt: null,
  };
}

async function digestColumns(refreshToken: string) {
  const { prefixDigest, digest } = await refreshTokenDigests(refreshToken);
  return { refreshTokenPrefixDigest: prefixDigest, refreshTokenDigest: digest };
}

/**
 * The statements that record one refresh result, run as one batch. The last one updates the token
 * row and writes the event of any transition (tokenChangeWithEvents, so the event lands under the
 * same lease condition as the result); a change of no row means the result was dropped (the lease
 * was lost), and then no event was written either.
 */
export type ResultWrite = [BatchItem<"pg">, ...BatchItem<"pg">[]];

/**
 * The write of a successful refresh. It lands only while the row still carries the refresh token
 * we refreshed with, and only for the lease holder, with one exception: a rotated refresh token
 * that replaces the very token it was issued for lands even after the lease was lost (and does
 * not touch the new holder's lease), because the provider already invalidated the stored one and
 * dropping the new one would kill the grant. Shared by the on-demand path, the cron and the queue.
 */
export function successStatement(db: Db, events: EventContext, hold: LeaseHold, values: RefreshedValues) {
  const held = eq(tokens.leaseOwner, hold.owner);
  const mayWrite =
    values.refreshToken === undefined ? held : or(held, and(eq(tokens.isValid, true), eq(tokens.status, "active")));
  // A success proves the credentials good: a rejected client's flag is cleared in the same
  // statement, and leaving degraded or credentials_rejected writes connection.recovered.
  const update = db
    .update(tokens)
    .set({
      ...values,
      leaseOwner: sql`nullif(${tokens.leaseOwner}, ${hold.owner})`,
      leaseExpiresAt: sql`case when ${held} then null else ${tokens.leaseExpiresAt} end`,
    })
    .where(and(eq(tokens.id, hold.tokenId), computedFrom(hold), mayWrite))
    .returning(tokenChangeReturning("clear"));
  return tokenChangeWithEvents(
    db,
    events,
    update,
    { rejected: "clear", reason: "a refresh succeeded again" },
    values.lastRefreshedAt,
  );
}

/**
 * The write that records a failed refresh, by kind of failure: a dead grant stops being current, a
 * transient failure schedules the next attempt, and `invalid_client` also flags the client (in the
 * same statement, only when the token row was written). It lands only for the lease holder and
 * while the row carries the refresh token that failed; a refresher that took over a lapsed lease
 * never records a dead grant (the previous holder may have rotated the token, so `invalid_grant`
 * proves nothing): it backs off instead, and the next clean attempt decides. Its event, if the
 * failure is a transition (needs_reauth, credentials_rejected, or the failure that makes the count
 * reach DEGRADED_AFTER_FAILURES), is written by the same statement. Shared by the on-demand path,
 * the cron and the queue.
 */
export function failureStatements(
  db: Db,
  events: EventContext,
  token: Pick<TokenRow, "clientId" | "failureCount">,
  hold: LeaseHold,
  error: ProviderError,
  now: Date,
): ResultWrite {
  const failureCount = token.failureCount + 1;
  const dead = recordsDeadGrant(error, hold);

  const lastError =
    error.kind === "invalid_grant" && !dead
      ? `${error.message} (after taking over a lapsed lease; confirmed on the next attempt)`
      : error.message;
  const common = { failureCount, lastError: lastError.slice(0, 500), leaseOwner: null, leaseExpiresAt: null };
  const values = dead
    ? { ...common, isValid: false, status: "needs_reauth" as const }
    : { ...common, nextAttemptAt: nextAttemptAt(failureCount, now, error.retryAfterSeconds) };
  const rejected = error.kind === "invalid_client" ? "set" : "keep";
  const reason =
    dead || error.kind === "invalid_client"
      ? lastError
      : `${failureCount} failed refreshes in a row; the last: ${lastError}`;
  const update = db.update(tokens).set(values).where(heldBy(hold)).returning(tokenChangeReturning(rejected));
  const change = tokenChangeWithEvents(db, events, update, { rejected, reason }, now);
  // A google grant dying about 7 days after its consent: its app is probably still in Testing.
  return dead ? [testingSuspicion(db, hold.tokenId, hold.owner, now), change] : [change];
}

/** Where a parked grant's next attempt is: never, until an operator fixes it. */
const PARKED_UNTIL = new Date("9999-12-31T00:00:00Z");

/**
 * The write when a stored secret or token of the grant does not open (altered, copied from another
 * row, or sealed with a key no longer configured): retrying cannot help, so the grant is parked
 * (no next attempt) and shows as degraded with its reason, one connection.degraded per branch.
 * Setting the app's secret again or a new consent clears it. Lands only for the lease holder.
 */
export function parkedStatements(db: Db, events: EventContext, hold: LeaseHold, error: SealedValueError, now: Date) {
  const what =
    error.binding.column === "clients.client_secret"
      ? `app ${error.binding.clientId}'s client secret`
      : error.binding.column;
  const lastError = `${SEALED_VALUE_PARKED}: ${what} does not open (altered, copied from another row, or sealed with a key no longer configured); set the app's client secret again or reconnect the branch`;
  const update = db
    .update(tokens)
    .set({
      failureCount: sql`greatest(${tokens.failureCount} + 1, ${DEGRADED_AFTER_FAILURES})`,
      lastError,
      nextAttemptAt: PARKED_UNTIL,
      leaseOwner: null,
      leaseExpiresAt: null,
    })
    .where(heldBy(hold))
    .returning(tokenChangeReturning("keep"));
  return [tokenChangeWithEvents(db, events, update, { rejected: "keep", reason: lastError }, now)] as ResultWrite;
}

/** Whether this failure, from this holder, is recorded as a dead grant. */
export function recordsDeadGrant(error: ProviderError, hold: Pick<LeaseHold, "tookOver">): boolean {
  return error.kind === "invalid_grant" && !hold.tookOver;
}

/** What a result's write did: whether the token row was written, and the events it wrote. */
export interface Applied {
  written: boolean;
  eventIds: number[];
}

/** Runs a result's statements (one batch, one round trip). */
export async function applyResult(db: Db, write: ResultWrite): Promise<Applied> {
  const results = (await db.batch(write)) as unknown[];
  return appliedOf(results.at(-1));
}

/** Reads the answer of a result's last statement (batched with others or not). */
export function appliedOf(result: unknown): Applied {
  return { written: changedRows(result) > 0, eventIds: writtenEventIds(result) };
}

/** Events written: the invocation makes their first delivery attempt. */
function noteWritten(events: EventContext, applied: Applied): void {
  events.written.push(...applied.eventIds);
}

async function persistWithRetry(
  db: Db,
  write: ResultWrite,
  sleep: (ms: number) => Promise<void>,
  fields: LogFields,
): Promise<Applied | undefined> {
  for (let attempt = 1; attempt <= PERSIST_ATTEMPTS; attempt++) {
    try {
      return await applyResult(db, write);
    } catch (error) {
      logWarn("refreshed_token_write_retry", { ...fields, attempt, error: describeError(error) });
      if (attempt < PERSIST_ATTEMPTS) await sleep(PERSIST_RETRY_BASE_MS * 2 ** (attempt - 1));
    }
  }
  return undefined;
}

export type BackgroundOutcome = "stored" | "dropped" | "lost";

/**
 * A rotated refresh token whose write failed exists only in memory: keep writing it, with growing
 * pauses, for as long as the invocation may run (`budgetMs`), then release the lease. If it never
 * lands, say so once, loudly: the stored refresh token is no longer valid at the provider.
 */
export async function persistInBackground(
  db: Db,
  write: ResultWrite,
  hold: LeaseHold,
  budgetMs: number,
  sleep: (ms: number) => Promise<void> = defaultSleep,
): Promise<BackgroundOutcome> {
  const deadline = Date.now() + budgetMs;
  let pause = BACKGROUND_FIRST_RETRY_MS;
  let attempts = 0;
  let lastError = "";
  while (Date.now() + pause <= deadline) {
    await sleep(pause);
    attempts++;
    try {
      const outcome = (await applyResult(db, write)).written ? "stored" : "dropped";
      logInfo("rotated_refresh_token_persisted_late", { token: hold.tokenId, attempts, outcome });
      if (outcome === "dropped") await releaseLease(db, hold).catch(() => undefined);
      return outcome;
    } catch (error) {
      lastError = describeError(error);
    }
    pause = Math.min(pause * 2, BACKGROUND_MAX_RETRY_MS);
  }
  await releaseLease(db, hold).catch(() => undefined);
  logError("rotated_refresh_token_lost", {
    token: hold.tokenId,
    attempts: PERSIST_ATTEMPTS + attempts,
    error: lastError,
    message:
      "The provider rotated this grant's refresh token and the new one could not be stored: the grant may need re-consent (a new login link) if its next refresh is refused.",
  });
  return "lost";
}

async function handleRefreshFailure(
  deps: TokenDeps,
  client: ReadClient,
  row: TokenRow,
  hold: LeaseHold,
  error: ProviderError,
  now: Date,
): Promise<ServedToken> {
  logWarn("token_refresh_failed", {
    client: client.id,
    kind: error.kind,
    status: error.status,
    failures: row.failureCount + 1,
  });
  let applied: Applied;
  try {
    applied = await applyResult(deps.db, failureStatements(deps.db, deps.events, row, hold, error, now));
  } catch (writeError) {
    // Nothing was recorded (nor its event): give the lease back so the next attempt need not wait
    // for it to run out, and answer the database's failure.
    await releaseLease(deps.db, hold).catch(() => undefined);
    throw writeError;
  }
  noteWritten(deps.events, applied);
  const recorded = applied.written;
  if (!recorded || (error.kind === "invalid_grant" && !recordsDeadGrant(error, hold))) {
    // Our attempt is moot: we lost the lease, or another refresher rotated the token. Its result,
    // if it landed, is the answer.
    if (!recorded) {
      logWarn("refresh_result_dropped", { token: row.id, outcome: error.kind, reason: "superseded" });
      await releaseLease(deps.db, hold).catch(() => undefined);
    }
    const latest = await readToken(deps.db, row.id);
    if (latest?.isValid && latest.status === "active" && latest.expiresAt.getTime() > row.expiresAt.getTime()) {
      return serve(deps, client, latest, true);
    }
  } else if (error.kind === "invalid_grant") {
    throw reauthorizationRequired(client);
  }
  if (isServable(row, now)) return serve(deps, client, row, false);
  if (error.kind === "invalid_client") throw refreshBlocked({ ...client, credentialsRejectedAt: now }, row, now)!;
  if (error.transient || error.kind === "invalid_grant") {
    const retryAt = nextAttemptAt(row.failureCount + 1, now, error.retryAfterSeconds);
    throw new AppError(
      "provider_unavailable",
      `The token expired and the provider could not refresh it: ${error.message}.`,
      {
        retryAfterSeconds: Math.max(1, secondsLeftUntil(retryAt, now)),
      },
    );
  }
  throw new AppError("provider_error", `The provider refused to refresh the token: ${error.message}.`);
}

/** The write of a grant that can never be refreshed (no refresh token was ever issued). */
function recordDead(db: Db, events: EventContext, hold: LeaseHold, now: Date) {
  const reason = "no refresh token was ever issued";
  const update = db
    .update(tokens)
    .set({ isValid: false, status: "needs_reauth", lastError: reason, leaseOwner: null, leaseExpiresAt: null })
    .where(heldBy(hold))
    .returning(tokenChangeReturning("keep"));
  return tokenChangeWithEvents(db, events, update, { rejected: "keep", reason }, now);
}

/** Gives the lease back, if we still hold it. */
export async function releaseLease(db: Db, hold: Pick<LeaseHold, "tokenId" | "owner">): Promise<void> {
  await db
    .update(tokens)
    .set({ leaseOwner: null, leaseExpiresAt: null })
    .where(and(eq(tokens.id, hold.tokenId), eq(tokens.leaseOwner, hold.owner)));
}

async function serve(deps: TokenDeps, client: ReadClient, token: ReadToken, refreshed: boolean): Promise<ServedToken> {
  const accessToken = await open(deps.keyring, token.accessToken, {
    column: "tokens.access_token",
    clientId: token.clientId,
  });
  return { client, token, accessToken, refreshed };
}
