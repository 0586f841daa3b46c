import { and, desc, eq, isNull, lte, ne, notExists, or, type SQL, sql } from "drizzle-orm";
import type { Db } from "../db/client";
import { type ClientRow, clients, type TokenRow, tokens } from "../db/schema";
import { AppError, sqlState } from "../errors";
import { CryptoError, type Keyring, open, seal } from "../lib/crypto";
import { toBase64Url, utf8 } from "../lib/encoding";
import { describeError, logInfo, logWarn } from "../lib/log";
import {
  buildAuthorizationUrl,
  type ClientCredentials,
  createPkcePair,
  exchangeCode,
  type IssuedTokens,
  type Provider,
  ProviderError,
  revokeToken,
  unexpectedIssuer,
} from "../oauth/provider";
import { clientCredentials, clientNotFound, revokeGrant } from "./clients";
import { clientEvent, currentStatusSql, type EventContext, noteEvents, withEvents } from "./events";
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
  provider: Provider,
  clientId: number,
  existingBinding: string | undefined,
  now: Date,
  linkIssuedAt: Date | null,
): Promise<LoginStart> {
  const [client] = await db.select().from(clients).where(eq(clients.id, clientId));
  if (!client?.isActive) throw clientNotFound(clientId);
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
  // After a consent that brought no refresh token, the next one asks for the consent screen.
  const forceConsent = client.consentProblem === "no_refresh_token";
  const payload: StatePayload = {
    c: client.id,
    v: pkce.verifier,
    b: await sha256(binding),
    n: randomToken(),
    e: now.getTime() + STATE_TTL_SECONDS * 1000,
    a: authority.getTime(),
    p: forceConsent || forcesConsent(provider.extraAuthorizationParams),
  };
  const state = await seal(keyring, JSON.stringify(payload), "oauth.state");
  const url = buildAuthorizationUrl(provider, {
    clientId: client.clientId,
    redirectUri: client.redirectUri,
    scopes: requestedScopes(client, provider),
    state,
    codeChallenge: pkce.challenge,
    forceConsent,
  });
  return { redirectTo: url.toString(), bindingCookie: binding };
}

export interface CallbackResult {
  client: ClientRow;
  expiresAt: Date;
  scope: string | null;
  hasRefreshToken: boolean;
}

/** Best-effort provider calls that must not hold up the answer (`ctx.waitUntil` in the Worker). */
export type Defer = (work: Promise<unknown>) => void;

export async function completeLogin(
  db: Db,
  keyring: Keyring,
  provider: Provider,
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
  const credentials = await clientCredentials(keyring, client);

  let issued: IssuedTokens;
  const sentAt = new Date(now.getTime() + (Date.now() - started));
  try {
    issued = await exchangeCode(provider, credentials, params, state, client.redirectUri, payload.v);
  } catch (error) {
    if (error instanceof ProviderError && error.kind === "invalid_client") {
      await recordRejectedCredentials(db, events, client.id, error, now);
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
    const previous = await latestToken(db, client.id);
    // A new refresh token obtained without forcing the consent screen proves the account held no
    // live grant for this client (Google issues one only on the first consent): whatever we hold
    // belongs to another grant, and revoking it cannot touch the new one. Otherwise (no new
    // refresh token, or prompt=consent) the old and new tokens may be one grant: revoking either
    // would revoke both, so nothing is revoked.
    const distinctGrant = issued.refreshToken !== undefined && !payload.p;
    const holdsHealthyGrant = previous?.isValid === true && previous.status === "active";

    const missing = missingScopes(requestedScopes(client, provider), issued.scope);
    if (missing.length > 0) {
      await recordConsentProblem(db, client.id, "scopes_not_granted", `not granted: ${missing.join(" ")}`, now);
      // The partial grant is of no use; revoking it must not take a healthy grant of the same account with it.
      if (distinctGrant || !holdsHealthyGrant) later(discardIssued(provider, credentials, issued, client.id));
      throw new AppError(
        "authorization_denied",
        `Not every permission was granted (missing: ${missing.join(" ")}). Nothing was stored${holdsHealthyGrant ? "; the existing connection is kept" : ""}. Open the login link again and leave every permission ticked.`,
        { fields: { missing_scopes: missing } },
      );
    }
    if (issued.refreshToken === undefined && !previous?.refreshToken) {
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
    const stored = await storeTokens(db, keyring, events, client.id, issued, expiresAt, now, payload);
    if (!stored) {
      // Another consent for this branch stored first, or the links were revoked meanwhile.
      if (distinctGrant) later(discardIssued(provider, credentials, issued, client.id));
      throw supersededFlow();
    }
    // The new grant is stored: the one it replaced is revoked at the provider (best effort).
    if (previous && distinctGrant && (previous.refreshToken !== null || previous.isValid)) {
      later(revokeReplaced(keyring, provider, credentials, previous));
    }
    return { client, expiresAt, scope: issued.scope ?? null, hasRefreshToken: issued.refreshToken !== undefined };
  } finally {
    if (!defer) await Promise.all(background);
  }
}

/** The scopes the flow asks for: the client's own, else the configured ones. */
function requestedScopes(client: ClientRow, provider: Provider): string {
  return client.scopes ?? provider.defaultScopes;
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

async function latestToken(db: Db, clientId: number): Promise<TokenRow | undefined> {
  const [row] = await db.select().from(tokens).where(eq(tokens.clientId, clientId)).orderBy(desc(tokens.id)).limit(1);
  return row;
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

/**
 * One batch (one transaction). First the client row: it must still accept the flow's authority
 * (no link revoked, no other consent stored since), and `login_links_valid_after` moves past it,
 * which is what makes the link single use; the state nonce marks the row as ours. The next two
 * statements run only when that row carries our mark: the previous token stops being current and
 * the new one is inserted (carrying the previous refresh token over when none was sent). Returns
 * false when the first statement matched nothing: then nothing at all was written.
 */
async function storeTokens(
  db: Db,
  keyring: Keyring,
  events: EventContext,
  clientId: number,
  issued: IssuedTokens,
  expiresAt: Date,
  now: Date,
  payload: StatePayload,
): Promise<boolean> {
  const [accessToken, refreshToken] = await Promise.all([
    seal(keyring, issued.accessToken, { column: "tokens.access_token", clientId }),
    issued.refreshToken === undefined
      ? undefined
      : seal(keyring, issued.refreshToken, { column: "tokens.refresh_token", clientId }),
  ]);
  const authority = new Date(payload.a);
  const accepts = and(
    eq(clients.id, clientId),
    eq(clients.isActive, true),
    or(isNull(clients.loginLinksValidAfter), lte(clients.loginLinksValidAfter, authority)),
  );
  const validAfter = new Date(Math.max(now.getTime(), payload.a + 1));
  const ours = sql`exists (select 1 from ${clients} where ${clients.id} = ${clientId} and ${clients.lastStateNonce} = ${payload.n} and ${clients.loginLinksValidAfter} = ${validAfter.toISOString()}::timestamptz)`;
  const previousRefreshToken = sql`(select ${tokens.refreshToken} from ${tokens} where ${tokens.clientId} = ${clientId} order by ${tokens.id} desc limit 1)`;
  try {
    const [written, claimed] = await db.batch([
      consentEvent(db, events, clientId, accepts, now),
      db
        .update(clients)
        .set({
          loginLinksValidAfter: validAfter,
          lastStateNonce: payload.n,
          // The exchange just proved the credentials good, and this consent was complete.
          credentialsRejectedAt: null,
          consentProblem: null,
          consentProblemDetail: null,
          consentProblemAt: null,
        })
        .where(accepts)
        .returning({ id: clients.id }),
      db
        .update(tokens)
        .set({ isValid: false, leaseOwner: null, leaseExpiresAt: null })
        .where(and(eq(tokens.clientId, clientId), eq(tokens.isValid, true), ours)),
      db.execute(sql`insert into ${tokens} (
          ${sql.identifier(tokens.clientId.name)}, ${sql.identifier(tokens.accessToken.name)},
          ${sql.identifier(tokens.refreshToken.name)}, ${sql.identifier(tokens.tokenType.name)},
          ${sql.identifier(tokens.scope.name)}, ${sql.identifier(tokens.expiresAt.name)},
          ${sql.identifier(tokens.lifetimeSeconds.name)}, ${sql.identifier(tokens.lastRefreshedAt.name)},
          ${sql.identifier(tokens.status.name)}, ${sql.identifier(tokens.stateNonce.name)})
        select ${clientId}, ${accessToken}, ${refreshToken === undefined ? previousRefreshToken : refreshToken},
          ${issued.tokenType}, ${issued.scope ?? null}, ${expiresAt.toISOString()}::timestamptz,
          ${lifetimeOf(issued)}, ${now.toISOString()}::timestamptz, 'active', ${payload.n}
        where ${ours}`),
    ]);
    noteEvents(events, written);
    return claimed.length === 1;
  } catch (error) {
    if (sqlState(error) === "23505") {
      throw new AppError("invalid_state", "This sign-in was already completed. Start again from your login link.");
    }
    throw error;
  }
}

/**
 * connection.created (the client never had a token row) or connection.reauthorized (a new consent
 * replaced a grant, whatever became of it), decided in the database by the same condition as the
 * claim that follows it in the batch (`accepts`). It runs first, to read the status before the
 * batch changes it, and locks the client row so the claim sees the row it decided on.
 */
function consentEvent(db: Db, events: EventContext, clientId: number, accepts: SQL | undefined, now: Date) {
  const replaces = sql`exists (select 1 from ${tokens} where ${tokens.clientId} = ${clients.id})`;
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
 * The code exchange was refused with `invalid_client`: the client is flagged, and if that changes
 * the connection's status (connected, degraded, needs_reauth or never_connected before),
 * connection.credentials_rejected is written in the same statement.
 */
async function recordRejectedCredentials(
  db: Db,
  events: EventContext,
  clientId: number,
  error: ProviderError,
  now: Date,
): Promise<void> {
  // `p` is the row as the statement found it: the status before; the after status is the same
  // with the flag set.
  const before = currentStatusSql("p");
  const after = currentStatusSql("p", "true");
  const transition = sql`(${before} is distinct from ${after})`;
  const result = await withEvents(
    db,
    events,
    sql`update ${clients} c set credentials_rejected_at = ${now}, event_seq = c.event_seq + ${transition}::int
      from ${clients} p where p.id = c.id and c.id = ${clientId}
      returning c.id as client_id, c.branch_id, c.event_seq as seq,
        case when ${transition} then 'connection.credentials_rejected' end as event_type,
        ${before} as status_before, ${after} as status_after,
        left(${`at the code exchange: ${error.message}`}::text, 500) as reason`,
    now,
    "returned",
  );
  noteEvents(events, result);
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
