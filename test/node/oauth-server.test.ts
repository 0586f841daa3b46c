import { createRemoteJWKSet, decodeJwt, decodeProtectedHeader, errors as joseErrors, jwtVerify } from "jose";
import * as oauth from "oauth4webapi";
import { afterAll, beforeAll, beforeEach, describe, expect, it } from "vitest";
import { accountSubject } from "../../dev/oauth-server/risc.ts";
import { type OAuthServer, startOAuthServer } from "../../dev/oauth-server/server.ts";

const REDIRECT = "http://127.0.0.1:8787/callback";
const insecure = { [oauth.allowInsecureRequests]: true } as const;

let srv: OAuthServer;
let as: oauth.AuthorizationServer;

beforeAll(async () => {
  srv = await startOAuthServer();
  as = {
    issuer: srv.issuer,
    authorization_endpoint: srv.authorizationEndpoint,
    token_endpoint: srv.tokenEndpoint,
    revocation_endpoint: srv.revocationEndpoint,
  };
});
afterAll(() => srv.close());

beforeEach(async () => {
  await admin("POST", "/admin/reset");
  await register("app", "s3cret");
  await register("other", "other-secret");
});

async function admin(method: string, path: string, body?: unknown) {
  const res = await fetch(srv.url + path, {
    method,
    headers: body === undefined ? {} : { "content-type": "application/json" },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  return { status: res.status, json: res.status === 200 || res.status === 201 ? await res.json() : await res.text() };
}
const register = (client_id: string, client_secret: string, redirect_uris = [REDIRECT]) =>
  admin("POST", "/admin/clients", { client_id, client_secret, redirect_uris });
const behave = (clientId: string, b: Record<string, unknown>) => admin("PUT", `/admin/clients/${clientId}/behavior`, b);
const stats = async (clientId?: string) =>
  (await admin("GET", clientId ? `/admin/clients/${clientId}/stats` : "/admin/stats")).json as Record<string, number>;

const clientOf = (id: string): oauth.Client => ({ client_id: id });
const basic = (secret: string) => oauth.ClientSecretBasic(secret);

interface AuthorizeOptions {
  clientId?: string;
  redirectUri?: string;
  scope?: string;
  verifier?: string;
  extra?: Record<string, string>;
  omit?: string[];
}

/** Runs GET /authorize and returns the raw response (redirects are not followed). */
async function authorizeRaw(o: AuthorizeOptions = {}) {
  const verifier = o.verifier ?? oauth.generateRandomCodeVerifier();
  const state = oauth.generateRandomState();
  const params: Record<string, string> = {
    response_type: "code",
    client_id: o.clientId ?? "app",
    redirect_uri: o.redirectUri ?? REDIRECT,
    scope: o.scope ?? "openid email",
    state,
    code_challenge: await oauth.calculatePKCECodeChallenge(verifier),
    code_challenge_method: "S256",
    access_type: "offline",
    prompt: "consent",
    ...o.extra,
  };
  for (const k of o.omit ?? []) delete params[k];
  const res = await fetch(`${srv.authorizationEndpoint}?${new URLSearchParams(params)}`, { redirect: "manual" });
  return { res, state, verifier };
}

/** Authorization request + callback validation: returns the callback parameters, state and verifier. */
async function authorize(o: AuthorizeOptions = {}) {
  const { res, state, verifier } = await authorizeRaw(o);
  expect(res.status).toBe(302);
  const location = new URL(res.headers.get("location") ?? "");
  expect(location.origin + location.pathname).toBe(o.redirectUri ?? REDIRECT);
  const params = oauth.validateAuthResponse(as, clientOf(o.clientId ?? "app"), location, state);
  return { params, state, verifier };
}

async function codeFlow(clientId = "app", secret = "s3cret", scope = "openid email") {
  const { params, verifier } = await authorize({ clientId, scope });
  const res = await oauth.authorizationCodeGrantRequest(
    as,
    clientOf(clientId),
    basic(secret),
    params,
    REDIRECT,
    verifier,
    insecure,
  );
  return oauth.processAuthorizationCodeResponse(as, clientOf(clientId), res);
}

async function refresh(refreshToken: string, clientId = "app", secret = "s3cret", auth = basic(secret)) {
  const res = await oauth.refreshTokenGrantRequest(as, clientOf(clientId), auth, refreshToken, insecure);
  return oauth.processRefreshTokenResponse(as, clientOf(clientId), res);
}

async function rawRefresh(refreshToken: string, clientId = "app", secret = "s3cret") {
  return oauth.refreshTokenGrantRequest(as, clientOf(clientId), basic(secret), refreshToken, insecure);
}

async function introspect(token: string) {
  const res = await fetch(`${srv.url}/introspect`, {
    method: "POST",
    headers: { "content-type": "application/x-www-form-urlencoded" },
    body: new URLSearchParams({ token, client_id: "app", client_secret: "s3cret" }),
  });
  expect(res.status).toBe(200);
  return (await res.json()) as {
    active: boolean;
    client_id?: string;
    scope?: string;
    exp?: number;
    token_type?: string;
  };
}

async function expectOAuthError(p: Promise<unknown>, error: string, status?: number) {
  const e = await p.then(
    () => null,
    (err: unknown) => err,
  );
  expect(e).toBeInstanceOf(oauth.ResponseBodyError);
  const rbe = e as oauth.ResponseBodyError;
  expect(rbe.error).toBe(error);
  if (status !== undefined) expect(rbe.status).toBe(status);
}

async function postForm(path: string, form: Record<string, string>, headers: Record<string, string> = {}) {
  return fetch(srv.url + path, {
    method: "POST",
    headers: { "content-type": "application/x-www-form-urlencoded", ...headers },
    body: new URLSearchParams(form),
  });
}

describe("authorization code flow with PKCE", () => {
  it("issues tokens via client_secret_basic, valid at introspection", async () => {
    const tokens = await codeFlow();
    expect(tokens.access_token).toMatch(/^at_/);
    expect(tokens.refresh_token).toMatch(/^rt_/);
    expect(tokens.token_type).toBe("bearer"); // oauth4webapi lower-cases it
    expect(tokens.expires_in).toBe(3600);
    expect(tokens.scope).toBe("openid email");
    const info = await introspect(tokens.access_token);
    expect(info).toMatchObject({ active: true, client_id: "app", scope: "openid email", token_type: "Bearer" });
    expect(info.exp).toBeGreaterThan(Date.now() / 1000 + 3500);
  });

  it("supports client_secret_post and sends no-store", async () => {
    const { params, verifier } = await authorize();
    const res = await oauth.authorizationCodeGrantRequest(
      as,
      clientOf("app"),
      oauth.ClientSecretPost("s3cret"),
      params,
      REDIRECT,
      verifier,
      insecure,
    );
    expect(res.headers.get("cache-control")).toBe("no-store");
    const tokens = await oauth.processAuthorizationCodeResponse(as, clientOf("app"), res);
    expect(tokens.access_token).toMatch(/^at_/);
  });

  it("handles client ids/secrets that need form-urlencoding in Basic auth", async () => {
    await register("weird id:é", "p@ss:w%rd+");
    const tokens = await codeFlow("weird id:é", "p@ss:w%rd+");
    expect(tokens.access_token).toBeTruthy();
  });

  it("passes state back verbatim and keeps the redirect_uri's own query", async () => {
    const withQuery = "http://127.0.0.1:8787/cb?tenant=a%20b";
    await register("q", "x", [withQuery]);
    const { res } = await authorizeRaw({
      clientId: "q",
      redirectUri: withQuery,
      extra: { state: "a b&c=d/é", foo: "ignored" },
    });
    expect(res.status).toBe(302);
    const loc = new URL(res.headers.get("location") ?? "");
    expect(loc.searchParams.get("state")).toBe("a b&c=d/é");
    expect(loc.searchParams.get("tenant")).toBe("a b");
    expect(loc.searchParams.get("code")).toMatch(/^code_/);
  });

  it("rejects a wrong client secret with 401 invalid_client and WWW-Authenticate", async () => {
    const { params, verifier } = await authorize();
    const res = await oauth.authorizationCodeGrantRequest(
      as,
      clientOf("app"),
      basic("wrong"),
      params,
      REDIRECT,
      verifier,
      insecure,
    );
    expect(res.status).toBe(401);
    expect(res.headers.get("www-authenticate")).toMatch(/^Basic/);
    // oauth4webapi surfaces a 401 carrying WWW-Authenticate as a challenge error, not a body error.
    const err = await oauth.processAuthorizationCodeResponse(as, clientOf("app"), res).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(oauth.WWWAuthenticateChallengeError);
    expect((err as oauth.WWWAuthenticateChallengeError).cause[0]?.scheme).toBe("basic");
    expect(await (err as oauth.WWWAuthenticateChallengeError).response.json()).toMatchObject({
      error: "invalid_client",
    });
    // client_secret_post: still 401 invalid_client
    const r2 = await postForm("/token", {
      grant_type: "refresh_token",
      refresh_token: "x",
      client_id: "app",
      client_secret: "no",
    });
    expect(r2.status).toBe(401);
    expect(await r2.json()).toMatchObject({ error: "invalid_client" });
    const r3 = await postForm("/token", { grant_type: "refresh_token", refresh_token: "x" });
    expect(r3.status).toBe(401);
  });

  it("never redirects to an unregistered redirect_uri or for an unknown client", async () => {
    const bad = await authorizeRaw({ redirectUri: "http://evil.example/callback" });
    expect(bad.res.status).toBe(400);
    expect(bad.res.headers.get("location")).toBeNull();
    expect(bad.res.headers.get("content-type")).toMatch(/text\/html/);
    const prefix = await authorizeRaw({ redirectUri: `${REDIRECT}/extra` });
    expect(prefix.res.status).toBe(400);
    const unknown = await authorizeRaw({ clientId: "nobody" });
    expect(unknown.res.status).toBe(400);
    expect(unknown.res.headers.get("location")).toBeNull();
  });

  it("redirects back with errors for missing PKCE or wrong response_type", async () => {
    const cases: Array<[AuthorizeOptions, string]> = [
      [{ omit: ["code_challenge"] }, "invalid_request"],
      [{ extra: { code_challenge_method: "plain" } }, "invalid_request"],
      [{ extra: { response_type: "token" } }, "unsupported_response_type"],
    ];
    for (const [o, error] of cases) {
      const { res, state } = await authorizeRaw(o);
      expect(res.status).toBe(302);
      const loc = new URL(res.headers.get("location") ?? "");
      expect(loc.searchParams.get("error")).toBe(error);
      expect(loc.searchParams.get("state")).toBe(state);
      expect(() => oauth.validateAuthResponse(as, clientOf("app"), loc, state)).toThrow(
        oauth.AuthorizationResponseError,
      );
    }
  });

  it("rejects a token request whose redirect_uri differs from the authorization request", async () => {
    await register("two", "x", [REDIRECT, "http://127.0.0.1:8787/other"]);
    const { params, verifier } = await authorize({ clientId: "two" });
    const res = await oauth.authorizationCodeGrantRequest(
      as,
      clientOf("two"),
      basic("x"),
      params,
      "http://127.0.0.1:8787/other",
      verifier,
      insecure,
    );
    await expectOAuthError(oauth.processAuthorizationCodeResponse(as, clientOf("two"), res), "invalid_grant", 400);
  });

  it("rejects a bad PKCE verifier", async () => {
    const { params } = await authorize();
    const res = await oauth.authorizationCodeGrantRequest(
      as,
      clientOf("app"),
      basic("s3cret"),
      params,
      REDIRECT,
      oauth.generateRandomCodeVerifier(),
      insecure,
    );
    await expectOAuthError(oauth.processAuthorizationCodeResponse(as, clientOf("app"), res), "invalid_grant", 400);
  });

  it("rejects a code presented by another client", async () => {
    const { params, verifier } = await authorize();
    const res = await oauth.authorizationCodeGrantRequest(
      as,
      clientOf("other"),
      basic("other-secret"),
      params,
      REDIRECT,
      verifier,
      insecure,
    );
    await expectOAuthError(oauth.processAuthorizationCodeResponse(as, clientOf("other"), res), "invalid_grant");
  });

  it("treats a replayed code as an attack: invalid_grant and tokens from it revoked", async () => {
    const { params, verifier } = await authorize();
    const grant = () =>
      oauth.authorizationCodeGrantRequest(as, clientOf("app"), basic("s3cret"), params, REDIRECT, verifier, insecure);
    const tokens = await oauth.processAuthorizationCodeResponse(as, clientOf("app"), await grant());
    const refreshed = await refresh(tokens.refresh_token ?? "");
    expect((await introspect(tokens.access_token)).active).toBe(true);
    await expectOAuthError(oauth.processAuthorizationCodeResponse(as, clientOf("app"), await grant()), "invalid_grant");
    expect((await introspect(tokens.access_token)).active).toBe(false);
    expect((await introspect(refreshed.access_token)).active).toBe(false);
    await expectOAuthError(refresh(tokens.refresh_token ?? ""), "invalid_grant");
  });

  it("rejects unsupported grant types, missing parameters, wrong content-type, duplicates and bad methods", async () => {
    const auth = { client_id: "app", client_secret: "s3cret" };
    const r1 = await postForm("/token", { ...auth, grant_type: "password" });
    expect(r1.status).toBe(400);
    expect(await r1.json()).toMatchObject({ error: "unsupported_grant_type" });
    const r2 = await postForm("/token", { ...auth, grant_type: "authorization_code", redirect_uri: REDIRECT });
    expect(await r2.json()).toMatchObject({ error: "invalid_request" });
    const r3 = await fetch(srv.tokenEndpoint, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ ...auth, grant_type: "refresh_token" }),
    });
    expect(r3.status).toBe(400);
    expect(await r3.json()).toMatchObject({ error: "invalid_request" });
    const r4 = await fetch(srv.tokenEndpoint, {
      method: "POST",
      headers: { "content-type": "application/x-www-form-urlencoded" },
      body: "grant_type=refresh_token&grant_type=refresh_token&client_id=app&client_secret=s3cret&refresh_token=x",
    });
    expect(await r4.json()).toMatchObject({ error: "invalid_request" });
    const r5 = await fetch(srv.tokenEndpoint);
    expect(r5.status).toBe(405);
    expect(r5.headers.get("allow")).toBe("POST");
    const r6 = await fetch(`${srv.url}/nope`);
    expect(r6.status).toBe(404);
    expect(await r6.json()).toMatchObject({ error: "not_found" });
  });

  it("serves RFC 8414 metadata usable by oauth4webapi discovery, with an issuer on another origin", async () => {
    // The issuer (localhost) is another origin than the endpoints (127.0.0.1), as Google's is.
    expect(new URL(srv.issuer).origin).not.toBe(new URL(srv.tokenEndpoint).origin);
    const res = await fetch(`${srv.url}/.well-known/oauth-authorization-server`);
    const meta = await oauth.processDiscoveryResponse(new URL(srv.issuer), res);
    expect(meta.token_endpoint).toBe(srv.tokenEndpoint);
    expect(meta.authorization_response_iss_parameter_supported).toBe(true);
    expect(meta.code_challenge_methods_supported).toEqual(["S256"]);
  });
});

describe("refresh tokens", () => {
  it("without rotation (default, like Google): no new refresh_token, old one keeps working", async () => {
    const tokens = await codeFlow();
    const rt = tokens.refresh_token ?? "";
    const r1 = await refresh(rt);
    expect(r1.refresh_token).toBeUndefined();
    expect(r1.access_token).not.toBe(tokens.access_token);
    const r2 = await refresh(rt, "app", "s3cret", oauth.ClientSecretPost("s3cret"));
    expect(r2.access_token).toMatch(/^at_/);
    expect((await introspect(r1.access_token)).active).toBe(true);
  });

  it("with rotation: new refresh_token each time, old one rejected", async () => {
    await behave("app", { rotateRefreshTokens: true });
    const tokens = await codeFlow();
    const r1 = await refresh(tokens.refresh_token ?? "");
    expect(r1.refresh_token).toMatch(/^rt_/);
    expect(r1.refresh_token).not.toBe(tokens.refresh_token);
    await expectOAuthError(refresh(tokens.refresh_token ?? ""), "invalid_grant", 400);
    const r2 = await refresh(r1.refresh_token ?? "");
    expect(r2.refresh_token).toBeTruthy();
  });

  it("narrows scope on request and refuses widening", async () => {
    const tokens = await codeFlow("app", "s3cret", "openid email profile");
    const res = await postForm("/token", {
      grant_type: "refresh_token",
      refresh_token: tokens.refresh_token ?? "",
      scope: "email",
      client_id: "app",
      client_secret: "s3cret",
    });
    expect(await res.json()).toMatchObject({ scope: "email" });
    const wider = await postForm("/token", {
      grant_type: "refresh_token",
      refresh_token: tokens.refresh_token ?? "",
      scope: "email admin",
      client_id: "app",
      client_secret: "s3cret",
    });
    expect(wider.status).toBe(400);
    expect(await wider.json()).toMatchObject({ error: "invalid_scope" });
  });

  it("rejects a refresh token of another client", async () => {
    const tokens = await codeFlow();
    await expectOAuthError(refresh(tokens.refresh_token ?? "", "other", "other-secret"), "invalid_grant");
  });

  it("honours issueRefreshToken=false and accessTokenTtlSeconds", async () => {
    await behave("app", { issueRefreshToken: false, accessTokenTtlSeconds: 1 });
    const tokens = await codeFlow();
    expect(tokens.refresh_token).toBeUndefined();
    expect(tokens.expires_in).toBe(1);
    expect((await introspect(tokens.access_token)).active).toBe(true);
    await new Promise((r) => setTimeout(r, 1100));
    expect((await introspect(tokens.access_token)).active).toBe(false);
  });

  it("revoke-all simulates the user revoking access at the provider", async () => {
    const a = await codeFlow();
    const b = await codeFlow();
    const o = await codeFlow("other", "other-secret");
    const { json } = await admin("POST", "/admin/refresh-tokens/app/revoke-all");
    expect(json).toEqual({ revoked: 2 });
    await expectOAuthError(refresh(a.refresh_token ?? ""), "invalid_grant");
    await expectOAuthError(refresh(b.refresh_token ?? ""), "invalid_grant");
    expect((await introspect(a.access_token)).active).toBe(false);
    expect((await refresh(o.refresh_token ?? "", "other", "other-secret")).access_token).toBeTruthy();
  });
});

describe("revocation (RFC 7009)", () => {
  it("revoking a refresh token cascades to access tokens issued from it", async () => {
    const tokens = await codeFlow();
    const r1 = await refresh(tokens.refresh_token ?? "");
    const res = await oauth.revocationRequest(as, clientOf("app"), basic("s3cret"), tokens.refresh_token ?? "", {
      ...insecure,
      additionalParameters: { token_type_hint: "refresh_token" },
    });
    await oauth.processRevocationResponse(res);
    expect((await introspect(tokens.access_token)).active).toBe(false);
    expect((await introspect(r1.access_token)).active).toBe(false);
    expect((await introspect(tokens.refresh_token ?? "")).active).toBe(false);
    await expectOAuthError(refresh(tokens.refresh_token ?? ""), "invalid_grant");
  });

  it("revoking an access token leaves the refresh token alone; unknown tokens get 200", async () => {
    const tokens = await codeFlow();
    await oauth.processRevocationResponse(
      await oauth.revocationRequest(
        as,
        clientOf("app"),
        oauth.ClientSecretPost("s3cret"),
        tokens.access_token,
        insecure,
      ),
    );
    expect((await introspect(tokens.access_token)).active).toBe(false);
    expect((await introspect(tokens.refresh_token ?? "")).active).toBe(true);
    const unknown = await oauth.revocationRequest(as, clientOf("app"), basic("s3cret"), "rt_nope", insecure);
    expect(unknown.status).toBe(200);
  });

  it("requires client authentication and does not let another client revoke", async () => {
    const tokens = await codeFlow();
    const bad = await oauth.revocationRequest(as, clientOf("app"), basic("wrong"), tokens.access_token, insecure);
    expect(bad.status).toBe(401);
    const other = await oauth.revocationRequest(
      as,
      clientOf("other"),
      basic("other-secret"),
      tokens.access_token,
      insecure,
    );
    expect(other.status).toBe(200);
    expect((await introspect(tokens.access_token)).active).toBe(true);
  });
});

describe("fault injection", () => {
  it.each([
    [{ status: 500 }, "server_error"],
    [{ status: 503 }, "temporarily_unavailable"],
    [{ status: 429 }, "temporarily_unavailable"],
    [{ status: 400, error: "invalid_grant" }, "invalid_grant"],
    [{ status: 401, error: "invalid_client" }, "invalid_client"],
  ])("failNext %j", async (failNext, error) => {
    const tokens = await codeFlow();
    await behave("app", { failNext: { ...failNext, count: 2 } });
    for (let i = 0; i < 2; i++) {
      const res = await rawRefresh(tokens.refresh_token ?? "");
      expect(res.status).toBe(failNext.status);
      expect(res.headers.get("cache-control")).toBe("no-store");
      if (failNext.status === 429) expect(res.headers.get("retry-after")).toBe("1");
      expect(await res.json()).toMatchObject({ error });
    }
    // count exhausted: back to normal, and the real token still works
    expect((await refresh(tokens.refresh_token ?? "")).access_token).toBeTruthy();
    expect((await admin("GET", "/admin/clients/app/behavior")).json).toMatchObject({ failNext: null });
  });

  it("failNext without count lasts until cleared", async () => {
    const tokens = await codeFlow();
    await behave("app", { failNext: { status: 500 } });
    for (let i = 0; i < 3; i++) expect((await rawRefresh(tokens.refresh_token ?? "")).status).toBe(500);
    await behave("app", { failNext: null });
    expect((await rawRefresh(tokens.refresh_token ?? "")).status).toBe(200);
  });

  it("authorizeError redirects back with the error and state", async () => {
    await behave("app", { authorizeError: "access_denied" });
    const { res, state } = await authorizeRaw();
    const loc = new URL(res.headers.get("location") ?? "");
    expect(loc.searchParams.get("error")).toBe("access_denied");
    expect(loc.searchParams.get("state")).toBe(state);
    expect(loc.searchParams.get("code")).toBeNull();
  });

  it("tokenDelayMs delays /token answers", async () => {
    const tokens = await codeFlow();
    await behave("app", { tokenDelayMs: 300 });
    const t0 = performance.now();
    await refresh(tokens.refresh_token ?? "");
    expect(performance.now() - t0).toBeGreaterThanOrEqual(280);
  });

  it("hang holds /token until the behaviour changes", async () => {
    const tokens = await codeFlow();
    await behave("app", { hang: true });
    let settled = false;
    const pending = rawRefresh(tokens.refresh_token ?? "").then((r) => {
      settled = true;
      return r;
    });
    await new Promise((r) => setTimeout(r, 300));
    expect(settled).toBe(false);
    await behave("app", { hang: false });
    expect((await pending).status).toBe(200);
  });

  it("hang + close: pending requests are destroyed and close resolves promptly", async () => {
    const own = await startOAuthServer();
    await fetch(`${own.url}/admin/behavior`, {
      method: "PUT",
      body: JSON.stringify({ hang: true, tokenDelayMs: 60_000 }),
    });
    const pending = fetch(own.tokenEndpoint, {
      method: "POST",
      headers: { "content-type": "application/x-www-form-urlencoded" },
      body: "grant_type=refresh_token&refresh_token=x&client_id=a&client_secret=b",
    }).then(
      () => "answered",
      () => "failed",
    );
    await new Promise((r) => setTimeout(r, 100));
    const t0 = performance.now();
    await own.close();
    expect(performance.now() - t0).toBeLessThan(1000);
    expect(await pending).toBe("failed");
    // a delayed (not hanging) request is also cut off and its timer cleared
    const own2 = await startOAuthServer();
    await fetch(`${own2.url}/admin/behavior`, { method: "PUT", body: JSON.stringify({ tokenDelayMs: 60_000 }) });
    const p2 = fetch(own2.tokenEndpoint, {
      method: "POST",
      headers: { "content-type": "application/x-www-form-urlencoded" },
      body: "grant_type=x",
    }).then(
      () => "answered",
      () => "failed",
    );
    await new Promise((r) => setTimeout(r, 100));
    await own2.close();
    expect(await p2).toBe("failed");
  });

  it("behaviour is per client, with a global default that per-client overrides win over", async () => {
    const a = await codeFlow();
    const o = await codeFlow("other", "other-secret");
    await behave("app", { failNext: { status: 500 } });
    expect((await rawRefresh(o.refresh_token ?? "", "other", "other-secret")).status).toBe(200);
    expect((await rawRefresh(a.refresh_token ?? "")).status).toBe(500);
    await admin("PUT", "/admin/behavior", { accessTokenTtlSeconds: 42, failNext: { status: 429, count: 1 } });
    // "app" has its own failNext override (500) which wins; its TTL comes from the default.
    expect((await rawRefresh(a.refresh_token ?? "")).status).toBe(500);
    expect((await rawRefresh(o.refresh_token ?? "", "other", "other-secret")).status).toBe(429);
    const r = await refresh(o.refresh_token ?? "", "other", "other-secret");
    expect(r.expires_in).toBe(42);
    await behave("app", { failNext: null });
    expect((await refresh(a.refresh_token ?? "")).expires_in).toBe(42);
    // DELETE clears the overrides
    await behave("app", { accessTokenTtlSeconds: 7 });
    expect((await refresh(a.refresh_token ?? "")).expires_in).toBe(7);
    await admin("DELETE", "/admin/clients/app/behavior");
    expect((await refresh(a.refresh_token ?? "")).expires_in).toBe(42);
  });

  it("validates behaviour payloads", async () => {
    expect((await behave("app", { hang: "yes" })).status).toBe(400);
    expect((await behave("app", { failNext: { status: 99 } })).status).toBe(400);
    expect((await behave("app", { bogus: 1 })).status).toBe(400);
    expect((await behave("nobody", { hang: false })).status).toBe(404);
  });
});

describe("stats and admin", () => {
  it("counts per client and in total", async () => {
    const tokens = await codeFlow();
    await refresh(tokens.refresh_token ?? "");
    await expectOAuthError(refresh("rt_unknown"), "invalid_grant");
    await oauth.revocationRequest(as, clientOf("app"), basic("s3cret"), tokens.access_token, insecure);
    await codeFlow("other", "other-secret");
    expect(await stats("app")).toEqual({
      tokenRequests: 3,
      authorizationCodeGrants: 1,
      refreshGrants: 1,
      failedRequests: 1,
      revocations: 1,
      activeAccessTokens: 1,
      activeRefreshTokens: 1,
    });
    expect(await stats()).toEqual({
      tokenRequests: 4,
      authorizationCodeGrants: 2,
      refreshGrants: 1,
      failedRequests: 1,
      revocations: 1,
      activeAccessTokens: 2,
      activeRefreshTokens: 2,
    });
    expect((await admin("GET", "/admin/clients/nobody/stats")).status).toBe(404);
  });

  it("reset clears clients, tokens and stats", async () => {
    const tokens = await codeFlow();
    await admin("POST", "/admin/reset");
    expect(await stats()).toMatchObject({ tokenRequests: 0, activeAccessTokens: 0 });
    await register("app", "s3cret");
    expect((await introspect(tokens.access_token)).active).toBe(false);
  });

  it("a code issued just before a token sweep still exchanges: its grant, awaiting the exchange, is kept", async () => {
    const pending = await authorize();
    // The sweep runs once per 1,000 tokens issued; refreshes of another grant trigger it.
    const other = await codeFlow();
    for (let i = 0; i < 1000; i++) expect((await rawRefresh(other.refresh_token ?? "")).status).toBe(200);
    const res = await oauth.authorizationCodeGrantRequest(
      as,
      clientOf("app"),
      basic("s3cret"),
      pending.params,
      REDIRECT,
      pending.verifier,
      insecure,
    );
    expect(res.status).toBe(200);
    const tokens = await oauth.processAuthorizationCodeResponse(as, clientOf("app"), res);
    expect((await introspect(tokens.access_token)).active).toBe(true);
  });

  it("imports grants in bulk: each refresh token works as if consented, and a bad entry stores nothing", async () => {
    const grant = (i: number, extra: Record<string, unknown> = {}) => ({
      client_id: `bulk-${i}`,
      client_secret: `bulk-secret-${i}`,
      redirect_uris: [REDIRECT],
      refresh_token: `rt_bulk_${i}`,
      scope: "openid email",
      ...extra,
    });
    const imported = await admin("POST", "/admin/import", { grants: [grant(1), grant(2)] });
    expect(imported).toEqual({ status: 201, json: { imported: 2 } });
    const issued = await refresh("rt_bulk_2", "bulk-2", "bulk-secret-2");
    expect(issued.scope).toBe("openid email");
    expect(await stats("bulk-2")).toMatchObject({ refreshGrants: 1, activeRefreshTokens: 1 });
    await expectOAuthError(refresh("rt_bulk_1", "bulk-2", "bulk-secret-2"), "invalid_grant");

    const before = await stats();
    const refused = [
      { grants: [] },
      { grants: [grant(3), grant(4, { redirect_uris: ["/relative"] })] },
      { grants: [grant(5), grant(6, { refresh_token: "rt_bulk_1" })] },
      { grants: [grant(7), grant(7)] },
      { grants: [grant(8, { client_secret: "" })] },
    ];
    for (const body of refused) expect((await admin("POST", "/admin/import", body)).status).toBe(400);
    expect(await stats()).toEqual(before);
    expect((await admin("GET", "/admin/clients/bulk-3/stats")).status).toBe(404);
  });

  it("rejects malformed client registrations", async () => {
    expect(
      (await admin("POST", "/admin/clients", { client_id: "x", client_secret: "y", redirect_uris: [] })).status,
    ).toBe(400);
    expect(
      (await admin("POST", "/admin/clients", { client_id: "x", client_secret: "y", redirect_uris: ["/relative"] }))
        .status,
    ).toBe(400);
    expect(
      (await admin("POST", "/admin/clients", { client_id: "", client_secret: "y", redirect_uris: [REDIRECT] })).status,
    ).toBe(400);
  });
});

describe("manual consent (autoApprove: false)", () => {
  it("renders a consent page; approve yields a code, deny yields access_denied", async () => {
    const manual = await startOAuthServer({ autoApprove: false });
    try {
      await fetch(`${manual.url}/admin/clients`, {
        method: "POST",
        body: JSON.stringify({ client_id: "app", client_secret: "s", redirect_uris: [REDIRECT] }),
      });
      const challenge = await oauth.calculatePKCECodeChallenge(oauth.generateRandomCodeVerifier());
      const q = new URLSearchParams({
        response_type: "code",
        client_id: "app",
        redirect_uri: REDIRECT,
        state: "st",
        code_challenge: challenge,
        code_challenge_method: "S256",
      });
      for (const decision of ["approve", "deny"]) {
        const page = await fetch(`${manual.authorizationEndpoint}?${q}`);
        expect(page.status).toBe(200);
        const html = await page.text();
        expect(html).toContain("Approve");
        const requestId = /name="request_id" value="([^"]+)"/.exec(html)?.[1] ?? "";
        const res = await fetch(`${manual.url}/authorize/decision`, {
          method: "POST",
          redirect: "manual",
          headers: { "content-type": "application/x-www-form-urlencoded" },
          body: new URLSearchParams({ request_id: requestId, decision }),
        });
        expect(res.status).toBe(302);
        const loc = new URL(res.headers.get("location") ?? "");
        expect(loc.searchParams.get("state")).toBe("st");
        if (decision === "approve") expect(loc.searchParams.get("code")).toMatch(/^code_/);
        else expect(loc.searchParams.get("error")).toBe("access_denied");
      }
    } finally {
      await manual.close();
    }
  });
});

describe("RFC 9207: iss in the authorization response", () => {
  it("sends the issuer on success and on error redirects; a behaviour can leave it out or change it", async () => {
    const ok = await authorizeRaw();
    expect(new URL(ok.res.headers.get("location") ?? "").searchParams.get("iss")).toBe(srv.issuer);

    const denied = await authorizeRaw({ extra: { response_type: "token" } });
    const deniedAt = new URL(denied.res.headers.get("location") ?? "");
    expect(deniedAt.searchParams.get("error")).toBe("unsupported_response_type");
    expect(deniedAt.searchParams.get("iss")).toBe(srv.issuer);

    await behave("app", { issParameter: null });
    const omitted = await authorizeRaw();
    expect(new URL(omitted.res.headers.get("location") ?? "").searchParams.has("iss")).toBe(false);

    await behave("app", { issParameter: "https://attacker.example" });
    const other = await authorizeRaw();
    const otherAt = new URL(other.res.headers.get("location") ?? "");
    expect(otherAt.searchParams.get("iss")).toBe("https://attacker.example");
    expect(() => oauth.validateAuthResponse(as, clientOf("app"), otherAt, other.state)).toThrow(/iss/);
  });
});

describe("google profile", () => {
  beforeEach(async () => {
    // The server-wide default, as `startOAuthServer({ profile: "google" })` sets it.
    await admin("PUT", "/admin/behavior", { profile: "google" });
  });

  const consent = async (extra: Record<string, string> = {}, clientId = "app", secret = "s3cret") => {
    const { params, verifier } = await authorize({
      clientId,
      scope: "openid email",
      extra: { access_type: "offline", prompt: "", ...extra },
    });
    const res = await oauth.authorizationCodeGrantRequest(
      as,
      clientOf(clientId),
      basic(secret),
      params,
      REDIRECT,
      verifier,
      insecure,
    );
    return oauth.processAuthorizationCodeResponse(as, clientOf(clientId), res);
  };

  it("issues a refresh token on the account's first consent only, or when prompt=consent forces the screen", async () => {
    const first = await consent();
    expect(first.refresh_token).toMatch(/^rt_/);
    expect(first.expires_in).toBe(3599);
    const again = await consent();
    expect(again.refresh_token).toBeUndefined();
    expect(again.access_token).toMatch(/^at_/);
    const forced = await consent({ prompt: "consent" });
    expect(forced.refresh_token).toMatch(/^rt_/);
    // Both refresh tokens stay valid (Google keeps several per account and client).
    expect((await introspect(first.refresh_token ?? "")).active).toBe(true);
    expect((await introspect(forced.refresh_token ?? "")).active).toBe(true);
    // Another account's first consent gets its own refresh token.
    await behave("app", { account: "someone-else@example.com" });
    expect((await consent()).refresh_token).toMatch(/^rt_/);
    // Without access_type=offline there is never a refresh token.
    await behave("app", { account: "third@example.com" });
    expect((await consent({ access_type: "online" })).refresh_token).toBeUndefined();
  });

  it("answers refreshes without a new refresh token, with expires_in 3599, and words invalid_grant as Google", async () => {
    const { refresh_token: rt = "" } = await consent();
    const refreshed = await refresh(rt);
    expect(refreshed.refresh_token).toBeUndefined();
    expect(refreshed.expires_in).toBe(3599);
    const res = await rawRefresh("rt_unknown");
    expect(res.status).toBe(400);
    expect(await res.json()).toEqual({
      error: "invalid_grant",
      error_description: "Token has been expired or revoked.",
    });
  });

  it("words a reused authorization code as Google does", async () => {
    const { params, verifier } = await authorize({ extra: { access_type: "offline" } });
    const exchange = () =>
      oauth.authorizationCodeGrantRequest(as, clientOf("app"), basic("s3cret"), params, REDIRECT, verifier, insecure);
    expect((await exchange()).status).toBe(200);
    const replay = await exchange();
    expect(replay.status).toBe(400);
    expect(await replay.json()).toEqual({ error: "invalid_grant", error_description: "Bad Request" });
  });

  it("keeps at most 100 live refresh tokens per account and client: the oldest dies silently", async () => {
    const issued: string[] = [];
    for (let i = 0; i < 101; i++) issued.push((await consent({ prompt: "consent" })).refresh_token ?? "");
    expect(new Set(issued).size).toBe(101);
    expect((await stats("app")).activeRefreshTokens).toBe(100);
    await expectOAuthError(refresh(issued[0] ?? ""), "invalid_grant", 400);
    expect((await refresh(issued[1] ?? "")).access_token).toMatch(/^at_/);
    expect((await refresh(issued[100] ?? "")).access_token).toMatch(/^at_/);
    // Another account's tokens do not count.
    await behave("app", { account: "someone-else@example.com", maxRefreshTokensPerAccount: 2 });
    await consent({ prompt: "consent" });
    expect((await stats("app")).activeRefreshTokens).toBe(101);
  });

  it("granular consent: an unticked scope is left out of the grant and of the token response", async () => {
    await behave("app", { untickedScopes: ["email"] });
    const tokens = await consent();
    expect(tokens.scope).toBe("openid");
    expect((await introspect(tokens.access_token)).scope).toBe("openid");
    expect((await refresh(tokens.refresh_token ?? "")).scope).toBe("openid");
  });

  it("revocation takes the token as a query or form parameter without client authentication, and kills every token of the account and client", async () => {
    const first = await consent();
    const forced = await consent({ prompt: "consent" });
    await behave("app", { account: "someone-else@example.com" });
    const otherAccount = await consent();
    const otherClient = await consent({}, "other", "other-secret");

    // Revoking the first consent's refresh token kills the second consent's tokens too (same account).
    const revoked = await fetch(`${srv.revocationEndpoint}?token=${encodeURIComponent(first.refresh_token ?? "")}`, {
      method: "POST",
    });
    expect(revoked.status).toBe(200);
    for (const token of [first.refresh_token, first.access_token, forced.refresh_token, forced.access_token]) {
      expect((await introspect(token ?? "")).active).toBe(false);
    }
    // Other accounts and other clients keep theirs.
    expect((await introspect(otherAccount.refresh_token ?? "")).active).toBe(true);
    expect((await refresh(otherClient.refresh_token ?? "", "other", "other-secret")).access_token).toMatch(/^at_/);

    // Already revoked or unknown: 400 invalid_token.
    const again = await fetch(srv.revocationEndpoint, {
      method: "POST",
      headers: { "content-type": "application/x-www-form-urlencoded" },
      body: new URLSearchParams({ token: first.refresh_token ?? "" }),
    });
    expect(again.status).toBe(400);
    expect(await again.json()).toEqual({ error: "invalid_token", error_description: "Token expired or revoked" });

    // An access token (form parameter, with client authentication as oauth4webapi sends it) revokes its account's grant.
    const byAccess = await oauth.revocationRequest(
      as,
      clientOf("app"),
      basic("s3cret"),
      otherAccount.access_token,
      insecure,
    );
    expect(byAccess.status).toBe(200);
    expect((await introspect(otherAccount.refresh_token ?? "")).active).toBe(false);
    expect((await stats("app")).revocations).toBe(2);
  });
});

/** Consent and code exchange by "app" without oauth4webapi's checks: the raw token response body. */
async function tokenResponse(o: AuthorizeOptions = {}) {
  const { params, verifier } = await authorize(o);
  const res = await postForm(
    "/token",
    {
      grant_type: "authorization_code",
      code: params.get("code") ?? "",
      redirect_uri: REDIRECT,
      code_verifier: verifier,
    },
    { authorization: `Basic ${Buffer.from("app:s3cret").toString("base64")}` },
  );
  expect(res.status).toBe(200);
  return (await res.json()) as Record<string, unknown> & {
    access_token: string;
    id_token?: string;
    refresh_token?: string;
    refresh_token_expires_in?: number;
    scope: string;
  };
}

describe("OpenID Connect", () => {
  const EMAIL_SCOPE = "https://www.googleapis.com/auth/userinfo.email";
  const PROFILE_SCOPE = "https://www.googleapis.com/auth/userinfo.profile";
  const BUSINESS_SCOPE = "https://www.googleapis.com/auth/business.manage";
  const jwks = () => createRemoteJWKSet(new URL(srv.jwksUri));

  async function rawRefreshBody(refreshToken: string) {
    const res = await rawRefresh(refreshToken);
    expect(res.status).toBe(200);
    return (await res.json()) as Record<string, unknown> & { id_token?: string; scope: string };
  }

  it("publishes a discovery document and a JWKS with its RS256 key; RFC 8414 metadata names the JWKS too", async () => {
    const res = await fetch(`${srv.url}/.well-known/openid-configuration`);
    expect(res.status).toBe(200);
    const meta = await oauth.processDiscoveryResponse(new URL(srv.issuer), res);
    expect(meta).toMatchObject({
      issuer: srv.issuer,
      authorization_endpoint: srv.authorizationEndpoint,
      token_endpoint: srv.tokenEndpoint,
      revocation_endpoint: srv.revocationEndpoint,
      jwks_uri: `${srv.url}/oauth2/v3/certs`,
      id_token_signing_alg_values_supported: ["RS256"],
      subject_types_supported: ["public"],
    });
    expect(meta.scopes_supported).toEqual(expect.arrayContaining(["openid", "email"]));
    expect(srv.jwksUri).toBe(meta.jwks_uri);

    const rfc8414 = (await (await fetch(`${srv.url}/.well-known/oauth-authorization-server`)).json()) as {
      jwks_uri?: string;
    };
    expect(rfc8414.jwks_uri).toBe(srv.jwksUri);

    const set = (await (await fetch(srv.jwksUri)).json()) as { keys: Record<string, unknown>[] };
    expect(set.keys).toHaveLength(1);
    expect(set.keys[0]).toMatchObject({
      kty: "RSA",
      use: "sig",
      alg: "RS256",
      kid: expect.stringMatching(/^[0-9a-f]{40}$/),
    });
    // A public key only.
    expect(Object.keys(set.keys[0] ?? {}).sort()).toEqual(["alg", "e", "kid", "kty", "n", "use"]);
    expect((await fetch(srv.jwksUri, { method: "POST" })).status).toBe(405);
  });

  it("the code grant's ID token verifies against the JWKS and carries iss, aud, azp, sub, email and the nonce", async () => {
    const nonce = oauth.generateRandomNonce();
    const before = Math.floor(Date.now() / 1000);
    const body = await tokenResponse({ scope: "openid email", extra: { nonce } });
    const { payload, protectedHeader } = await jwtVerify(body.id_token ?? "", jwks(), {
      issuer: srv.issuer,
      audience: "app",
      algorithms: ["RS256"],
    });
    const set = (await (await fetch(srv.jwksUri)).json()) as { keys: { kid: string }[] };
    expect(protectedHeader).toMatchObject({ alg: "RS256", kid: set.keys[0]?.kid });
    expect(payload).toMatchObject({
      iss: srv.issuer,
      aud: "app",
      azp: "app",
      sub: accountSubject("user@example.com"),
      email: "user@example.com",
      email_verified: true,
      nonce,
    });
    expect(payload.iat).toBeGreaterThanOrEqual(before);
    expect(payload.iat).toBeLessThanOrEqual(Math.ceil(Date.now() / 1000));
    expect((payload.exp ?? 0) - (payload.iat ?? 0)).toBe(3600);

    // oauth4webapi's OpenID Connect checks pass with the nonce, and fail with another one.
    const again = await authorize({ scope: "openid email", extra: { nonce } });
    const res = await oauth.authorizationCodeGrantRequest(
      as,
      clientOf("app"),
      basic("s3cret"),
      again.params,
      REDIRECT,
      again.verifier,
      insecure,
    );
    const checked = await oauth.processAuthorizationCodeResponse(as, clientOf("app"), res, {
      expectedNonce: nonce,
      requireIdToken: true,
    });
    expect(oauth.getValidatedIdTokenClaims(checked)?.sub).toBe(accountSubject("user@example.com"));
    const third = await authorize({ scope: "openid email", extra: { nonce } });
    const wrong = await oauth.authorizationCodeGrantRequest(
      as,
      clientOf("app"),
      basic("s3cret"),
      third.params,
      REDIRECT,
      third.verifier,
      insecure,
    );
    await expect(
      oauth.processAuthorizationCodeResponse(as, clientOf("app"), wrong, { expectedNonce: "another-nonce" }),
    ).rejects.toThrow(/nonce/);
  });

  it("sends an ID token only for openid, the email only with the email scope, a nonce only when one was sent", async () => {
    expect((await tokenResponse({ scope: "read write" })).id_token).toBeUndefined();
    const noEmail = decodeJwt((await tokenResponse({ scope: "openid" })).id_token ?? "");
    expect(noEmail.sub).toBe(accountSubject("user@example.com"));
    expect(noEmail).not.toHaveProperty("email");
    expect(noEmail).not.toHaveProperty("email_verified");
    expect(noEmail).not.toHaveProperty("nonce");
    // Another account is another subject, the same one RISC events name.
    await behave("app", { account: "second@example.com" });
    const second = decodeJwt((await tokenResponse({ scope: "openid email" })).id_token ?? "");
    expect(second).toMatchObject({ sub: accountSubject("second@example.com"), email: "second@example.com" });
    expect(second.sub).not.toBe(noEmail.sub);
    expect(accountSubject("second@example.com")).toBe(accountSubject("second@example.com"));
  });

  it.each(["textbook", "google"])(
    "refreshes of an openid grant carry a fresh ID token without nonce (%s)",
    async (profile) => {
      await behave("app", { profile });
      const first = await tokenResponse({ scope: "openid email", extra: { nonce: "n-0S6_WzA2Mj" } });
      const refreshed = await rawRefreshBody(first.refresh_token ?? "");
      const { payload } = await jwtVerify(refreshed.id_token ?? "", jwks(), { issuer: srv.issuer, audience: "app" });
      expect(payload).toMatchObject({ sub: accountSubject("user@example.com"), email: "user@example.com", azp: "app" });
      expect(payload).not.toHaveProperty("nonce");
      // oauth4webapi accepts it as a refresh response's ID token.
      const checked = await refresh(first.refresh_token ?? "");
      expect(oauth.getValidatedIdTokenClaims(checked)?.sub).toBe(accountSubject("user@example.com"));
      // A grant without openid gets none.
      const plain = await tokenResponse({ scope: "read" });
      expect((await rawRefreshBody(plain.refresh_token ?? "")).id_token).toBeUndefined();
    },
  );

  it("idTokenIssuer: the issuer without its scheme (as Google may send), or a wrong one verbatim", async () => {
    await behave("app", { idTokenIssuer: "bare" });
    const bare = (await tokenResponse({ scope: "openid" })).id_token ?? "";
    const bareIssuer = srv.issuer.replace(/^http:\/\//, "");
    expect(bareIssuer).toMatch(/^localhost:\d+$/);
    expect((await jwtVerify(bare, jwks(), { issuer: bareIssuer, audience: "app" })).payload.iss).toBe(bareIssuer);
    await expect(jwtVerify(bare, jwks(), { issuer: srv.issuer })).rejects.toBeInstanceOf(
      joseErrors.JWTClaimValidationFailed,
    );

    await behave("app", { idTokenIssuer: "https://attacker.example" });
    const wrong = await tokenResponse({ scope: "openid" });
    expect(decodeJwt(wrong.id_token ?? "").iss).toBe("https://attacker.example");
    await expect(jwtVerify(wrong.id_token ?? "", jwks(), { issuer: srv.issuer })).rejects.toThrow(/iss/);
    // The refresh's ID token follows the same setting.
    expect(decodeJwt((await rawRefreshBody(wrong.refresh_token ?? "")).id_token ?? "").iss).toBe(
      "https://attacker.example",
    );

    await behave("app", { idTokenIssuer: "issuer" });
    expect(decodeJwt((await tokenResponse({ scope: "openid" })).id_token ?? "").iss).toBe(srv.issuer);
  });

  it("idTokenAudience sends another aud (azp stays the client id)", async () => {
    await behave("app", { idTokenAudience: "someone-else.apps.example" });
    const token = (await tokenResponse({ scope: "openid" })).id_token ?? "";
    expect(decodeJwt(token)).toMatchObject({ aud: "someone-else.apps.example", azp: "app" });
    await expect(jwtVerify(token, jwks(), { issuer: srv.issuer, audience: "app" })).rejects.toThrow(/aud/);
    await behave("app", { idTokenAudience: null });
    expect(decodeJwt((await tokenResponse({ scope: "openid" })).id_token ?? "").aud).toBe("app");
  });

  it("idTokenSignature: flipped signature bytes fail verification; alg none carries no signature", async () => {
    await behave("app", { idTokenSignature: "invalid" });
    const broken = (await tokenResponse({ scope: "openid" })).id_token ?? "";
    expect(decodeProtectedHeader(broken).alg).toBe("RS256");
    await expect(jwtVerify(broken, jwks(), { issuer: srv.issuer, audience: "app" })).rejects.toBeInstanceOf(
      joseErrors.JWSSignatureVerificationFailed,
    );
    await behave("app", { idTokenSignature: "none" });
    const unsigned = (await tokenResponse({ scope: "openid" })).id_token ?? "";
    expect(decodeProtectedHeader(unsigned).alg).toBe("none");
    expect(unsigned.endsWith(".")).toBe(true);
    expect(decodeJwt(unsigned).sub).toBe(accountSubject("user@example.com"));
    await expect(jwtVerify(unsigned, jwks(), { issuer: srv.issuer, audience: "app" })).rejects.toThrow();
    await behave("app", { idTokenSignature: "valid" });
    const good = (await tokenResponse({ scope: "openid" })).id_token ?? "";
    expect((await jwtVerify(good, jwks(), { issuer: srv.issuer, audience: "app" })).payload.aud).toBe("app");
  });

  it("google profile reports email and profile by their userinfo scope names; textbook echoes scopes as sent", async () => {
    const scope = `openid email profile ${BUSINESS_SCOPE}`;
    expect((await tokenResponse({ scope })).scope).toBe(scope);
    await behave("app", { profile: "google" });
    const google = await tokenResponse({ scope });
    expect(google.scope).toBe(`openid ${EMAIL_SCOPE} ${PROFILE_SCOPE} ${BUSINESS_SCOPE}`);
    expect((await rawRefreshBody(google.refresh_token ?? "")).scope).toBe(google.scope);
    // Asked by its long name, the email scope still brings the email claim.
    const longName = await tokenResponse({ scope: `openid ${EMAIL_SCOPE}`, extra: { prompt: "consent" } });
    expect(longName.scope).toBe(`openid ${EMAIL_SCOPE}`);
    expect(decodeJwt(longName.id_token ?? "").email).toBe("user@example.com");
    // Either name unticks it; narrowing a refresh by either name works.
    await behave("app", { untickedScopes: [EMAIL_SCOPE] });
    const unticked = await tokenResponse({ scope: "openid email", extra: { prompt: "consent" } });
    expect(unticked.scope).toBe("openid");
    expect(decodeJwt(unticked.id_token ?? "")).not.toHaveProperty("email");
    const narrowed = await postForm(
      "/token",
      { grant_type: "refresh_token", refresh_token: google.refresh_token ?? "", scope: `openid ${EMAIL_SCOPE}` },
      { authorization: `Basic ${Buffer.from("app:s3cret").toString("base64")}` },
    );
    expect(narrowed.status).toBe(200);
    expect(((await narrowed.json()) as { scope: string }).scope).toBe(`openid ${EMAIL_SCOPE}`);
  });

  it("validates the ID token behaviour fields", async () => {
    expect((await behave("app", { idTokenIssuer: "" })).status).toBe(400);
    expect((await behave("app", { idTokenIssuer: 1 })).status).toBe(400);
    expect((await behave("app", { idTokenAudience: "" })).status).toBe(400);
    expect((await behave("app", { idTokenSignature: "forged" })).status).toBe(400);
    const ok = await behave("app", { idTokenIssuer: "bare", idTokenAudience: "x", idTokenSignature: "none" });
    expect(ok.json).toMatchObject({ idTokenIssuer: "bare", idTokenAudience: "x", idTokenSignature: "none" });
    expect((await admin("GET", "/admin/behavior")).json).toMatchObject({
      idTokenIssuer: "issuer",
      idTokenAudience: null,
      idTokenSignature: "valid",
    });
  });
});

describe("server clock and time-limited refresh tokens", () => {
  const BUSINESS = "https://www.googleapis.com/auth/business.manage";
  const DAY = 24 * 60 * 60;
  const advance = (advanceSeconds: number) => admin("POST", "/admin/clock", { advanceSeconds });

  beforeEach(async () => {
    await admin("PUT", "/admin/behavior", { profile: "google" });
  });

  /** A Google consent (offline, no forced screen unless asked) and its raw token response. */
  const consent = (scope = `openid email ${BUSINESS}`, extra: Record<string, string> = {}) =>
    tokenResponse({ scope, extra: { access_type: "offline", prompt: "", ...extra } });

  async function refreshBody(token: string) {
    const res = await rawRefresh(token);
    return { status: res.status, body: (await res.json()) as Record<string, unknown> };
  }

  it("GET/POST /admin/clock move the server's time; codes and access tokens expire by it; reset puts it back", async () => {
    const start = (await admin("GET", "/admin/clock")).json as { now: string; offsetSeconds: number };
    expect(start.offsetSeconds).toBe(0);
    expect(Math.abs(Date.parse(start.now) - Date.now())).toBeLessThan(5_000);

    const tokens = await codeFlow();
    expect((await introspect(tokens.access_token)).active).toBe(true);
    const { params, verifier } = await authorize();
    const moved = (await advance(3600)).json as { now: string; offsetSeconds: number };
    expect(moved.offsetSeconds).toBe(3600);
    expect(Date.parse(moved.now) - Date.now()).toBeGreaterThan(3_595_000);
    // The access token (3599 s) and the code (60 s) are dead at the server's time; the refresh token lives.
    expect((await introspect(tokens.access_token)).active).toBe(false);
    const late = await oauth.authorizationCodeGrantRequest(
      as,
      clientOf("app"),
      basic("s3cret"),
      params,
      REDIRECT,
      verifier,
      insecure,
    );
    expect(late.status).toBe(400);
    expect(await late.json()).toEqual({ error: "invalid_grant", error_description: "Bad Request" });
    expect((await refreshBody(tokens.refresh_token ?? "")).status).toBe(200);
    expect(((await advance(0.5)).json as { offsetSeconds: number }).offsetSeconds).toBe(3600.5);

    for (const bad of [
      { advanceSeconds: -1 },
      { advanceSeconds: "60" },
      {},
      { advanceSeconds: Number.MAX_VALUE * 10 },
    ]) {
      expect((await admin("POST", "/admin/clock", bad)).status).toBe(400);
    }
    expect((await admin("PUT", "/admin/clock", {})).status).toBe(405);
    await admin("POST", "/admin/reset");
    expect(((await admin("GET", "/admin/clock")).json as { offsetSeconds: number }).offsetSeconds).toBe(0);
  });

  it("refreshTokenLifetimeSeconds: refresh_token_expires_in counts down on every response, then the token dies", async () => {
    const before = await consent(); // issued before time-based access: no end, nothing announced
    expect(before.refresh_token_expires_in).toBeUndefined();
    await admin("POST", "/admin/refresh-tokens/app/revoke-all");

    await behave("app", { refreshTokenLifetimeSeconds: DAY });
    const first = await consent();
    expect(first.refresh_token).toMatch(/^rt_/);
    expect(first.refresh_token_expires_in).toBe(DAY);
    await advance(3600);
    const refreshed = await refreshBody(first.refresh_token ?? "");
    expect(refreshed.status).toBe(200);
    expect(refreshed.body.refresh_token).toBeUndefined();
    expect(refreshed.body.refresh_token_expires_in).toBe(DAY - 3600);
    // A consent that brings no refresh token reports the grant's one.
    const again = await consent();
    expect(again.refresh_token).toBeUndefined();
    expect(again.refresh_token_expires_in).toBe(DAY - 3600);

    await advance(DAY - 3600);
    const dead = await refreshBody(first.refresh_token ?? "");
    expect(dead).toEqual({
      status: 400,
      body: { error: "invalid_grant", error_description: "Token has been expired or revoked." },
    });
    expect((await introspect(first.refresh_token ?? "")).active).toBe(false);
    expect((await stats("app")).activeRefreshTokens).toBe(0);
    // The account holds no live refresh token: its next consent is a first one again.
    const renewed = await consent();
    expect(renewed.refresh_token).toMatch(/^rt_/);
    expect(renewed.refresh_token_expires_in).toBe(DAY);
  });

  it("a rotated refresh token keeps the grant's end (textbook profile with rotation)", async () => {
    await behave("app", { profile: "textbook", rotateRefreshTokens: true, refreshTokenLifetimeSeconds: 1000 });
    const tokens = await consent();
    expect(tokens.refresh_token_expires_in).toBe(1000);
    await advance(400);
    const rotated = await refreshBody(tokens.refresh_token ?? "");
    expect(rotated.body.refresh_token).toMatch(/^rt_/);
    expect(rotated.body.refresh_token_expires_in).toBe(600);
    await advance(600);
    expect((await refreshBody(String(rotated.body.refresh_token))).status).toBe(400);
  });

  it("testingPublishingStatus: refresh tokens die 7 days after issue, unannounced, unless only identity scopes", async () => {
    await behave("app", { testingPublishingStatus: true });
    const business = await consent();
    expect(business.refresh_token).toMatch(/^rt_/);
    expect(business).not.toHaveProperty("refresh_token_expires_in");
    await behave("app", { account: "identity-only@example.com" });
    const identity = await consent("openid email profile");
    // Publishing the app later does not lengthen tokens minted in Testing.
    await behave("app", { testingPublishingStatus: false });

    await advance(7 * DAY - 60);
    const alive = await refreshBody(business.refresh_token ?? "");
    expect(alive.status).toBe(200);
    expect(alive.body).not.toHaveProperty("refresh_token_expires_in");
    await advance(60);
    expect((await refreshBody(business.refresh_token ?? "")).body).toEqual({
      error: "invalid_grant",
      error_description: "Token has been expired or revoked.",
    });
    // Google's exemption: a grant of openid, email and profile only keeps its refresh token.
    await advance(DAY);
    expect((await refreshBody(identity.refresh_token ?? "")).status).toBe(200);
    // A dead token is unknown to the revocation endpoint, as at Google.
    const revoke = await fetch(`${srv.revocationEndpoint}?token=${business.refresh_token}`, { method: "POST" });
    expect(revoke.status).toBe(400);
  });

  it("validates the time behaviour fields", async () => {
    expect((await behave("app", { refreshTokenLifetimeSeconds: 0 })).status).toBe(400);
    expect((await behave("app", { refreshTokenLifetimeSeconds: 1.5 })).status).toBe(400);
    expect((await behave("app", { testingPublishingStatus: "yes" })).status).toBe(400);
    const ok = await behave("app", { refreshTokenLifetimeSeconds: 60, testingPublishingStatus: true });
    expect(ok.json).toMatchObject({ refreshTokenLifetimeSeconds: 60, testingPublishingStatus: true });
    expect((await behave("app", { refreshTokenLifetimeSeconds: null })).json).toMatchObject({
      refreshTokenLifetimeSeconds: null,
    });
  });
});
