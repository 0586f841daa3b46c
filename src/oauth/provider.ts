import * as oauth from "oauth4webapi";
import type { Config } from "../env";

/**
 * The provider side of the protocol, through oauth4webapi: each request builder paired with its
 * response processor, every call bounded by a timeout, every failure classified so callers can
 * tell a dead grant from an outage.
 */

export interface Provider {
  /** Which built-in profile it comes from (src/oauth/profiles.ts). */
  profile: "google" | "oauth2";
  as: oauth.AuthorizationServer;
  authorizationUrl: string;
  defaultScopes: string;
  extraAuthorizationParams: URLSearchParams;
  authMethod: Config["OAUTH_CLIENT_AUTH_METHOD"];
  timeoutMs: number;
  allowInsecureHttp: boolean;
  fetch: typeof fetch;
  /**
   * OpenID Connect: the flow also asks for `identityScopes`, the code exchange must return an ID
   * token (validated as OpenID Connect Core 3.1.3.7 says for the code flow) and the account's `sub`
   * names the grant. Off: one grant per consent.
   */
  openid: boolean;
  identityScopes: string;
}

export interface ClientCredentials {
  clientId: string;
  clientSecret: string;
}

export interface IssuedTokens {
  accessToken: string;
  refreshToken: string | undefined;
  tokenType: string;
  scope: string | undefined;
  /** Seconds; undefined when the provider did not say. */
  expiresIn: number | undefined;
  /** Time-limited access (Google's `refresh_token_expires_in`): seconds the refresh token has left. */
  refreshTokenExpiresIn?: number | undefined;
  /** The account that consented, from the validated ID token (OpenID Connect only). */
  account?: { subject: string; email: string | null } | undefined;
}

export type ProviderFailureKind =
  | "invalid_grant"
  | "invalid_client"
  | "rate_limited"
  | "server_error"
  | "timeout"
  | "network"
  | "rejected"
  | "invalid_response";

export class ProviderError extends Error {
  override readonly name = "ProviderError";
  constructor(
    readonly kind: ProviderFailureKind,
    message: string,
    readonly status?: number,
    readonly retryAfterSeconds?: number,
  ) {
    super(message);
  }

  /** The grant is still good: trying again later may succeed. */
  get transient(): boolean {
    return ["rate_limited", "server_error", "timeout", "network"].includes(this.kind);
  }
}

/** The `google` profile: the provider the OAUTH_* variables describe (Google's by default). */
export function providerFromConfig(config: Config, fetchImpl: typeof fetch = fetch): Provider {
  return {
    profile: "google",
    as: withIssuerAliases(
      {
        // Not the token URL's origin: Google's issuer (accounts.google.com) is another origin than
        // its token endpoint (oauth2.googleapis.com), and it sends `iss` in the authorization response.
        issuer: config.OAUTH_ISSUER,
        authorization_endpoint: config.OAUTH_AUTHORIZATION_URL,
        token_endpoint: config.OAUTH_TOKEN_URL,
        ...(config.OAUTH_REVOCATION_URL ? { revocation_endpoint: config.OAUTH_REVOCATION_URL } : {}),
      },
      // Google's ID tokens carry `iss` with or without the scheme (accounts.google.com), as its
      // OpenID Connect documentation warns: both name the configured issuer.
      [config.OAUTH_ISSUER.replace(/^https?:\/\//, "")],
    ),
    authorizationUrl: config.OAUTH_AUTHORIZATION_URL,
    defaultScopes: config.OAUTH_SCOPES,
    extraAuthorizationParams: new URLSearchParams(config.OAUTH_EXTRA_AUTHORIZATION_PARAMS),
    authMethod: config.OAUTH_CLIENT_AUTH_METHOD,
    timeoutMs: config.OAUTH_TIMEOUT_MS,
    allowInsecureHttp: config.OAUTH_ALLOW_INSECURE_HTTP,
    fetch: fetchImpl,
    openid: config.OAUTH_OPENID,
    identityScopes: config.OAUTH_OPENID ? "openid email" : "",
  };
}

/**
 * oauth4webapi's hook for an ID token `iss` other than the issuer (exported for openid-client, which
 * uses it for this very Google quirk; not in its type declarations).
 */
const EXPECTED_ISSUER = (oauth as unknown as { _expectedIssuer: symbol })._expectedIssuer;

/** An authorization server whose ID tokens may name it by `aliases` too. */
export function withIssuerAliases(as: oauth.AuthorizationServer, aliases: string[]): oauth.AuthorizationServer {
  const accepted = new Set([as.issuer, ...aliases]);
  return Object.assign(as, {
    [EXPECTED_ISSUER]: (result: { claims: { iss?: unknown } }) =>
      typeof result.claims.iss === "string" && accepted.has(result.claims.iss) ? result.claims.iss : as.issuer,
  });
}

/** The scopes a consent asks for: the branch's own or the provider's, plus the identity scopes. */
export function scopesToRequest(provider: Provider, scopes: string | null): string {
  const asked = (scopes ?? provider.defaultScopes).split(" ").filter(Boolean);
  for (const scope of provider.identityScopes.split(" ").filter(Boolean)) {
    if (!asked.includes(scope)) asked.push(scope);
  }
  return asked.join(" ");
}

export interface AuthorizationRequest {
  clientId: string;
  redirectUri: string;
  scopes: string;
  state: string;
  codeChallenge: string;
  /** OpenID Connect: the nonce the ID token must carry. */
  nonce?: string | undefined;
  /** The account expected to sign in (OpenID Connect `login_hint`: an email or a `sub`). */
  loginHint?: string | undefined;
  /** Ask the provider to show its consent screen again (`prompt=consent`). */
  forceConsent?: boolean;
}

export function buildAuthorizationUrl(provider: Provider, request: AuthorizationRequest): URL {
  const url = new URL(provider.authorizationUrl);
  for (const [name, value] of provider.extraAuthorizationParams) url.searchParams.set(name, value);
  url.searchParams.set("response_type", "code");
  url.searchParams.set("client_id", request.clientId);
  url.searchParams.set("redirect_uri", request.redirectUri);
  url.searchParams.set("scope", request.scopes);
  url.searchParams.set("state", request.state);
  url.searchParams.set("code_challenge", request.codeChallenge);
  url.searchParams.set("code_challenge_method", "S256");
  if (request.nonce !== undefined) url.searchParams.set("nonce", request.nonce);
  if (request.loginHint !== undefined) url.searchParams.set("login_hint", request.loginHint);
  if (request.forceConsent) {
    const prompts = new Set((url.searchParams.get("prompt") ?? "").split(" ").filter(Boolean));
    prompts.add("consent");
    url.searchParams.set("prompt", [...prompts].join(" "));
  }
  return url;
}

export async function createPkcePair(): Promise<{ verifier: string; challenge: string }> {
  const verifier = oauth.generateRandomCodeVerifier();
  return { verifier, challenge: await oauth.calculatePKCECodeChallenge(verifier) };
}

/**
 * RFC 9207: the `iss` of an authorization response, when there is one, must be the configured
 * issuer (a response from another authorization server is a mix-up). A missing `iss` is accepted:
 * not every provider sends it. Returns the unexpected value, or undefined when the response is fine.
 */
export function unexpectedIssuer(provider: Provider, params: URLSearchParams): string | undefined {
  const iss = params.get("iss");
  return iss === null || iss === provider.as.issuer ? undefined : iss;
}

export async function exchangeCode(
  provider: Provider,
  credentials: ClientCredentials,
  callbackParams: URLSearchParams,
  expectedState: string,
  redirectUri: string,
  codeVerifier: string,
  nonce?: string,
): Promise<IssuedTokens> {
  const client: oauth.Client = { client_id: credentials.clientId };
  let params: URLSearchParams;
  try {
    params = oauth.validateAuthResponse(provider.as, client, callbackParams, expectedState);
  } catch (error) {
    throw new ProviderError("rejected", `the authorization response was rejected: ${errorText(error)}`);
  }
  return callTokenEndpoint(provider, async (options) => {
    const response = await oauth.authorizationCodeGrantRequest(
      provider.as,
      client,
      clientAuth(provider, credentials),
      params,
      redirectUri,
      codeVerifier,
      options,
    );
    if (!provider.openid) return oauth.processAuthorizationCodeResponse(provider.as, client, response);
    // OpenID Connect Core 3.1.3.7 for the code flow: iss, aud (azp), exp, iat and the nonce are
    // checked; the signature may be left unchecked because the token came straight from the token
    // endpoint over TLS (http only for a local server, OAUTH_ALLOW_INSECURE_HTTP).
    const result = await oauth.processAuthorizationCodeResponse(provider.as, client, response, {
      expectedNonce: nonce ?? oauth.expectNoNonce,
      requireIdToken: true,
    });
    const claims = oauth.getValidatedIdTokenClaims(result)!;
    return Object.assign(result, {
      [ACCOUNT]: { subject: claims.sub, email: typeof claims.email === "string" ? claims.email : null },
    });
  });
}

/** Where callTokenEndpoint finds the account a code exchange validated. */
const ACCOUNT = Symbol("account");

export async function refreshGrant(
  provider: Provider,
  credentials: ClientCredentials,
  refreshToken: string,
): Promise<IssuedTokens> {
  const client: oauth.Client = { client_id: credentials.clientId };
  return callTokenEndpoint(provider, async (options) => {
    const response = await oauth.refreshTokenGrantRequest(
      provider.as,
      client,
      clientAuth(provider, credentials),
      refreshToken,
      options,
    );
    return oauth.processRefreshTokenResponse(provider.as, client, response);
  });
}

/** RFC 7009. Best effort: callers decide whether a failure matters. */
export async function revokeToken(
  provider: Provider,
  credentials: ClientCredentials,
  token: string,
  hint: "refresh_token" | "access_token",
): Promise<void> {
  if (!provider.as.revocation_endpoint) return;
  const client: oauth.Client = { client_id: credentials.clientId };
  await callTokenEndpoint(provider, async (options) => {
    const response = await oauth.revocationRequest(provider.as, client, clientAuth(provider, credentials), token, {
      ...options,
      additionalParameters: { token_type_hint: hint },
    });
    try {
      await oauth.processRevocationResponse(response);
    } catch (error) {
      // Google answers 400 invalid_token for a token it no longer knows: already revoked, the goal.
      if (!(error instanceof oauth.ResponseBodyError && error.error === "invalid_token")) throw error;
    }
    return { access_token: "unused", token_type: "bearer" } as oauth.TokenEndpointResponse;
  });
}

function clientAuth(provider: Provider, credentials: ClientCredentials): oauth.ClientAuth {
  return provider.authMethod === "client_secret_basic"
    ? oauth.ClientSecretBasic(credentials.clientSecret)
    : oauth.ClientSecretPost(credentials.clientSecret);
}

type RequestOptions = oauth.TokenEndpointRequestOptions;

async function callTokenEndpoint(
  provider: Provider,
  run: (options: RequestOptions) => Promise<oauth.TokenEndpointResponse>,
): Promise<IssuedTokens> {
  const options: RequestOptions = {
    signal: AbortSignal.timeout(provider.timeoutMs),
    [oauth.allowInsecureRequests]: provider.allowInsecureHttp,
    [oauth.customFetch]: provider.fetch,
  };
  let result: oauth.TokenEndpointResponse;
  try {
    result = await run(options);
  } catch (error) {
    throw classify(error, provider.timeoutMs);
  }
  return {
    accessToken: result.access_token,
    refreshToken: result.refresh_token,
    // oauth4webapi lower-cases it; callers put it in an Authorization header, where "Bearer" is the norm.
    tokenType: result.token_type.toLowerCase() === "bearer" ? "Bearer" : result.token_type,
    scope: result.scope,
    expiresIn: result.expires_in,
    refreshTokenExpiresIn: positiveNumber(result.refresh_token_expires_in),
    account: (result as { [ACCOUNT]?: IssuedTokens["account"] })[ACCOUNT],
  };
}

function positiveNumber(value: unknown): number | undefined {
  const n = typeof value === "string" ? Number(value) : value;
  return typeof n === "number" && Number.isFinite(n) && n > 0 ? n : undefined;
}

export function classify(error: unknown, timeoutMs: number): ProviderError {
  if (error instanceof ProviderError) return error;
  if (error instanceof oauth.ResponseBodyError) {
    return fromOAuthError(error.error, error.status, error.response);
  }
  if (error instanceof oauth.WWWAuthenticateChallengeError) {
    const challengeError = error.cause[0]?.parameters.error;
    return fromOAuthError(challengeError ?? "invalid_client", error.status, error.response);
  }
  const name = (error as { name?: string } | null)?.name;
  if (name === "TimeoutError" || name === "AbortError") {
    return new ProviderError("timeout", `the provider did not answer within ${timeoutMs} ms`);
  }
  if (error instanceof oauth.OperationProcessingError) {
    const response = (error.cause as { status?: number; headers?: Headers } | undefined) ?? {};
    const status = typeof response.status === "number" ? response.status : undefined;
    if (status === 429)
      return new ProviderError("rate_limited", "the provider is rate limiting", 429, retryAfter(response.headers));
    if (status !== undefined && status >= 500) {
      return new ProviderError(
        "server_error",
        `the provider answered HTTP ${status}`,
        status,
        retryAfter(response.headers),
      );
    }
    return new ProviderError("invalid_response", `the provider's answer was not valid: ${error.message}`, status);
  }
  if (error instanceof TypeError) return new ProviderError("network", `the provider is unreachable: ${error.message}`);
  return new ProviderError("network", `the provider call failed: ${errorText(error)}`);
}

function fromOAuthError(code: string, status: number, response: Response): ProviderError {
  if (code === "invalid_grant")
    return new ProviderError("invalid_grant", "the provider rejected the grant (invalid_grant)", status);
  if (code === "invalid_client" || code === "unauthorized_client") {
    return new ProviderError("invalid_client", `the provider rejected the client credentials (${code})`, status);
  }
  if (status === 429 || code === "slow_down" || code === "temporarily_unavailable") {
    return new ProviderError("rate_limited", `the provider is busy (${code})`, status, retryAfter(response.headers));
  }
  if (status >= 500 || code === "server_error")
    return new ProviderError("server_error", `the provider failed (${code})`, status, retryAfter(response.headers));
  return new ProviderError("rejected", `the provider rejected the request (${code})`, status);
}

function retryAfter(headers: Headers | undefined): number | undefined {
  const value = headers?.get("retry-after");
  if (!value) return undefined;
  const seconds = Number(value);
  return Number.isFinite(seconds) && seconds >= 0 ? seconds : undefined;
}

function errorText(error: unknown): string {
  return error instanceof Error ? error.message : String(error);
}
