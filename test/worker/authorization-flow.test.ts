import { describe, expect, it } from "vitest";
import { createDb } from "../../src/db/client";
import { parseEnv } from "../../src/env";
import { AppError } from "../../src/errors";
import { loadKeyring, seal } from "../../src/lib/crypto";
import { toBase64Url, utf8 } from "../../src/lib/encoding";
import { providersOf } from "../../src/oauth/profiles";
import { completeLogin } from "../../src/services/authorization";
import { eventContext } from "../../src/services/events";
import { signLoginLink } from "../../src/services/login-links";
import { TEST_ENCRYPTION_KEY, TEST_SERVICE_KEY } from "./bindings";
import { Browser } from "./browser";
import { BASE, call, expectProblem, json, testEnv } from "./helpers";
import {
  appRowOf,
  authorizeAtProvider,
  BINDING_COOKIE_NAME,
  callCallback,
  clientRow,
  connectBranch,
  currentTokens,
  introspect,
  postJson,
  providerStats,
  reconnectBranch,
  registerBranch,
  registerProviderClient,
  runBrowserFlow,
  setProviderBehavior,
  sql,
  startLogin,
  tokenRows,
  unseal,
} from "./oauth-helpers";

const keyring = () => loadKeyring(TEST_ENCRYPTION_KEY);

/** The same Worker reached over https (as deployed): the cookie is then __Host- and Secure. */
const HTTPS_BASE = BASE.replace(/^http:/, "https:");
const httpsUrl = (url: string) => url.replace(/^http:/, "https:");

async function expectHtmlPage(response: Response, status: number, contains?: RegExp): Promise<string> {
  const text = await response.text();
  expect(response.status, text).toBe(status);
  expect(response.headers.get("content-type")).toContain("text/html");
  expect(response.headers.get("cache-control")).toBe("no-store");
  expect(response.headers.get("content-security-policy")).toContain("frame-ancestors 'none'");
  expect(text).toMatch(/^<!doctype html>/);
  if (contains) expect(text).toMatch(contains);
  return text;
}

async function sha256(value: string): Promise<string> {
  return toBase64Url(await crypto.subtle.digest("SHA-256", utf8(value)));
}

describe("login link", () => {
  it("redirects a valid link to the provider with every authorization parameter", async () => {
    const branch = await registerBranch({ scopes: "scope.a scope.b" });
    const { response, authorizeUrl } = await startLogin(branch.loginUrl);
    expect(response.status).toBe(302);
    expect(`${authorizeUrl.origin}${authorizeUrl.pathname}`).toBe(`${testEnv.OAUTH_SERVER_URL}/authorize`);
    const p = authorizeUrl.searchParams;
    expect(p.get("response_type")).toBe("code");
    expect(p.get("client_id")).toBe(branch.oauthClientId);
    expect(p.get("redirect_uri")).toBe(branch.redirectUri);
    // The branch's scopes, plus the identity scopes of OpenID Connect (the Google profile's default).
    expect(p.get("scope")).toBe("scope.a scope.b openid email");
    expect(p.get("nonce")).toMatch(/^[A-Za-z0-9_-]{43}$/);
    expect(p.get("access_type")).toBe("offline");
    // No prompt=consent by default (see OAUTH_EXTRA_AUTHORIZATION_PARAMS): Google then issues a
    // refresh token only on an account's first consent, which the replacement rule relies on.
    expect(p.get("prompt")).toBeNull();
    expect(p.get("state")).toMatch(/^v2\./);
    expect(p.get("code_challenge")).toMatch(/^[A-Za-z0-9_-]{43}$/);
    expect(p.get("code_challenge_method")).toBe("S256");
    // The state is sealed (it carries the PKCE verifier): it opens only with the state sub-key.
    const state = JSON.parse(await unseal(p.get("state") as string, "oauth.state"));
    expect(state.c).toBe(branch.clientId);
    expect(typeof state.v).toBe("string");
    await expect(
      unseal(p.get("state") as string, { column: "tokens.access_token", clientId: branch.clientId }),
    ).rejects.toThrow();
    expect(response.headers.get("cache-control")).toBe("no-store");
    expect(response.headers.get("referrer-policy")).toBe("no-referrer");
  });

  it("uses the default scopes when the client has none", async () => {
    const branch = await registerBranch();
    const { authorizeUrl } = await startLogin(branch.loginUrl);
    expect(authorizeUrl.searchParams.get("scope")).toBe(`${testEnv.OAUTH_SCOPES} openid email`);
  });

  it("on https sets a __Host- binding cookie: HttpOnly, Secure, SameSite=Lax, Path=/, no Domain", async () => {
    const branch = await registerBranch();
    const browser = new Browser(HTTPS_BASE);
    const { setCookie, cookie } = await startLogin(httpsUrl(branch.loginUrl), {}, browser);
    expect(cookie).toMatch(new RegExp(`^__Host-${BINDING_COOKIE_NAME}=[A-Za-z0-9_-]{43}$`));
    const attributes = setCookie.split(";").map((a) => a.trim().toLowerCase());
    expect(attributes).toContain("httponly");
    expect(attributes).toContain("secure");
    expect(attributes).toContain("samesite=lax");
    expect(attributes).toContain("path=/");
    expect(attributes).toContain("max-age=600");
    expect(attributes.some((a) => a.startsWith("domain"))).toBe(false);
    // The browser kept it (a __Host- cookie breaking the prefix rules would have been dropped).
    expect(browser.names()).toEqual([`__Host-${BINDING_COOKIE_NAME}`]);
  });

  it("on plain http (local development) sets the plain name without Secure, so the browser keeps it", async () => {
    const branch = await registerBranch();
    const browser = new Browser();
    const { setCookie, cookie } = await startLogin(branch.loginUrl, {}, browser);
    expect(cookie).toMatch(new RegExp(`^${BINDING_COOKIE_NAME}=[A-Za-z0-9_-]{43}$`));
    const attributes = setCookie.split(";").map((a) => a.trim().toLowerCase());
    expect(attributes).toContain("httponly");
    expect(attributes).toContain("samesite=lax");
    expect(attributes).toContain("path=/");
    expect(attributes).not.toContain("secure");
    expect(browser.names()).toEqual([BINDING_COOKIE_NAME]);
  });

  it("gives every flow a fresh state and PKCE challenge", async () => {
    const branch = await registerBranch();
    const a = await startLogin(branch.loginUrl);
    const b = await startLogin(branch.loginUrl);
    expect(a.authorizeUrl.searchParams.get("state")).not.toBe(b.authorizeUrl.searchParams.get("state"));
    expect(a.authorizeUrl.searchParams.get("code_challenge")).not.toBe(
      b.authorizeUrl.searchParams.get("code_challenge"),
    );
  });

  it("reuses the binding cookie the browser already has (it reaches /oauth/login)", async () => {
    const branch = await registerBranch();
    const browser = new Browser();
    const first = await startLogin(branch.loginUrl, {}, browser);
    const second = await startLogin(branch.loginUrl, {}, browser);
    expect(first.cookie).toMatch(new RegExp(`^${BINDING_COOKIE_NAME}=[A-Za-z0-9_-]{43}$`));
    expect(second.cookie).toBe(first.cookie);
    // A cookie that is not one of ours is replaced, not reused.
    const forged = await startLogin(branch.loginUrl, { headers: { cookie: `${BINDING_COOKIE_NAME}=short` } });
    expect(forged.cookie).not.toBe(`${BINDING_COOKIE_NAME}=short`);
  });

  it("answers 401 HTML when the signature is missing", async () => {
    const branch = await registerBranch();
    const url = new URL(branch.loginUrl);
    url.searchParams.delete("signature");
    const response = await call(url.toString());
    await expectHtmlPage(response, 401, /needs a login link/);
    expect(response.headers.get("set-cookie")).toBeNull();
    await expectHtmlPage(await call(`/oauth/login/${branch.clientId}`), 401, /needs a login link/);
  });

  it("answers 401 HTML when the link has expired", async () => {
    const branch = await registerBranch();
    const link = await signLoginLink(await keyring(), BASE, branch.clientId, new Date(Date.now() - 2 * 3600_000), 3600);
    const response = await call(link.url);
    await expectHtmlPage(response, 401, /expired/);
    expect(response.headers.get("location")).toBeNull();
  });

  it("answers 401 HTML when the signature or expiry was tampered with", async () => {
    const branch = await registerBranch();
    const url = new URL(branch.loginUrl);
    const signature = url.searchParams.get("signature") as string;

    const badSignature = new URL(url);
    badSignature.searchParams.set("signature", `${signature.slice(0, -2)}${signature.endsWith("AA") ? "BB" : "AA"}`);
    await expectHtmlPage(await call(badSignature.toString()), 401, /not valid/);

    const laterExpiry = new URL(url);
    laterExpiry.searchParams.set("expires", String(Number(url.searchParams.get("expires")) + 3600));
    await expectHtmlPage(await call(laterExpiry.toString()), 401, /not valid/);

    const garbage = new URL(url);
    garbage.searchParams.set("signature", "!!!not base64!!!");
    await expectHtmlPage(await call(garbage.toString()), 401, /not valid/);
  });

  it("does not accept one client's link for another client", async () => {
    const a = await registerBranch();
    const b = await registerBranch();
    const url = new URL(a.loginUrl);
    url.pathname = `/token-management/oauth/login/${b.clientId}`;
    await expectHtmlPage(await call(url.toString()), 401, /not valid/);
  });

  it("accepts the admin key in the Authorization header instead of a link", async () => {
    const branch = await registerBranch();
    const { authorizeUrl } = await startLogin(`/oauth/login/${branch.clientId}`, { key: "admin" });
    expect(authorizeUrl.searchParams.get("client_id")).toBe(branch.oauthClientId);
  });

  it("does not accept the service key instead of a link", async () => {
    const branch = await registerBranch();
    await expectHtmlPage(await call(`/oauth/login/${branch.clientId}`, { key: TEST_SERVICE_KEY }), 401);
  });

  it("answers 404 HTML for an unknown client", async () => {
    await expectHtmlPage(await call("/oauth/login/2147483100", { key: "admin" }), 404, /No client/);
    const link = await signLoginLink(await keyring(), BASE, 2147483101, new Date(), 3600);
    await expectHtmlPage(await call(link.url), 404);
  });

  it("answers 404 HTML for an inactive client, even with a valid link", async () => {
    const branch = await registerBranch();
    expect((await postJson(`/clients/${branch.clientId}`, { is_active: false }, { method: "PATCH" })).status).toBe(200);
    await expectHtmlPage(await call(branch.loginUrl), 404);
  });

  it("answers problem+json to API clients that accept only JSON", async () => {
    const branch = await registerBranch();
    const url = new URL(branch.loginUrl);
    url.searchParams.delete("signature");
    await expectProblem(await call(url.toString(), { headers: { accept: "application/json" } }), 401, "unauthorized");
  });
});

describe("callback: success", () => {
  it("stores the tokens sealed: no plaintext token or secret anywhere in the tables", async () => {
    const branch = await connectBranch();
    const rows = await tokenRows(branch.clientId);
    expect(rows).toHaveLength(1);
    const row = rows[0]!;
    expect(row).toMatchObject({ is_valid: true, status: "active" });
    expect(row.access_token).toMatch(/^v2\./);
    expect(row.refresh_token).toMatch(/^v2\./);

    const { accessToken, refreshToken } = await currentTokens(branch.clientId);
    // They are the real tokens: the provider knows them.
    expect((await introspect(accessToken, branch)).active).toBe(true);
    expect(await introspect(refreshToken as string, branch)).toMatchObject({
      active: true,
      token_type: "refresh_token",
    });

    // The secret is the app's, sealed and bound to the app's row.
    const app = await appRowOf(branch.clientId);
    expect(String(app?.client_secret)).toMatch(/^v2\./);
    expect(
      await unseal(String(app?.client_secret), { column: "clients.client_secret", clientId: Number(app?.id) }),
    ).toBe(branch.clientSecret);
    expect((await clientRow(branch.clientId))?.client_secret).toBeNull();

    const dump =
      JSON.stringify(await sql("select row_to_json(t)::text from tokens t")) +
      JSON.stringify(await sql("select row_to_json(c)::text from clients c")) +
      JSON.stringify(await sql("select row_to_json(a)::text from apps a"));
    expect(dump).not.toContain(accessToken);
    expect(dump).not.toContain(refreshToken as string);
    expect(dump).not.toContain(branch.clientSecret);
  });

  it("answers JSON to Accept: application/json, without any token", async () => {
    const branch = await registerBranch();
    const { callback } = await runBrowserFlow(branch.loginUrl, "json");
    const text = await callback.text();
    expect(callback.status, text).toBe(200);
    expect(callback.headers.get("content-type")).toContain("application/json");
    expect(callback.headers.get("cache-control")).toBe("no-store");
    const body = JSON.parse(text);
    expect(body).toEqual({
      success: true,
      message: expect.stringContaining(branch.branchId),
      client_id: branch.clientId,
      branch_id: branch.branchId,
      expires_at: expect.any(String),
      // As Google reports them: `email` under its userinfo name.
      scope: `${testEnv.OAUTH_SCOPES} openid https://www.googleapis.com/auth/userinfo.email`,
      refresh_token_received: true,
    });
    const expiresAt = Date.parse(body.expires_at);
    expect(expiresAt).toBeGreaterThan(Date.now() + 3500_000);
    expect(expiresAt).toBeLessThan(Date.now() + 3700_000);
    const { accessToken, refreshToken } = await currentTokens(branch.clientId);
    expect(text).not.toContain(accessToken);
    expect(text).not.toContain(refreshToken as string);
    expect(text).not.toContain(branch.clientSecret);
  });

  it("answers an HTML page to a browser, without any token", async () => {
    const branch = await registerBranch({ workspaceName: "Café <Main>" });
    const { callback } = await runBrowserFlow(branch.loginUrl, "html");
    const text = await expectHtmlPage(callback, 200, /is now connected/);
    expect(text).toContain("Café &#60;Main&#62;");
    expect(text).not.toContain("<Main>");
    const { accessToken, refreshToken } = await currentTokens(branch.clientId);
    expect(text).not.toContain(accessToken);
    expect(text).not.toContain(refreshToken as string);
    expect(text).not.toContain("at_");
    expect(text).not.toContain("rt_");
  });

  it("records the provider's expiry as the token's expiry", async () => {
    const branch = await connectBranch({ providerBehavior: { accessTokenTtlSeconds: 120 } });
    const { row } = await currentTokens(branch.clientId);
    const expiresAt = Date.parse(row.expires_at);
    expect(expiresAt).toBeGreaterThan(Date.now() + 60_000);
    expect(expiresAt).toBeLessThan(Date.now() + 130_000);
    expect(Date.parse(branch.callbackBody.expires_at)).toBe(expiresAt);
  });

  it("sends the PKCE verifier and the client's credentials: the provider issued one code grant", async () => {
    const branch = await connectBranch();
    expect(await providerStats(branch.oauthClientId)).toMatchObject({
      authorizationCodeGrants: 1,
      failedRequests: 0,
      activeRefreshTokens: 1,
    });
  });

  it("a second flow of the same account renews its grant in place and keeps the old refresh token when none is sent", async () => {
    const branch = await connectBranch();
    const first = await currentTokens(branch.clientId);
    await setProviderBehavior(branch.oauthClientId, { issueRefreshToken: false });

    const second = await reconnectBranch(branch);
    expect(second.refresh_token_received).toBe(false);

    const rows = await tokenRows(branch.clientId);
    expect(rows).toHaveLength(1);
    expect(rows[0]?.is_valid).toBe(true);
    const now = await currentTokens(branch.clientId);
    expect(now.row.id).toBe(first.row.id);
    expect(now.accessToken).not.toBe(first.accessToken);
    expect(now.refreshToken).toBe(first.refreshToken);
    expect((await introspect(now.refreshToken as string, branch)).active).toBe(true);
  });

  it("a second flow with a new refresh token (another account signs in) stores the new one", async () => {
    const branch = await connectBranch();
    const first = await currentTokens(branch.clientId);
    await setProviderBehavior(branch.oauthClientId, { account: "someone-else@example.com" });
    const second = await reconnectBranch(branch);
    expect(second.refresh_token_received).toBe(true);
    const now = await currentTokens(branch.clientId);
    expect(now.refreshToken).not.toBe(first.refreshToken);
    expect((await tokenRows(branch.clientId)).filter((r) => r.is_valid)).toHaveLength(1);
  });

  for (const scheme of ["http", "https"] as const) {
    it(`lets one browser run two consents in parallel tabs, both completing (${scheme})`, async () => {
      const a = await registerBranch();
      const b = await registerBranch();
      const browser = new Browser(scheme === "https" ? HTTPS_BASE : BASE);
      const link = (url: string) => (scheme === "https" ? httpsUrl(url) : url);
      // Tab 1 starts, then tab 2 starts before tab 1 comes back; each finishes in the other order.
      const startA = await startLogin(link(a.loginUrl), {}, browser);
      const startB = await startLogin(link(b.loginUrl), {}, browser);
      const backA = await authorizeAtProvider(startA.authorizeUrl, browser);
      const backB = await authorizeAtProvider(startB.authorizeUrl, browser);
      const callbackB = await callCallback(backB, browser);
      expect(callbackB.status, await callbackB.text()).toBe(200);
      const callbackA = await callCallback(backA, browser);
      expect(callbackA.status, await callbackA.text()).toBe(200);
      expect(await tokenRows(a.clientId)).toHaveLength(1);
      expect(await tokenRows(b.clientId)).toHaveLength(1);
    });
  }
});

describe("callback: rejected", () => {
  it("answers 400 to a tampered state and stores nothing", async () => {
    const branch = await registerBranch();
    const start = await startLogin(branch.loginUrl);
    const back = await authorizeAtProvider(start.authorizeUrl);
    const state = back.searchParams.get("state") as string;
    // Flip a character in the middle of the ciphertext (the last one may only carry padding bits).
    const at = state.length - 20;
    back.searchParams.set("state", `${state.slice(0, at)}${state[at] === "A" ? "B" : "A"}${state.slice(at + 1)}`);
    const html = await expectHtmlPage(await callCallback(back, start.cookie, "html"), 400, /not valid/);
    expect(html).not.toContain(state);
    await expectProblem(await callCallback(back, start.cookie, "json"), 400, "invalid_state");
    expect(await tokenRows(branch.clientId)).toEqual([]);
    expect((await providerStats(branch.oauthClientId)).tokenRequests).toBe(0);
  });

  it("answers 400 to a callback without state or with garbage state", async () => {
    await expectProblem(await callCallback(`${BASE}/auth/callback?code=abc`, null), 400, "invalid_state");
    await expectProblem(
      await callCallback(`${BASE}/auth/callback?code=abc&state=v1.nope.nope.nope`, null),
      400,
      "invalid_state",
    );
  });

  it("answers 400 to a state that expired (sealed with a past expiry)", async () => {
    const branch = await registerBranch();
    const start = await startLogin(branch.loginUrl);
    const back = await authorizeAtProvider(start.authorizeUrl);
    const binding = start.cookie.split("=")[1] as string;
    const expired = await seal(
      await keyring(),
      JSON.stringify({
        c: branch.clientId,
        v: "x".repeat(43),
        b: await sha256(binding),
        n: crypto.randomUUID(),
        e: Date.now() - 1000,
        a: Date.now() - 2000,
        p: false,
      }),
      "oauth.state",
    );
    back.searchParams.set("state", expired);
    const problem = await expectProblem(await callCallback(back, start.cookie), 400, "invalid_state");
    expect(problem.detail).toMatch(/expired/);
    expect(await tokenRows(branch.clientId)).toEqual([]);
  });

  it("completeLogin refuses a genuine state 11 minutes after it was issued", async () => {
    const branch = await registerBranch();
    const start = await startLogin(branch.loginUrl);
    const back = await authorizeAtProvider(start.authorizeUrl);
    const config = parseEnv(testEnv);
    const db = createDb({
      databaseUrl: config.TOKEN_MANAGEMENT_DATABASE_URL,
      localFetchEndpoint: config.NEON_LOCAL_FETCH_ENDPOINT,
    });
    const later = new Date(Date.now() + 11 * 60_000);
    const attempt = completeLogin(
      db,
      await keyring(),
      providersOf(config),
      back.searchParams,
      start.cookie.split("=")[1],
      later,
      eventContext(false),
    );
    await expect(attempt).rejects.toBeInstanceOf(AppError);
    await expect(attempt).rejects.toMatchObject({ code: "invalid_state", message: expect.stringMatching(/expired/) });
    expect(await tokenRows(branch.clientId)).toEqual([]);

    // Within the ten minutes the same callback still works.
    expect((await callCallback(back, start.cookie)).status).toBe(200);
  });

  it("answers 400 to a replayed callback and stores nothing new", async () => {
    const branch = await registerBranch();
    const flow = await runBrowserFlow(branch.loginUrl);
    expect(flow.callback.status).toBe(200);
    const before = await tokenRows(branch.clientId);
    const statsBefore = await providerStats(branch.oauthClientId);

    const replay = await callCallback(flow.providerRedirect, flow.start.cookie);
    const problem = await expectProblem(replay, 400, "invalid_state");
    expect(problem.detail).toMatch(/already used/);
    expect(await tokenRows(branch.clientId)).toEqual(before);
    // The code was not sent again (a replayed code would make the provider revoke the grant).
    expect((await providerStats(branch.oauthClientId)).tokenRequests).toBe(statsBefore.tokenRequests);
    expect((await currentTokens(branch.clientId)).row.id).toBe(before[0]?.id);
  });

  it("lets only one of two concurrent callbacks for the same state exchange the code", async () => {
    const branch = await registerBranch();
    const start = await startLogin(branch.loginUrl);
    const back = await authorizeAtProvider(start.authorizeUrl);
    const [first, second] = await Promise.all([callCallback(back, start.cookie), callCallback(back, start.cookie)]);
    expect([first.status, second.status].sort()).toEqual([200, 400]);
    const loser = first.status === 400 ? first : second;
    expect((await expectProblem(loser, 400, "invalid_state")).detail).toMatch(/already used/);
    // One exchange only, so the provider saw no replayed code and the stored grant is alive.
    expect((await providerStats(branch.oauthClientId)).authorizationCodeGrants).toBe(1);
    const stored = await currentTokens(branch.clientId);
    expect((await introspect(stored.refreshToken!, branch)).active).toBe(true);
  });

  it("answers 400 when the binding cookie is missing", async () => {
    const branch = await registerBranch();
    const start = await startLogin(branch.loginUrl);
    const back = await authorizeAtProvider(start.authorizeUrl);
    await expectHtmlPage(await callCallback(back, null, "html"), 400, /another browser/);
    expect(await tokenRows(branch.clientId)).toEqual([]);
  });

  it("answers 400 when the binding cookie is another browser's", async () => {
    const branch = await registerBranch();
    const mine = await startLogin(branch.loginUrl);
    const theirs = await startLogin(branch.loginUrl);
    const back = await authorizeAtProvider(mine.authorizeUrl);
    await expectProblem(await callCallback(back, theirs.cookie), 400, "invalid_state");
    await expectProblem(await callCallback(back, `${BINDING_COOKIE_NAME}=x`), 400, "invalid_state");
    expect(await tokenRows(branch.clientId)).toEqual([]);
    // The right browser can still finish.
    expect((await callCallback(back, mine.cookie)).status).toBe(200);
  });

  it("answers 400 with a page when the user denies access at the provider", async () => {
    const branch = await registerBranch({ providerBehavior: { authorizeError: "access_denied" } });
    const start = await startLogin(branch.loginUrl);
    const back = await authorizeAtProvider(start.authorizeUrl);
    expect(back.searchParams.get("error")).toBe("access_denied");
    expect(back.searchParams.get("code")).toBeNull();
    const html = await expectHtmlPage(await callCallback(back, start.cookie, "html"), 400, /access_denied/);
    expect(html).toContain("Could not connect");
    await expectProblem(await callCallback(back, start.cookie), 400, "authorization_denied");
    expect(await tokenRows(branch.clientId)).toEqual([]);
    expect((await providerStats(branch.oauthClientId)).tokenRequests).toBe(0);
  });

  it("answers 502 with a page when the provider fails the exchange, and stores nothing", async () => {
    const branch = await registerBranch({ providerBehavior: { failNext: { status: 500, count: 1 } } });
    const { callback, providerRedirect, start } = await runBrowserFlow(branch.loginUrl, "html");
    await expectHtmlPage(callback, 502, /Something went wrong/);
    expect(await tokenRows(branch.clientId)).toEqual([]);
    expect((await providerStats(branch.oauthClientId)).failedRequests).toBe(1);
    // The flow can be finished once the provider is back.
    expect((await callCallback(providerRedirect, start.cookie)).status).toBe(200);
  });

  it("answers 502 when the provider times out", async () => {
    const branch = await registerBranch({ providerBehavior: { tokenDelayMs: 5_000 } });
    const start = await startLogin(branch.loginUrl);
    const back = await authorizeAtProvider(start.authorizeUrl);
    const response = await call(`${BASE}/auth/callback${back.search}`, {
      headers: { cookie: start.cookie, accept: "application/json" },
      envOverrides: { OAUTH_TIMEOUT_MS: "300" },
    });
    await expectProblem(response, 502, "provider_error");
    expect(await tokenRows(branch.clientId)).toEqual([]);
  });

  it("answers 502 when the provider rejects the stored client secret (invalid_client)", async () => {
    const branch = await registerBranch();
    // The provider knows another secret than the one registered here.
    await registerProviderClient(branch.oauthClientId, "a-different-secret-value", [branch.redirectUri]);
    const { callback } = await runBrowserFlow(branch.loginUrl);
    const problem = await expectProblem(callback, 502, "provider_error");
    expect(problem.detail).toMatch(/client credentials/);
    expect(JSON.stringify(problem)).not.toContain(branch.clientSecret);
    expect(await tokenRows(branch.clientId)).toEqual([]);
    // The client is flagged until a flow succeeds with good credentials.
    const view = async () =>
      (
        await json<{ connection: { credentials_rejected: boolean } }>(
          await call(`/clients/${branch.clientId}`, { key: "admin" }),
        )
      ).connection.credentials_rejected;
    expect(await view()).toBe(true);
    await registerProviderClient(branch.oauthClientId, branch.clientSecret, [branch.redirectUri]);
    expect((await runBrowserFlow(branch.loginUrl)).callback.status).toBe(200);
    expect(await view()).toBe(false);
  });

  it("answers 400 when the provider refuses the code (invalid_grant)", async () => {
    const branch = await registerBranch();
    const start = await startLogin(branch.loginUrl);
    const back = await authorizeAtProvider(start.authorizeUrl);
    back.searchParams.set("code", "code_forged");
    await expectProblem(await callCallback(back, start.cookie), 400, "authorization_denied");
    expect(await tokenRows(branch.clientId)).toEqual([]);
  });

  it("answers 404 when the client was deactivated during the flow", async () => {
    const branch = await registerBranch();
    const start = await startLogin(branch.loginUrl);
    const back = await authorizeAtProvider(start.authorizeUrl);
    await postJson(`/clients/${branch.clientId}`, { is_active: false }, { method: "PATCH" });
    await expectHtmlPage(await callCallback(back, start.cookie, "html"), 404);
    expect(await tokenRows(branch.clientId)).toEqual([]);
  });
});

describe("callback: issuer (RFC 9207)", () => {
  it("accepts the configured issuer, which is another origin than the token endpoint (as Google's)", async () => {
    expect(testEnv.OAUTH_ISSUER).toBeTruthy();
    expect(new URL(testEnv.OAUTH_ISSUER).origin).not.toBe(new URL(testEnv.OAUTH_TOKEN_URL).origin);
    const branch = await registerBranch();
    const { providerRedirect, callback } = await runBrowserFlow(branch.loginUrl);
    expect(providerRedirect.searchParams.get("iss")).toBe(testEnv.OAUTH_ISSUER);
    expect(callback.status, await callback.clone().text()).toBe(200);
    expect(await tokenRows(branch.clientId)).toHaveLength(1);
  });

  it("accepts an authorization response without iss (providers that do not send it)", async () => {
    const branch = await registerBranch({ providerBehavior: { issParameter: null } });
    const { providerRedirect, callback } = await runBrowserFlow(branch.loginUrl);
    expect(providerRedirect.searchParams.has("iss")).toBe(false);
    expect(callback.status, await callback.clone().text()).toBe(200);
    expect(await tokenRows(branch.clientId)).toHaveLength(1);
  });

  it("answers 400 to another iss, stores nothing, sends no code, and leaves the state usable", async () => {
    const branch = await registerBranch({ providerBehavior: { issParameter: "https://evil.example" } });
    const start = await startLogin(branch.loginUrl);
    const back = await authorizeAtProvider(start.authorizeUrl);
    expect(back.searchParams.get("iss")).toBe("https://evil.example");
    const problem = await expectProblem(await callCallback(back, start.cookie), 400, "bad_request");
    expect(problem.detail).toMatch(/another issuer \(https:\/\/evil\.example\)/);
    await expectHtmlPage(await callCallback(back, start.cookie, "html"), 400, /another issuer/);
    expect(await tokenRows(branch.clientId)).toEqual([]);
    expect((await providerStats(branch.oauthClientId)).tokenRequests).toBe(0);
    // The state was not burned: the genuine answer (same code, right issuer) still completes.
    back.searchParams.set("iss", testEnv.OAUTH_ISSUER);
    expect((await callCallback(back, start.cookie)).status).toBe(200);
    expect(await tokenRows(branch.clientId)).toHaveLength(1);
  });

  it("checks the issuer before an error answer: a mixed-up error is not shown as the provider's", async () => {
    const branch = await registerBranch({
      providerBehavior: { authorizeError: "access_denied", issParameter: "https://evil.example" },
    });
    const start = await startLogin(branch.loginUrl);
    const back = await authorizeAtProvider(start.authorizeUrl);
    await expectProblem(await callCallback(back, start.cookie), 400, "bad_request");
  });
});

describe("callback: connection status", () => {
  it("shows each client's own token only", async () => {
    const connected = await connectBranch();
    const idle = await registerBranch({ atProvider: false });
    const view = async (id: number) =>
      (await json<{ connection: { status: string } }>(await call(`/clients/${id}`, { key: "admin" }))).connection
        .status;
    expect(await view(connected.clientId)).toBe("connected");
    expect(await view(idle.clientId)).toBe("never_connected");
  });
});
