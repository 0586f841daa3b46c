import { and, eq, isNull, lte, ne, notExists, or, type SQL, sql } from "drizzle-orm";
import type { Db } from "../db/client";
import { type AppRow, apps, type ClientRow, clients, type TokenRow, tokens } from "../db/schema";
import { AppError, sqlState } from "../errors";
import { CryptoError, type Keyring, open, seal } from "../lib/crypto";
import { toBase64Url, utf8 } from "../lib/encoding";
import { describeError, logInfo, logWarn } from "../lib/log";
import { refreshTokenDigests } from "../lib/token-digest";
import type { Providers } from "../oauth/profiles";
import {
  buildAuthorizationUrl,
  type ClientCredentials,
  createPkcePair,
  exchangeCode,
  type IssuedTokens,
  type Provider,
  ProviderError,
  revokeToken,
  scopesToRequest,
  unexpectedIssuer,
} from "../oauth/provider";
import { appCredentials } from "./apps";
import { clientNotFound, revokeGrant } from "./clients";
import {
  clientEvent,
  currentStatusSql,
  type EventContext,
  noteEvents,
  tokenChangeReturning,
  tokenChangeWithEvents,
} from "./events";
import { tokenLimitEvent } from "./grants";
import { linkStillValid } from "./login-links";
import { expiryOf, lifetimeOf } from "./refresh-policy";

/**
 * The authorization-code flow with PKCE. The `state` is sealed (AES-GCM), carries the client, the
 * PKCE verifier and an expiry, and is bound to the browser that started the flow by a cookie.
 */

export const STATE_TTL_SECONDS = 10 * 60;
const BINDING_COOKIE = "tm_oauth_binding";

export interface BindingCookie {
  name: string;
  secure: boolean;
}

/**
 * The browser-binding cookie. Path=/ so that it also reaches /oauth/login, where a second consent
 * started in another tab reuses it instead of replacing it. On https it is `__Host-` prefixed and
 * Secure (the browser then refuses it from any subdomain or without Secure); on plain http (local
 * development) a browser would drop a Secure cookie, so it is the plain name.
 */
export function bindingCookie(origin: string): BindingCookie {
  return new URL(origin).protocol === "https:"
    ? { name: `__Host-${BINDING_COOKIE}`, secure: true }
    : { name: BINDING_COOKIE, secure: false };
}
const MAX_SHOWN_ISSUER_CHARS = 200;

interface StatePayload {
  /** Internal client id. */
  c: number;
  /** PKCE code verifier. */
  v: string;
  /** SHA-256 of the browser-binding cookie. */
  b: string;
  /** Single-use nonce, stored with the tokens it produced. */
  n: string;
  /** Expiry, Unix milliseconds. */
  e: number;
  /**
   * Authority, Unix milliseconds: the issue time of the login link that started the flow, or the
   * start of a flow the admin key started. Valid while it is at or after the client's
   * `login_links_valid_after`.
   */
  a: number;
  /** The consent screen was forced (prompt=consent): a new refresh token then proves nothing. */
  p: boolean;
  /** OpenID Connect: the nonce the ID token must carry. */
  o?: string;
  /** The account the login link was bound to (an email or a `sub`): another one stores nothing. */
  x?: string;
}

export interface LoginStart {
  redirectTo: string;
  bindingCookie: string;
}

/**
 * `linkIssuedAt`: the issue time of the (signature-checked) login link, or null when the admin
 * key started the flow.
 */
export async function startLogin(
  db: Db,
  keyring: Keyring,
  providers: Providers,
  clientId: number,
  existingBinding: string | undefined,
  now: Date,
  linkIssuedAt: Date | null,
  expectedAccount?: string,
): Promise<LoginStart> {
  const [found] = await db
    .select({ client: clients, app: apps })
    .from(clients)
    .innerJoin(apps, eq(apps.id, clients.appId))
    .where(eq(clients.id, clientId));
  if (!found?.client.isActive) throw clientNotFound(clientId);
  const { client, app } = found;
  const provider = providers.of(app);
  const authority = linkIssuedAt ?? now;
  if (!linkStillValid(client, authority)) {
    throw new AppError(
      "unauthorized",
      "This login link was already used to connect the branch, or it was revoked. Ask your administrator for a new one.",
    );
  }
  // Reusing the browser's binding lets one operator connect several branches in parallel tabs.
  const binding = existingBinding && /^[A-Za-z0-9_-]{32,64}$/.test(existingBinding) ? existingBinding : randomToken();
  const pkce = await createPkcePair();
  // After a consent that brought no refresh token, the next one asks for the consent screen. Never
  // otherwise: an account connecting its tenth location must not mint a tenth refresh token.
  const forceConsent = client.consentProblem === "no_refresh_token";
  const nonce = provider.openid ? randomToken() : undefined;
  const payload: StatePayload = {
    c: client.id,
    v: pkce.verifier,
    b: await sha256(binding),
    n: randomToken(),
    e: now.getTime() + STATE_TTL_SECONDS * 1000,
    a: authority.getTime(),
    p: forceConsent || forcesConsent(provider.extraAuthorizationParams),
    ...(nonce === undefined ? {} : { o: nonce }),
    ...(expectedAccount === undefined ? {} : { x: expectedAccount }),
  };
  const state = await seal(keyring, JSON.stringify(payload), "oauth.state");
  const url = buildAuthorizationUrl(provider, {
    clientId: app.clientId,
    redirectUri: client.redirectUri,
    scopes: scopesToRequest(provider, client.scopes),
    state,
    codeChallenge: pkce.challenge,
    nonce,
    loginHint: expectedAccount,
    forceConsent,
  });
  return { redirectTo: url.toString(), bindingCookie: binding };
}

export interface CallbackResult {
  client: ClientRow;
  /** Every branch served from the grant the consent stored (their cached tokens are stale). */
  branchIds: string[];
  expiresAt: Date;
  scope: string | null;
  hasRefreshToken: boolean;
}

/** Best-effort provider calls that must not hold up the answer (`ctx.waitUntil` in the Worker). */
export type Defer = (work: Promise<unknown>) => void;

export async function completeLogin(
  db: Db,
  keyring: Keyring,
  providers: Providers,
  params: URLSearchParams,
  binding: string | undefined,
  now: Date,
  events: EventContext,
  defer?: Defer,
): Promise<CallbackResult> {
  const started = Date.now();
  const state = params.get("state");
  if (!state) throw new AppError("invalid_state", "The callback has no state. Start again from your login link.");
  const payload = await openState(keyring, state);
  const app = await appOfBranch(db, payload.c);
  const provider = providers.of(app);
  if (payload.e <= now.getTime()) {
    throw new AppError("invalid_state", "This sign-in took too long and expired. Start again from your login link.");
  }
  if (!binding || (await sha256(binding)) !== payload.b) {
    throw new AppError(
      "invalid_state",
      "This sign-in was started in another browser (or cookies are blocked). Open the login link again in this browser.",
    );
  }
  // Checked before the state is claimed: a mixed-up response stores nothing and burns nothing.
  const issuer = unexpectedIssuer(provider, params);
  if (issuer !== undefined) {
    throw new AppError(
      "bad_request",
      `The sign-in answer names another issuer (${issuer.slice(0, MAX_SHOWN_ISSUER_CHARS)}) than the configured provider; nothing was stored. Start again from your login link.`,
    );
  }
  const providerError = params.get("error");
  if (providerError) {
    const description = params.get("error_description");
    throw new AppError(
      "authorization_denied",
      `The provider did not grant access (${providerError}${description ? `: ${description}` : ""}). Start again from your login link to retry.`,
    );
  }
  const client = await claimState(db, payload);
  const credentials = await appCredentials(keyring, app);

  let issued: IssuedTokens;
  const sentAt = new Date(now.getTime() + (Date.now() - started));
  try {
    issued = await exchangeCode(provider, credentials, params, state, client.redirectUri, payload.v, payload.o);
  } catch (error) {
    if (error instanceof ProviderError && error.kind === "invalid_client") {
      await recordRejectedCredentials(db, events, client.id, app.id, error, now);
    }
    if (error instanceof ProviderError && error.transient) {
      // The provider failed or did not answer (5xx, timeout, network): let the same callback be retried.
      await db
        .update(clients)
        .set({ lastStateNonce: null })
        .where(and(eq(clients.id, client.id), eq(clients.lastStateNonce, payload.n)));
    }
    throw exchangeFailure(error);
  }

  const run: Defer = defer ?? ((work) => void work);
  const background: Promise<unknown>[] = [];
  const later: Defer = (work) => {
    const settled = work.catch(() => undefined);
    background.push(settled);
    run(settled);
  };
  try {
    const previous = client.grantId === null ? undefined : await grantById(db, client.grantId);
    // OpenID Connect: the account's grant on this app, if one is stored (a consent joins it).
    const joined = issued.account ? await grantOfAccount(db, app.id, issued.account.subject) : undefined;
    // A stored refresh token that does not open (see parkedStatements) is no live grant to keep.
    const joinedLive =
      joined?.isValid === true &&
      joined.status === "active" &&
      joined.refreshToken !== null &&
      (await opens(keyring, joined.refreshToken, joined.clientId));
    // A new refresh token obtained without forcing the consent screen proves the account held no
    // live grant for this client (Google issues one only on the first consent): whatever we hold
    // belongs to another grant, and revoking it cannot touch the new one. Otherwise (no new
    // refresh token, or prompt=consent) the old and new tokens may be one grant: revoking either
    // would revoke both, so nothing is revoked. A grant of the same account is never revoked.
    const distinctGrant = issued.refreshToken !== undefined && !payload.p && joined === undefined;
    if (payload.x !== undefined && issued.account && !sameAccount(payload.x, issued.account)) {
      // Tokens of an account nobody asked for: revoked unless that account has a grant here (at
      // Google, revoking any of its tokens would end that grant too).
      if (joined === undefined) later(discardIssued(provider, credentials, issued, client.id));
      throw new AppError(
        "authorization_denied",
        `This login link is for ${payload.x}, but ${issued.account.email ?? "another account"} signed in. Nothing was stored. Open the link again and sign in as ${payload.x}.`,
        { fields: { expected_account: payload.x } },
      );
    }
    const holdsHealthyGrant = previous?.isValid === true && previous.status === "active";

    const missing = missingScopes(client.scopes ?? provider.defaultScopes, issued.scope);
    if (missing.length > 0) {
      await recordConsentProblem(db, client.id, "scopes_not_granted", `not granted: ${missing.join(" ")}`, now);
      // The partial grant is of no use; revoking it must not take a stored grant of the same account
      // (at Google, revoking any token of an account ends all of that account's tokens on the app).
      if (joined === undefined && (distinctGrant || !holdsHealthyGrant)) {
        later(discardIssued(provider, credentials, issued, client.id));
      }
      throw new AppError(
        "authorization_denied",
        `Not every permission was granted (missing: ${missing.join(" ")}). Nothing was stored${holdsHealthyGrant ? "; the existing connection is kept" : ""}. Open the login link again and leave every permission ticked.`,
        { fields: { missing_scopes: missing } },
      );
    }
    const carried = joined ? (joinedLive ? joined.refreshToken : null) : (previous?.refreshToken ?? null);
    if (issued.refreshToken === undefined && !carried) {
      await recordConsentProblem(
        db,
        client.id,
        "no_refresh_token",
        "the provider issued no refresh token; the next sign-in asks for the consent screen (prompt=consent)",
        now,
      );
      throw new AppError(
        "reauthorization_required",
        "The provider did not issue a refresh token (it issues one only on the first consent), so the connection could not be stored. Open the same login link again: the next sign-in asks the provider to show its consent screen again (prompt=consent).",
        { fields: { reconsent_with_prompt_consent: true } },
      );
    }

    const expiresAt = expiryOf(issued, sentAt);
    const stored = await storeTokens(db, keyring, events, client, app, issued, expiresAt, now, payload, {
      joined,
      previous,
      carried: joined ? null : (previous?.refreshToken ?? null),
    });
    if (!stored) {
      // Another consent for this branch stored first, or the links were revoked meanwhile.
      if (distinctGrant) later(discardIssued(provider, credentials, issued, client.id));
      throw supersededFlow();
    }
    // The new grant is stored: the one it replaced is revoked at the provider (best effort), when
    // no branch is served from it any more and it is another account's.
    if (
      previous &&
      previous.id !== stored.grantId &&
      (distinctGrant || (issued.account !== undefined && previous.subject !== issued.account.subject)) &&
      (previous.refreshToken !== null || previous.isValid) &&
      stored.previousOrphaned
    ) {
      later(revokeReplaced(keyring, provider, credentials, previous));
    }
    return {
      client,
      branchIds: stored.branchIds,
      expiresAt,
      scope: issued.scope ?? null,
      hasRefreshToken: issued.refreshToken !== undefined,
    };
  } finally {
    if (!defer) await Promise.all(background);
  }
}

/** The link's account (an email, compared without case, or a `sub`) is the one that signed in. */
function sameAccount(expected: string, account: { subject: string; email: string | null }): boolean {
  return expected === account.subject || expected.toLowerCase() === account.email?.toLowerCase();
}

async function opens(keyring: Keyring, sealed: string, owner: number): Promise<boolean> {
  try {
    await open(keyring, sealed, { column: "tokens.refresh_token", clientId: owner });
    return true;
  } catch (error) {
    if (error instanceof CryptoError) return false;
    throw error;
  }
}

async function appOfBranch(db: Db, clientId: number): Promise<AppRow> {
  const [row] = await db
    .select({ app: apps })
    .from(clients)
    .innerJoin(apps, eq(apps.id, clients.appId))
    .where(eq(clients.id, clientId));
  if (!row) throw clientNotFound(clientId);
  return row.app;
}

async function grantById(db: Db, id: number): Promise<TokenRow | undefined> {
  const [row] = await db.select().from(tokens).where(eq(tokens.id, id));
  return row;
}

async function grantOfAccount(db: Db, appId: number, subject: string): Promise<TokenRow | undefined> {
  const [row] = await db
    .select()
    .from(tokens)
    .where(and(eq(tokens.appId, appId), eq(tokens.subject, subject)));
  return row;
}

/**
 * Scopes asked for but not granted. A token response without `scope` granted what was asked
 * (RFC 6749 §5.1); with granular consent (Google) the user may untick some.
 */
export function missingScopes(requested: string, granted: string | undefined): string[] {
  if (granted === undefined) return [];
  const have = new Set(granted.split(" ").filter(Boolean));
  return requested.split(" ").filter((scope) => scope !== "" && !have.has(scope));
}

function forcesConsent(params: URLSearchParams): boolean {
  return (params.get("prompt") ?? "").split(" ").includes("consent");
}

async function recordConsentProblem(
  db: Db,
  clientId: number,
  problem: NonNullable<ClientRow["consentProblem"]>,
  detail: string,
  now: Date,
): Promise<void> {
  await db
    .update(clients)
    .set({ consentProblem: problem, consentProblemDetail: detail, consentProblemAt: now })
    .where(eq(clients.id, clientId));
}

/** Tokens the provider issued that will not be stored: revoked so they do not linger. */
async function discardIssued(
  provider: Provider,
  credentials: ClientCredentials,
  issued: IssuedTokens,
  clientId: number,
): Promise<void> {
  try {
    if (issued.refreshToken !== undefined)
      await revokeToken(provider, credentials, issued.refreshToken, "refresh_token");
    else await revokeToken(provider, credentials, issued.accessToken, "access_token");
  } catch (error) {
    logWarn("revocation_failed", { client: clientId, reason: "unstored consent", error: describeError(error) });
  }
}

async function revokeReplaced(
  keyring: Keyring,
  provider: Provider,
  credentials: ClientCredentials,
  previous: TokenRow,
): Promise<void> {
  try {
    await revokeGrant(keyring, provider, credentials, previous);
    logInfo("replaced_grant_revoked", { client: previous.clientId, token: previous.id });
  } catch (error) {
    logWarn("revocation_failed", {
      client: previous.clientId,
      token: previous.id,
      reason: "replaced grant",
      error: describeError(error),
    });
  }
}

interface Stored {
  grantId: number;
  /** Every branch now served from the grant. */
  branchIds: string[];
  /** The branch's previous grant is served to no branch any more (and was marked not current). */
  previousOrphaned: boolean;
}

/**
 * One batch (one transaction). First the branch row: it must still accept the flow's authority
 * (no link revoked, no other consent stored since), and `login_links_valid_after` moves past it,
 * which is what makes the link single use; the state nonce marks the row as ours. The statements
 * after it run only when that row carries our mark: the account's grant is renewed in place
 * (`joined`: a new refresh token, if one came, replaces the stored one; none keeps it), or a new
 * grant is inserted (carrying the branch's previous refresh token over when none was sent, without
 * OpenID Connect); the branch points at it; a previous grant no branch uses any more stops being
 * current. Returns undefined when the first statement matched nothing: then nothing was written.
 */
async function storeTokens(
  db: Db,
  keyring: Keyring,
  events: EventContext,
  client: ClientRow,
  app: AppRow,
  issued: IssuedTokens,
  expiresAt: Date,
  now: Date,
  payload: StatePayload,
  context: { joined: TokenRow | undefined; previous: TokenRow | undefined; carried: string | null },
): Promise<Stored | undefined> {
  const { joined, previous } = context;
  // Sealed values are bound to the branch whose consent created the grant.
  const owner = joined?.clientId ?? client.id;
  const [accessToken, refreshToken] = await Promise.all([
    seal(keyring, issued.accessToken, { column: "tokens.access_token", clientId: owner }),
    issued.refreshToken === undefined
      ? undefined
      : seal(keyring, issued.refreshToken, { column: "tokens.refresh_token", clientId: owner }),
  ]);
  // A carried-over refresh token was sealed for the previous grant's owner: open and seal again.
  const carriedPlain =
    refreshToken === undefined && !joined && context.carried !== null && previous
      ? await open(keyring, context.carried, { column: "tokens.refresh_token", clientId: previous.clientId })
      : null;
  const carried =
    carriedPlain === null
      ? null
      : await seal(keyring, carriedPlain, { column: "tokens.refresh_token", clientId: owner });
  // What a Cross-Account Protection token-revoked event can name the stored refresh token by.
  const storedPlain = issued.refreshToken ?? carriedPlain;
  const digests = storedPlain === null ? null : await refreshTokenDigests(storedPlain);
  const clientId = client.id;
  const authority = new Date(payload.a);
  const accepts = and(
    eq(clients.id, clientId),
    eq(clients.isActive, true),
    or(isNull(clients.loginLinksValidAfter), lte(clients.loginLinksValidAfter, authority)),
  );
  const validAfter = new Date(Math.max(now.getTime(), payload.a + 1));
  const ours = sql`exists (select 1 from ${clients} where ${clients.id} = ${clientId} and ${clients.lastStateNonce} = ${payload.n} and ${clients.loginLinksValidAfter} = ${validAfter.toISOString()}::timestamptz)`;
  const accessEnds =
    issued.refreshTokenExpiresIn === undefined ? null : new Date(now.getTime() + issued.refreshTokenExpiresIn * 1000);
  const account = issued.account;
  const minted = issued.refreshToken === undefined ? 0 : 1;

  const claim = db
    .update(clients)
    .set({
      loginLinksValidAfter: validAfter,
      lastStateNonce: payload.n,
      consentProblem: null,
      consentProblemDetail: null,
      consentProblemAt: null,
    })
    .where(accepts)
    .returning({ id: clients.id });
  let grantWrites: BatchItem[];
  if (joined) {
    grantWrites = [
      // The account's grant, renewed in place: its other branches recover with it (one event each).
      tokenChangeWithEvents(
        db,
        events,
        db
          .update(tokens)
          .set({
            accessToken,
            ...(refreshToken === undefined || digests === null
              ? {}
              : {
                  refreshToken,
                  refreshTokenPrefixDigest: digests.prefixDigest,
                  refreshTokenDigest: digests.digest,
                }),
            tokenType: issued.tokenType,
            scope: issued.scope ?? null,
            expiresAt,
            lifetimeSeconds: lifetimeOf(issued),
            lastRefreshedAt: now,
            isValid: true,
            status: "active",
            failureCount: 0,
            lastError: null,
            nextAttemptAt: null,
            leaseOwner: null,
            leaseExpiresAt: null,
            // The account signed in again: Google let it, so a Cross-Account Protection hold ends.
            heldAt: null,
            heldReason: null,
            email: account?.email ?? joined.email,
            consentedAt: now,
            refreshTokenExpiresAt: accessEnds,
            expiryWarnedAt: null,
            refreshTokensMinted: sql`${tokens.refreshTokensMinted} + ${minted}`,
          })
          .where(and(eq(tokens.id, joined.id), ours))
          .returning(tokenChangeReturning("clear")),
        { rejected: "clear", reason: "a new consent of the account renewed the grant", exceptBranch: clientId },
        now,
      ),
      db
        .update(clients)
        .set({ grantId: joined.id })
        .where(and(eq(clients.id, clientId), ours)),
      ...(minted ? [tokenLimitEvent(db, events, clientId, joined.id, now)] : []),
    ];
  } else {
    grantWrites = [
      db.execute(sql`update ${apps} set credentials_rejected_at = null where id = ${app.id} and ${ours}`),
      db.execute(sql`with inserted as (
          insert into ${tokens} (client_id, app_id, subject, email, consented_at, access_token, refresh_token,
            token_type, scope, expires_at, lifetime_seconds, last_refreshed_at, status, state_nonce,
            refresh_token_expires_at, refresh_tokens_minted, refresh_token_prefix_digest, refresh_token_digest)
          select ${clientId}, ${app.id}, ${account?.subject ?? null}, ${account?.email ?? null}, ${now.toISOString()}::timestamptz,
            ${accessToken}, ${refreshToken ?? carried}, ${issued.tokenType}, ${issued.scope ?? null},
            ${expiresAt.toISOString()}::timestamptz, ${lifetimeOf(issued)}, ${now.toISOString()}::timestamptz, 'active',
            ${payload.n}, ${accessEnds?.toISOString() ?? null}::timestamptz, ${minted},
            ${digests?.prefixDigest ?? null}, ${digests?.digest ?? null}
          where ${ours}
          returning id
        )
        update ${clients} set grant_id = inserted.id from inserted where ${clients.id} = ${clientId}`),
    ];
  }
  const previousWrite =
    previous && previous.id !== joined?.id
      ? [
          db
            .update(tokens)
            .set({ isValid: false, leaseOwner: null, leaseExpiresAt: null })
            .where(
              and(
                eq(tokens.id, previous.id),
                ours,
                sql`not exists (select 1 from ${clients} where ${clients.grantId} = ${previous.id})`,
              ),
            )
            .returning({ id: tokens.id }),
        ]
      : [];
  let results: unknown[];
  try {
    results = await db.batch([
      consentEvent(db, events, clientId, accepts, now),
      claim,
      ...(grantWrites as [BatchItem]),
      ...previousWrite,
    ]);
  } catch (error) {
    if (sqlState(error) === "23505") {
      throw new AppError("invalid_state", "This sign-in was already completed. Start again from your login link.");
    }
    throw error;
  }
  for (const result of results) if (!Array.isArray(result)) noteEvents(events, result);
  if ((results[1] as unknown[]).length !== 1) return undefined;
  const [branch] = await db.select({ grantId: clients.grantId }).from(clients).where(eq(clients.id, clientId));
  const grantId = branch?.grantId ?? joined?.id ?? 0;
  const sharing = await db.select({ branchId: clients.branchId }).from(clients).where(eq(clients.grantId, grantId));
  return {
    grantId,
    branchIds: sharing.map((row) => row.branchId),
    previousOrphaned: previousWrite.length > 0 && ((results.at(-1) as unknown[]) ?? []).length > 0,
  };
}

type BatchItem = Parameters<Db["batch"]>[0][number];

/**
 * connection.created (the branch was never connected) or connection.reauthorized (a new consent
 * replaced its grant or renewed it, whatever became of it), decided in the database by the same
 * condition as the claim that follows it in the batch (`accepts`). It runs first, to read the status
 * before the batch changes it, and locks the branch row so the claim sees the row it decided on.
 */
function consentEvent(db: Db, events: EventContext, clientId: number, accepts: SQL | undefined, now: Date) {
  const replaces = sql`(${clients.grantId} is not null)`;
  return clientEvent(
    db,
    events,
    clientId,
    {
      type: sql`case when ${accepts} then (case when ${replaces} then 'connection.reauthorized' else 'connection.created' end) end`,
      before: currentStatusSql("clients"),
      after: "connected",
      reason: sql`case when ${replaces} then 'a new consent replaced the grant' else 'first consent' end`,
    },
    now,
    { lock: true },
  );
}

/**
 * The code exchange was refused with `invalid_client`: the app is flagged, and if that changes the
 * branch's connection status (connected, degraded, needs_reauth or never_connected before),
 * connection.credentials_rejected is written for it in the same transaction.
 */
async function recordRejectedCredentials(
  db: Db,
  events: EventContext,
  clientId: number,
  appId: number,
  error: ProviderError,
  now: Date,
): Promise<void> {
  const before = currentStatusSql("clients");
  const after = currentStatusSql("clients", "true");
  const [written] = await db.batch([
    clientEvent(
      db,
      events,
      clientId,
      {
        type: sql`case when ${before} is distinct from ${after} then 'connection.credentials_rejected' end`,
        before,
        after,
        reason: `at the code exchange: ${error.message}`,
      },
      now,
    ),
    db.update(apps).set({ credentialsRejectedAt: now }).where(eq(apps.id, appId)),
  ]);
  noteEvents(events, written);
}

/**
 * A state is usable once. One statement claims it on the client row, refusing a state that is
 * already claimed (a concurrent or repeated callback) or that already produced tokens.
 */
async function claimState(db: Db, payload: StatePayload): Promise<ClientRow> {
  const authority = new Date(payload.a);
  const [claimed] = await db
    .update(clients)
    .set({ lastStateNonce: payload.n })
    .where(
      and(
        eq(clients.id, payload.c),
        eq(clients.isActive, true),
        or(isNull(clients.lastStateNonce), ne(clients.lastStateNonce, payload.n)),
        or(isNull(clients.loginLinksValidAfter), lte(clients.loginLinksValidAfter, authority)),
        notExists(db.select({ id: tokens.id }).from(tokens).where(eq(tokens.stateNonce, payload.n))),
      ),
    )
    .returning();
  if (claimed) return claimed;
  const [client] = await db
    .select({
      isActive: clients.isActive,
      loginLinksValidAfter: clients.loginLinksValidAfter,
      lastStateNonce: clients.lastStateNonce,
    })
    .from(clients)
    .where(eq(clients.id, payload.c));
  if (!client?.isActive) throw clientNotFound(payload.c);
  if (client.lastStateNonce !== payload.n && !linkStillValid(client, authority)) throw supersededFlow();
  throw new AppError("invalid_state", "This sign-in was already used. Start again from your login link.");
}

function supersededFlow(): AppError {
  return new AppError(
    "conflict",
    "Another sign-in for this branch finished first, or its login links were revoked meanwhile. Nothing was stored from this one.",
  );
}

async function openState(keyring: Keyring, state: string): Promise<StatePayload> {
  try {
    const payload = JSON.parse(await open(keyring, state, "oauth.state")) as StatePayload;
    // States sealed before login links carried an issue time (no `a`) are refused: start again.
    if (typeof payload.c !== "number" || typeof payload.e !== "number" || typeof payload.a !== "number") {
      throw new CryptoError("bad payload");
    }
    return payload;
  } catch {
    throw new AppError(
      "invalid_state",
      "The sign-in state is not valid (altered or not issued here). Start again from your login link.",
    );
  }
}

function exchangeFailure(error: unknown): unknown {
  if (!(error instanceof ProviderError)) return error;
  switch (error.kind) {
    case "invalid_grant":
    case "rejected":
      return new AppError(
        "authorization_denied",
        `The provider refused the authorization code (${error.message}). Start again from your login link.`,
      );
    case "invalid_client":
      return new AppError(
        "provider_error",
        "The provider rejected this branch's client credentials. An administrator must fix the client secret or redirect URI.",
      );
    default:
      return new AppError(
        "provider_error",
        `Could not complete sign-in with the provider: ${error.message}. Try again shortly.`,
      );
  }
}

function randomToken(): string {
  return toBase64Url(crypto.getRandomValues(new Uint8Array(32)));
}

async function sha256(value: string): Promise<string> {
  return toBase64Url(await crypto.subtle.digest("SHA-256", utf8(value)));
}
