import { and, eq, isNull, ne, notExists, or, sql } from "drizzle-orm";
import type { Db } from "../db/client";
import { type ClientRow, clients, tokens } from "../db/schema";
import { AppError, sqlState } from "../errors";
import { CryptoError, type Keyring, open, seal } from "../lib/crypto";
import { toBase64Url, utf8 } from "../lib/encoding";
import {
  buildAuthorizationUrl,
  createPkcePair,
  exchangeCode,
  type IssuedTokens,
  type Provider,
  ProviderError,
  unexpectedIssuer,
} from "../oauth/provider";
import { clientCredentials, clientNotFound } from "./clients";
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
}

export interface LoginStart {
  redirectTo: string;
  bindingCookie: string;
}

export async function startLogin(
  db: Db,
  keyring: Keyring,
  provider: Provider,
  clientId: number,
  existingBinding: string | undefined,
  now: Date,
): Promise<LoginStart> {
  const [client] = await db.select().from(clients).where(eq(clients.id, clientId));
  if (!client?.isActive) throw clientNotFound(clientId);
  // Reusing the browser's binding lets one operator connect several branches in parallel tabs.
  const binding = existingBinding && /^[A-Za-z0-9_-]{32,64}$/.test(existingBinding) ? existingBinding : randomToken();
  const pkce = await createPkcePair();
  const payload: StatePayload = {
    c: client.id,
    v: pkce.verifier,
    b: await sha256(binding),
    n: randomToken(),
    e: now.getTime() + STATE_TTL_SECONDS * 1000,
  };
  const state = await seal(keyring, JSON.stringify(payload), "oauth.state");
  const url = buildAuthorizationUrl(provider, {
    clientId: client.clientId,
    redirectUri: client.redirectUri,
    scopes: client.scopes ?? provider.defaultScopes,
    state,
    codeChallenge: pkce.challenge,
  });
  return { redirectTo: url.toString(), bindingCookie: binding };
}

export interface CallbackResult {
  client: ClientRow;
  expiresAt: Date;
  scope: string | null;
  hasRefreshToken: boolean;
}

export async function completeLogin(
  db: Db,
  keyring: Keyring,
  provider: Provider,
  params: URLSearchParams,
  binding: string | undefined,
  now: Date,
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

  let issued: IssuedTokens;
  const sentAt = new Date(now.getTime() + (Date.now() - started));
  try {
    issued = await exchangeCode(
      provider,
      await clientCredentials(keyring, client),
      params,
      state,
      client.redirectUri,
      payload.v,
    );
  } catch (error) {
    if (error instanceof ProviderError && error.kind === "invalid_client") {
      await db.update(clients).set({ credentialsRejectedAt: now }).where(eq(clients.id, client.id));
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
  const expiresAt = expiryOf(issued, sentAt);
  await storeTokens(db, keyring, client.id, issued, expiresAt, now, payload.n);
  return { client, expiresAt, scope: issued.scope ?? null, hasRefreshToken: issued.refreshToken !== undefined };
}

/**
 * One batch (one transaction): the previous token stops being current, the new one is inserted.
 * When the provider sent no refresh token, the previous one is carried over.
 */
async function storeTokens(
  db: Db,
  keyring: Keyring,
  clientId: number,
  issued: IssuedTokens,
  expiresAt: Date,
  now: Date,
  stateNonce: string,
): Promise<void> {
  const [accessToken, refreshToken] = await Promise.all([
    seal(keyring, issued.accessToken, { column: "tokens.access_token", clientId }),
    issued.refreshToken === undefined
      ? undefined
      : seal(keyring, issued.refreshToken, { column: "tokens.refresh_token", clientId }),
  ]);
  const previousRefreshToken = sql`(select ${tokens.refreshToken} from ${tokens} where ${tokens.clientId} = ${clientId} order by ${tokens.id} desc limit 1)`;
  try {
    await db.batch([
      db
        .update(tokens)
        .set({ isValid: false, leaseOwner: null, leaseExpiresAt: null })
        .where(and(eq(tokens.clientId, clientId), eq(tokens.isValid, true))),
      // The exchange just proved the credentials good.
      db.update(clients).set({ credentialsRejectedAt: null }).where(eq(clients.id, clientId)),
      db.insert(tokens).values({
        clientId,
        accessToken,
        refreshToken: refreshToken ?? previousRefreshToken,
        tokenType: issued.tokenType,
        scope: issued.scope ?? null,
        expiresAt,
        lifetimeSeconds: lifetimeOf(issued),
        lastRefreshedAt: now,
        status: "active",
        stateNonce,
      }),
    ]);
  } catch (error) {
    if (sqlState(error) === "23505") {
      throw new AppError("invalid_state", "This sign-in was already completed. Start again from your login link.");
    }
    throw error;
  }
}

/**
 * A state is usable once. One statement claims it on the client row, refusing a state that is
 * already claimed (a concurrent or repeated callback) or that already produced tokens.
 */
async function claimState(db: Db, payload: StatePayload): Promise<ClientRow> {
  const [claimed] = await db
    .update(clients)
    .set({ lastStateNonce: payload.n })
    .where(
      and(
        eq(clients.id, payload.c),
        eq(clients.isActive, true),
        or(isNull(clients.lastStateNonce), ne(clients.lastStateNonce, payload.n)),
        notExists(db.select({ id: tokens.id }).from(tokens).where(eq(tokens.stateNonce, payload.n))),
      ),
    )
    .returning();
  if (claimed) return claimed;
  const [client] = await db.select({ isActive: clients.isActive }).from(clients).where(eq(clients.id, payload.c));
  if (!client?.isActive) throw clientNotFound(payload.c);
  throw new AppError("invalid_state", "This sign-in was already used. Start again from your login link.");
}

async function openState(keyring: Keyring, state: string): Promise<StatePayload> {
  try {
    const payload = JSON.parse(await open(keyring, state, "oauth.state")) as StatePayload;
    if (typeof payload.c !== "number" || typeof payload.e !== "number") throw new CryptoError("bad payload");
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
