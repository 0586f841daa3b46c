import { expect } from "vitest";
import { loadKeyring, open, type SealPurpose } from "../../src/lib/crypto";
import { TEST_ENCRYPTION_KEY } from "./bindings";
import { Browser } from "./browser";
import { BASE, type CallOptions, call, json, testEnv, uniqueId } from "./helpers";

/**
 * Shared helpers for tests that need a branch connected through the real consent flow against the
 * local authorization server (dev/oauth-server): register at the provider and here, follow the
 * login link, let the provider auto-approve, call our callback with the browser's cookie.
 */

/** A redirect URI of the callback's shape; the test calls the callback itself, so the host need not answer. */
export const TEST_REDIRECT_URI = "http://127.0.0.1/token-management/auth/callback";
export const BINDING_COOKIE_NAME = "tm_oauth_binding";

// ---------- the authorization server's admin API ----------

/** Mirrors dev/oauth-server's Behavior (that module is Node code, not importable into workerd types). */
export interface ProviderBehavior {
  profile: "google" | "textbook";
  accessTokenTtlSeconds: number;
  rotateRefreshTokens: boolean;
  issueRefreshToken: boolean;
  tokenDelayMs: number;
  hang: boolean;
  failNext: { status: number; error?: string; count?: number } | null;
  authorizeError: string | null;
  account: string;
  untickedScopes: string[];
  issParameter: string | null;
  maxRefreshTokensPerAccount: number;
  /** OpenID Connect: the ID token's `iss` ("issuer", "bare" or a value), `aud` (null = the client id). */
  idTokenIssuer: string;
  idTokenAudience: string | null;
  /** Time-limited access: refresh tokens die this long after issue (refresh_token_expires_in is sent). */
  refreshTokenLifetimeSeconds: number | null;
  testingPublishingStatus: boolean;
}

export interface ProviderClientStats {
  tokenRequests: number;
  authorizationCodeGrants: number;
  refreshGrants: number;
  failedRequests: number;
  revocations: number;
  activeAccessTokens: number;
  activeRefreshTokens: number;
}

async function adminFetch(path: string, init: RequestInit = {}): Promise<Response> {
  return fetch(`${testEnv.OAUTH_SERVER_URL}${path}`, {
    ...init,
    headers: { "content-type": "application/json", ...init.headers },
  });
}

/** Registers (or re-registers: new secret, behaviour overrides cleared) a client at the provider. */
export async function registerProviderClient(
  oauthClientId: string,
  clientSecret: string,
  redirectUris: string[] = [TEST_REDIRECT_URI],
): Promise<void> {
  const response = await adminFetch("/admin/clients", {
    method: "POST",
    body: JSON.stringify({ client_id: oauthClientId, client_secret: clientSecret, redirect_uris: redirectUris }),
  });
  if (response.status !== 201) throw new Error(`registering at the provider failed: ${await response.text()}`);
}

/** Sets per-client behaviour at the provider (merged with earlier overrides). */
export async function setProviderBehavior(oauthClientId: string, behavior: Partial<ProviderBehavior>): Promise<void> {
  const response = await adminFetch(`/admin/clients/${encodeURIComponent(oauthClientId)}/behavior`, {
    method: "PUT",
    body: JSON.stringify(behavior),
  });
  if (!response.ok) throw new Error(`setting provider behaviour failed: ${await response.text()}`);
}

export async function clearProviderBehavior(oauthClientId: string): Promise<void> {
  const response = await adminFetch(`/admin/clients/${encodeURIComponent(oauthClientId)}/behavior`, {
    method: "DELETE",
  });
  if (!response.ok) throw new Error(`clearing provider behaviour failed: ${await response.text()}`);
}

export async function providerStats(oauthClientId: string): Promise<ProviderClientStats> {
  const response = await adminFetch(`/admin/clients/${encodeURIComponent(oauthClientId)}/stats`);
  if (!response.ok) throw new Error(`reading provider stats failed: ${await response.text()}`);
  return (await response.json()) as ProviderClientStats;
}

/** RFC 7662 introspection at the provider, authenticated as the client. */
export async function introspect(
  token: string,
  credentials: { oauthClientId: string; clientSecret: string },
): Promise<{ active: boolean; token_type?: string; client_id?: string; scope?: string }> {
  const response = await fetch(`${testEnv.OAUTH_SERVER_URL}/introspect`, {
    method: "POST",
    headers: { "content-type": "application/x-www-form-urlencoded" },
    body: new URLSearchParams({
      token,
      client_id: credentials.oauthClientId,
      client_secret: credentials.clientSecret,
    }),
  });
  if (!response.ok) throw new Error(`introspection failed: ${await response.text()}`);
  return (await response.json()) as { active: boolean };
}

// ---------- raw SQL against the local database ----------

/** Runs one statement over the local database's HTTP endpoint; values come back as text (or null). */
export async function sql(query: string, params: unknown[] = []): Promise<(string | null)[][]> {
  const response = await fetch(testEnv.NEON_LOCAL_FETCH_ENDPOINT as string, {
    method: "POST",
    headers: {
      "Neon-Connection-String": testEnv.TOKEN_MANAGEMENT_DATABASE_URL as string,
      "Neon-Array-Mode": "true",
      "Neon-Raw-Text-Output": "true",
    },
    body: JSON.stringify({ query, params }),
  });
  if (!response.ok) throw new Error(`SQL failed: ${await response.text()}`);
  return ((await response.json()) as { rows: (string | null)[][] }).rows;
}

export interface RawTokenRow {
  id: number;
  client_id: number;
  access_token: string;
  refresh_token: string | null;
  is_valid: boolean;
  status: string;
  scope: string | null;
  state_nonce: string | null;
  expires_at: string;
}

/** The client's token rows, oldest first, exactly as stored. */
export async function tokenRows(clientId: number): Promise<RawTokenRow[]> {
  const rows = await sql("select row_to_json(t)::text from tokens t where client_id = $1 order by id", [clientId]);
  return rows.map(([value]) => JSON.parse(value as string) as RawTokenRow);
}

export async function clientRow(clientId: number): Promise<Record<string, unknown> | undefined> {
  const rows = await sql("select row_to_json(c)::text from clients c where id = $1", [clientId]);
  return rows[0] ? (JSON.parse(rows[0][0] as string) as Record<string, unknown>) : undefined;
}

/** The row of the app a branch uses (its client id and sealed secret live there). */
export async function appRowOf(clientId: number): Promise<Record<string, unknown> | undefined> {
  const rows = await sql("select row_to_json(a)::text from apps a join clients c on c.app_id = a.id where c.id = $1", [
    clientId,
  ]);
  return rows[0] ? (JSON.parse(rows[0][0] as string) as Record<string, unknown>) : undefined;
}

/**
 * The user removes the app's access at the provider (Google's "Remove access"): every token of
 * that client dies there, so a refresh gets a real invalid_grant and the next consent a new
 * refresh token.
 */
export async function revokeAtProvider(oauthClientId: string): Promise<void> {
  const response = await fetch(
    `${testEnv.OAUTH_SERVER_URL}/admin/refresh-tokens/${encodeURIComponent(oauthClientId)}/revoke-all`,
    { method: "POST" },
  );
  if (!response.ok) throw new Error(`revoke-all failed: ${response.status}`);
}

/** Opens a value sealed by the Worker with the test encryption key. */
export async function unseal(envelope: string, purpose: SealPurpose): Promise<string> {
  return open(await loadKeyring(TEST_ENCRYPTION_KEY), envelope, purpose);
}

// ---------- registering a branch here ----------

export interface BranchOptions {
  oauthClientId?: string;
  clientSecret?: string;
  branchId?: string;
  redirectUri?: string;
  scopes?: string;
  workspaceEmail?: string;
  workspaceName?: string;
  providerResource?: string;
  /** Register the client at the provider too (default true). */
  atProvider?: boolean;
  /** Behaviour to set at the provider right after registering there. */
  providerBehavior?: Partial<ProviderBehavior>;
}

export interface RegisteredBranch {
  /** Internal id (the API's client_id). */
  clientId: number;
  branchId: string;
  oauthClientId: string;
  clientSecret: string;
  redirectUri: string;
  loginUrl: string;
}

export function newClientBody(options: BranchOptions = {}) {
  return {
    client_id: options.oauthClientId ?? uniqueId("oc"),
    client_secret: options.clientSecret ?? uniqueId("secret-value"),
    redirect_uri: options.redirectUri ?? TEST_REDIRECT_URI,
    branch_id: options.branchId ?? uniqueId("branch"),
    workspace_email: options.workspaceEmail ?? "ops@example.com",
    workspace_name: options.workspaceName ?? "Test Workspace",
    ...(options.scopes === undefined ? {} : { scopes: options.scopes }),
    ...(options.providerResource === undefined ? {} : { provider_resource: options.providerResource }),
  };
}

/** Registers the client at the provider (unless atProvider is false) and with POST /clients here. */
export async function registerBranch(options: BranchOptions = {}): Promise<RegisteredBranch> {
  const body = newClientBody(options);
  if (options.atProvider !== false) {
    await registerProviderClient(body.client_id, body.client_secret, [body.redirect_uri]);
    if (options.providerBehavior) await setProviderBehavior(body.client_id, options.providerBehavior);
  }
  const response = await postJson("/clients", body);
  if (response.status !== 201) throw new Error(`POST /clients failed: ${response.status} ${await response.text()}`);
  const created = await json<{ client_id: number; login_url: string }>(response);
  return {
    clientId: created.client_id,
    branchId: body.branch_id,
    oauthClientId: body.client_id,
    clientSecret: body.client_secret,
    redirectUri: body.redirect_uri,
    loginUrl: created.login_url,
  };
}

export function postJson(path: string, body: unknown, options: CallOptions = {}): Promise<Response> {
  return call(path, {
    key: "admin",
    ...options,
    method: options.method ?? "POST",
    headers: { "content-type": "application/json", ...options.headers },
    body: typeof body === "string" ? body : JSON.stringify(body),
  });
}

// ---------- the browser leg ----------

export interface LoginStart {
  response: Response;
  /** The provider's authorization URL we were redirected to. */
  authorizeUrl: URL;
  /** `name=value` for a Cookie header. */
  cookie: string;
  setCookie: string;
  browser: Browser;
}

/**
 * GETs a login link (or /oauth/login/{id} with options.key) in `browser` (a fresh one by default)
 * and reads the redirect and the cookie the browser will send to the callback.
 */
export async function startLogin(
  loginUrl: string,
  options: CallOptions = {},
  browser: Browser = new Browser(),
): Promise<LoginStart> {
  const response = await browser.open(loginUrl, options);
  if (response.status !== 302) throw new Error(`login link answered ${response.status}: ${await response.text()}`);
  const setCookie = response.headers.get("set-cookie") ?? "";
  if (!setCookie.includes(`${BINDING_COOKIE_NAME}=`)) throw new Error(`no binding cookie: ${setCookie}`);
  const cookie = browser.cookieHeader(`${browser.base}/auth/callback`);
  return { response, authorizeUrl: new URL(response.headers.get("location") ?? ""), cookie, setCookie, browser };
}

/** GETs the provider's /authorize (auto-approves) and returns where it redirects the browser back to. */
export async function authorizeAtProvider(authorizeUrl: URL | string, browser: Browser = new Browser()): Promise<URL> {
  const response = await browser.open(authorizeUrl);
  const location = response.headers.get("location");
  if (response.status !== 302 || !location) {
    throw new Error(`provider /authorize answered ${response.status}: ${await response.text()}`);
  }
  return new URL(location);
}

/**
 * Calls our callback with the query the provider redirected with: from `browser` (its cookies, as
 * a browser sends them), or with a hand-made Cookie header (another browser, a forged cookie) or none.
 */
export function callCallback(
  providerRedirect: URL | string,
  cookie: Browser | string | null,
  accept: "json" | "html" = "json",
  envOverrides?: CallOptions["envOverrides"],
): Promise<Response> {
  const search = new URL(providerRedirect).search;
  const headers: Record<string, string> = {
    accept: accept === "json" ? "application/json" : "text/html,application/xhtml+xml",
  };
  const options = { headers, ...(envOverrides ? { envOverrides } : {}) };
  if (cookie instanceof Browser) return cookie.open(`${cookie.base}/auth/callback${search}`, options);
  if (cookie) headers.cookie = cookie;
  return call(`${BASE}/auth/callback${search}`, options);
}

export interface BrowserFlow {
  start: LoginStart;
  providerRedirect: URL;
  callback: Response;
}

/**
 * Login link → provider → callback, whatever the outcome (no assertion on the callback).
 * options go to the login request; options.envOverrides to the callback too.
 */
export async function runBrowserFlow(
  loginUrl: string,
  accept: "json" | "html" = "json",
  options: CallOptions = {},
  browser: Browser = new Browser(),
): Promise<BrowserFlow> {
  const start = await startLogin(loginUrl, options, browser);
  const providerRedirect = await authorizeAtProvider(start.authorizeUrl, browser);
  const callback = await callCallback(providerRedirect, browser, accept, options.envOverrides);
  return { start, providerRedirect, callback };
}

export interface ConnectedBranch extends RegisteredBranch {
  /** The callback's JSON body. */
  callbackBody: {
    success: true;
    client_id: number;
    branch_id: string;
    expires_at: string;
    scope: string | null;
    refresh_token_received: boolean;
  };
}

/**
 * Registers a branch at the provider and here, then runs the whole consent flow and asserts that
 * the callback succeeded. Returns the ids and credentials (the secret as registered at both ends).
 */
export async function connectBranch(options: BranchOptions = {}): Promise<ConnectedBranch> {
  const branch = await registerBranch(options);
  const { callback } = await runBrowserFlow(branch.loginUrl);
  const text = await callback.text();
  expect(callback.status, text).toBe(200);
  return { ...branch, callbackBody: JSON.parse(text) };
}

/** Runs the flow again for an already-registered branch (a new login link) and asserts success. */
export async function reconnectBranch(branch: RegisteredBranch): Promise<ConnectedBranch["callbackBody"]> {
  const link = await call(`/clients/${branch.clientId}/login-url`, { key: "admin" });
  expect(link.status).toBe(200);
  const { callback } = await runBrowserFlow((await json<{ login_url: string }>(link)).login_url);
  const text = await callback.text();
  expect(callback.status, text).toBe(200);
  return JSON.parse(text);
}

/** The plaintext tokens currently stored (is_valid) for the client. */
export async function currentTokens(
  clientId: number,
): Promise<{ accessToken: string; refreshToken: string | null; row: RawTokenRow }> {
  const valid = (await tokenRows(clientId)).filter((row) => row.is_valid);
  if (valid.length !== 1) throw new Error(`expected one valid token row, found ${valid.length}`);
  const row = valid[0] as RawTokenRow;
  return {
    row,
    accessToken: await unseal(row.access_token, { column: "tokens.access_token", clientId }),
    refreshToken: row.refresh_token
      ? await unseal(row.refresh_token, { column: "tokens.refresh_token", clientId })
      : null,
  };
}
