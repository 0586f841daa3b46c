import { and, eq, lt, sql } from "drizzle-orm";
import type { BatchItem } from "drizzle-orm/batch";
import type { Db } from "../db/client";
import { leaseIsFree } from "../db/queries";
import { type ClientRow, clients, type TokenRow, tokens } from "../db/schema";
import { AppError } from "../errors";
import { type Keyring, open, seal } from "../lib/crypto";
import { describeError, logError, logInfo, logWarn } from "../lib/log";
import { type IssuedTokens, type Provider, ProviderError, refreshGrant } from "../oauth/provider";
import { clientCredentials, revokeGrant, selectWithLatestToken } from "./clients";
import {
  expiryOf,
  inBackoff,
  isServable,
  LEASE_SECONDS,
  lifetimeOf,
  needsRefresh,
  nextAttemptAt,
} from "./refresh-policy";

/**
 * Serving and refreshing tokens. A refresh is single-flight across isolates: the refresher holds a
 * lease on the token row, taken with one conditional UPDATE … RETURNING; the others re-read until
 * the new token lands, or serve the current one while it is still good.
 */

export interface TokenDeps {
  db: Db;
  keyring: Keyring;
  provider: Provider;
  refreshAheadSeconds: number;
  /** Waiting between re-reads while another isolate refreshes; replaceable in tests. */
  sleep?: (ms: number) => Promise<void>;
}

/** The columns a token read needs: the hot path reads nothing else. */
export type ReadClient = Pick<ClientRow, "id" | "branchId" | "isActive" | "credentialsRejectedAt">;
export type ReadToken = Pick<
  TokenRow,
  | "id"
  | "accessToken"
  | "tokenType"
  | "scope"
  | "expiresAt"
  | "lifetimeSeconds"
  | "isValid"
  | "status"
  | "nextAttemptAt"
>;

export interface ServedToken {
  client: ReadClient;
  token: ReadToken;
  accessToken: string;
  refreshed: boolean;
}

/** Re-read interval and total patience of a request waiting on another isolate's refresh. */
export const LEASE_POLL_MS = 50;
export const LEASE_WAIT_MS = 15_000;
/** A rotated refresh token exists nowhere else: its write is retried this many times. */
export const PERSIST_ATTEMPTS = 4;
const PERSIST_RETRY_BASE_MS = 100;

const defaultSleep = (ms: number) => new Promise<void>((resolve) => setTimeout(resolve, ms));

/** GET /tokens/{branch_id}: one database round trip when the token is fresh. */
export async function getBranchToken(deps: TokenDeps, branchId: string, now: Date): Promise<ServedToken> {
  const { client, token } = requireGrant(await findForRead(deps.db, { branchId }), branchId);
  if (!needsRefresh(token, now, deps.refreshAheadSeconds)) return serve(deps, client, token, false);
  return refreshOrServe(deps, client, token, now, false);
}

/** POST /tokens/refresh: refresh now, whatever the expiry and backoff say (still single-flight). */
export async function forceRefresh(
  deps: TokenDeps,
  target: { clientId: number } | { branchId: string },
  now: Date,
): Promise<ServedToken> {
  const found = await findForRead(deps.db, target);
  const { client, token } = requireGrant(found, "branchId" in target ? target.branchId : `client ${target.clientId}`);
  return refreshOrServe(deps, client, token, now, true);
}

/** DELETE /tokens/{branch_id}: revoke at the provider (best effort), then mark the token revoked. */
export async function revokeBranchToken(
  deps: TokenDeps,
  branchId: string,
): Promise<{ client: ClientRow; revokedAtProvider: boolean }> {
  const [found] = await selectWithLatestToken(deps.db).where(eq(clients.branchId, branchId));
  if (!found?.client) throw new AppError("not_found", `No client is registered for branch ${branchId}.`);
  const { client, token } = found;
  if (!token) throw new AppError("not_found", `Branch ${branchId} has no token to revoke.`);
  let revokedAtProvider = false;
  if (token.isValid) {
    try {
      await revokeGrant(deps.keyring, deps.provider, await clientCredentials(deps.keyring, client), token);
      revokedAtProvider = true;
    } catch (error) {
      logWarn("revocation_failed", { client: client.id, error: describeError(error) });
    }
  }
  await deps.db
    .update(tokens)
    .set({ isValid: false, status: "revoked", leaseOwner: null, leaseExpiresAt: null })
    .where(eq(tokens.id, token.id));
  return { client, revokedAtProvider };
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
    c.id, c.branch_id, c.is_active, c.credentials_rejected_at,
    t.id, t.access_token, t.token_type, t.scope, t.expires_at, t.lifetime_seconds, t.is_valid, t.status, t.next_attempt_at
  ) as row
  from clients c
  left join lateral (
    select id, access_token, token_type, scope, expires_at, lifetime_seconds, is_valid, status, next_attempt_at
    from tokens where tokens.client_id = c.id order by tokens.id desc limit 1
  ) t on true`;
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
  ] = typeof raw === "string" ? (JSON.parse(raw) as ReadRow) : raw;
  const client: ReadClient = {
    id: clientId,
    branchId,
    isActive,
    credentialsRejectedAt: rejectedAt === null ? null : new Date(rejectedAt),
  };
  if (tokenId === null) return { client, token: null };
  return {
    client,
    token: {
      id: tokenId,
      accessToken: accessToken!,
      tokenType: tokenType!,
      scope,
      expiresAt: new Date(expiresAt!),
      lifetimeSeconds: lifetime,
      isValid: isValid!,
      status: status!,
      nextAttemptAt: nextAttempt === null ? null : new Date(nextAttempt),
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
  for (;;) {
    if (!force) {
      const blocked = refreshBlocked(client, current, at());
      if (blocked) {
        if (isServable(current, at())) return serve(deps, client, current, false);
        throw blocked;
      }
    }
    // Even a forced refresh yields to one that completed since we read the token.
    const leased = await tryLease(deps.db, current.id, owner, at(), seen.expiresAt);
    if (leased) return refreshHeld(deps, client, leased, owner, at);

    // Someone else holds the lease, or refreshed since we looked.
    const latest = await readToken(deps.db, current.id);
    if (latest?.status !== "active" || !latest.isValid) {
      requireGrant({ client, token: latest ?? null }, client.branchId);
      throw reauthorizationRequired(client);
    }
    if (latest.expiresAt.getTime() > seen.expiresAt.getTime()) return serve(deps, client, latest, true);
    if (!force && isServable(latest, at())) return serve(deps, client, latest, false);
    if (Date.now() - started > LEASE_WAIT_MS) {
      throw new AppError("provider_unavailable", "The token is being refreshed and no fresh token arrived in time.", {
        retryAfterSeconds: 1,
      });
    }
    current = latest;
    await sleep(LEASE_POLL_MS);
  }
}

/** Why an automatic refresh must not be attempted now, if it must not. */
function refreshBlocked(client: ReadClient, token: Pick<TokenRow, "nextAttemptAt">, now: Date): AppError | undefined {
  if (client.credentialsRejectedAt) {
    return new AppError(
      "client_credentials_rejected",
      `The provider rejected branch ${client.branchId}'s client credentials. An administrator must update the client secret (PATCH /token-management/clients/${client.id}).`,
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

async function tryLease(
  db: Db,
  tokenId: number,
  owner: string,
  now: Date,
  unrefreshedSince: Date,
): Promise<Leased | undefined> {
  const [row] = await db
    .update(tokens)
    .set({ leaseOwner: owner, leaseExpiresAt: new Date(now.getTime() + LEASE_SECONDS * 1000) })
    .from(clients)
    .where(
      and(
        eq(tokens.id, tokenId),
        eq(clients.id, tokens.clientId),
        eq(tokens.isValid, true),
        eq(tokens.status, "active"),
        leaseIsFree(now),
        // Nobody refreshed since we read it. The database keeps microseconds and JS dates keep
        // milliseconds, so compare against the next millisecond.
        lt(tokens.expiresAt, new Date(unrefreshedSince.getTime() + 1)),
      ),
    )
    .returning({ token: tokens, clientId: clients.clientId, clientSecret: clients.clientSecret });
  return row;
}

/** The leased token row with the client's credentials (the secret still sealed). */
export interface Leased {
  token: TokenRow;
  clientId: string;
  clientSecret: string;
}

async function readToken(db: Db, tokenId: number): Promise<TokenRow | undefined> {
  const [row] = await db.select().from(tokens).where(eq(tokens.id, tokenId));
  return row;
}

/** We hold the lease on `row`: refresh at the provider and record the outcome. */
async function refreshHeld(
  deps: TokenDeps,
  client: ReadClient,
  { token: row, clientId, clientSecret }: Leased,
  owner: string,
  at: () => Date,
): Promise<ServedToken> {
  if (!row.refreshToken) {
    await recordDead(deps.db, row.id, "no refresh token was ever issued");
    throw reauthorizationRequired(client);
  }
  const sentAt = at();
  let issued: IssuedTokens;
  try {
    issued = await refreshGrant(
      deps.provider,
      {
        clientId,
        clientSecret: await open(deps.keyring, clientSecret, {
          column: "clients.client_secret",
          clientId: row.clientId,
        }),
      },
      await open(deps.keyring, row.refreshToken, { column: "tokens.refresh_token", clientId: row.clientId }),
    );
  } catch (error) {
    if (!(error instanceof ProviderError)) {
      await releaseLease(deps.db, row.id, owner).catch(() => undefined);
      throw error;
    }
    return handleRefreshFailure(deps, client, row, error, at());
  }
  const update = await refreshedValues(deps.keyring, row.clientId, issued, sentAt);
  const stored = await persistWithRetry(deps.db, row.id, update, deps.sleep ?? defaultSleep);
  logInfo("token_refreshed", {
    client: client.id,
    expires_in: lifetimeOf(issued),
    rotated: issued.refreshToken !== undefined,
  });
  // If every write failed, the caller still gets the fresh token; the error was logged loudly.
  const token = stored ?? { ...row, ...update, expiresAt: update.expiresAt };
  return { client, token, accessToken: issued.accessToken, refreshed: true };
}

export interface RefreshedValues {
  accessToken: string;
  refreshToken?: string;
  tokenType: string;
  scope: string | null;
  expiresAt: Date;
  lifetimeSeconds: number;
  lastRefreshedAt: Date;
  failureCount: 0;
  lastError: null;
  nextAttemptAt: null;
  leaseOwner: null;
  leaseExpiresAt: null;
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
      : { refreshToken: await seal(keyring, issued.refreshToken, { column: "tokens.refresh_token", clientId }) }),
    tokenType: issued.tokenType,
    scope: issued.scope ?? null,
    expiresAt: expiryOf(issued, sentAt),
    lifetimeSeconds: lifetime,
    lastRefreshedAt: sentAt,
    failureCount: 0,
    lastError: null,
    nextAttemptAt: null,
    leaseOwner: null,
    leaseExpiresAt: null,
  };
}

async function persistWithRetry(
  db: Db,
  tokenId: number,
  values: RefreshedValues,
  sleep: (ms: number) => Promise<void>,
): Promise<TokenRow | undefined> {
  for (let attempt = 1; attempt <= PERSIST_ATTEMPTS; attempt++) {
    try {
      const [row] = await db.update(tokens).set(values).where(eq(tokens.id, tokenId)).returning();
      return row;
    } catch (error) {
      const lost = attempt === PERSIST_ATTEMPTS;
      (lost ? logError : logWarn)(lost ? "refreshed_token_not_persisted" : "refreshed_token_write_retry", {
        token: tokenId,
        attempt,
        rotated: values.refreshToken !== undefined,
        error: describeError(error),
      });
      if (!lost) await sleep(PERSIST_RETRY_BASE_MS * 2 ** (attempt - 1));
    }
  }
  return undefined;
}

/**
 * The writes that record a failed refresh, by kind of failure: a dead grant stops being current, a
 * transient failure schedules the next attempt, and `invalid_client` also flags the client.
 * Shared by the on-demand path and the cron, which batches them.
 */
export function failureStatements(
  db: Db,
  token: Pick<TokenRow, "id" | "clientId" | "failureCount">,
  error: ProviderError,
  now: Date,
): [BatchItem<"pg">, ...BatchItem<"pg">[]] {
  const failureCount = token.failureCount + 1;
  const common = { failureCount, lastError: error.message.slice(0, 500), leaseOwner: null, leaseExpiresAt: null };
  const values =
    error.kind === "invalid_grant"
      ? { ...common, isValid: false, status: "needs_reauth" as const }
      : { ...common, nextAttemptAt: nextAttemptAt(failureCount, now, error.retryAfterSeconds) };
  const updateToken = db.update(tokens).set(values).where(eq(tokens.id, token.id));
  if (error.kind !== "invalid_client") return [updateToken];
  return [updateToken, db.update(clients).set({ credentialsRejectedAt: now }).where(eq(clients.id, token.clientId))];
}

async function handleRefreshFailure(
  deps: TokenDeps,
  client: ReadClient,
  row: TokenRow,
  error: ProviderError,
  now: Date,
): Promise<ServedToken> {
  logWarn("token_refresh_failed", {
    client: client.id,
    kind: error.kind,
    status: error.status,
    failures: row.failureCount + 1,
  });
  await deps.db.batch(failureStatements(deps.db, row, error, now));
  if (error.kind === "invalid_grant") throw reauthorizationRequired(client);
  if (isServable(row, now)) return serve(deps, client, row, false);
  if (error.kind === "invalid_client") throw refreshBlocked({ ...client, credentialsRejectedAt: now }, row, now)!;
  if (error.transient) {
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

async function recordDead(db: Db, tokenId: number, reason: string): Promise<void> {
  await db
    .update(tokens)
    .set({ isValid: false, status: "needs_reauth", lastError: reason, leaseOwner: null, leaseExpiresAt: null })
    .where(eq(tokens.id, tokenId));
}

async function releaseLease(db: Db, tokenId: number, owner: string): Promise<void> {
  await db
    .update(tokens)
    .set({ leaseOwner: null, leaseExpiresAt: null })
    .where(and(eq(tokens.id, tokenId), eq(tokens.leaseOwner, owner)));
}

async function serve(deps: TokenDeps, client: ReadClient, token: ReadToken, refreshed: boolean): Promise<ServedToken> {
  const accessToken = await open(deps.keyring, token.accessToken, {
    column: "tokens.access_token",
    clientId: client.id,
  });
  return { client, token, accessToken, refreshed };
}
