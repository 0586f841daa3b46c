import { describe, expect, it } from "vitest";
import { loadKeyring, sign } from "../../src/lib/crypto";
import { TEST_ENCRYPTION_KEY } from "./bindings";
import { Browser } from "./browser";
import { call, expectProblem, json, testEnv } from "./helpers";
import {
  authorizeAtProvider,
  callCallback,
  connectBranch,
  currentTokens,
  introspect,
  providerStats,
  type RegisteredBranch,
  registerBranch,
  runBrowserFlow,
  setProviderBehavior,
  startLogin,
  tokenRows,
} from "./oauth-helpers";

/**
 * Login links are capabilities: single use once a consent stored tokens, revocable one by one
 * (revoke_previous) or all at once, bounded in time; and a consent that replaces a grant revokes
 * the old one at the provider only when that cannot revoke the new one too (Google revokes every
 * token of an account and client at once).
 */

async function newLink(branch: RegisteredBranch, query = ""): Promise<Response> {
  return call(`/clients/${branch.clientId}/login-url${query}`, { key: "admin" });
}

async function linkOf(response: Response): Promise<string> {
  expect(response.status).toBe(200);
  return (await json<{ login_url: string }>(response)).login_url;
}

async function connection(clientId: number) {
  const response = await call(`/clients/${clientId}`, { key: "admin" });
  return (
    await json<{
      connection: {
        status: string;
        consent_problem: { code: string; detail: string; at: string } | null;
      };
    }>(response)
  ).connection;
}

describe("login links: single use", () => {
  it("a link stops working once a consent made with it stored tokens; so do older links, newer ones work", async () => {
    const branch = await registerBranch();
    const older = await linkOf(await newLink(branch));
    const used = await linkOf(await newLink(branch));
    expect((await runBrowserFlow(used)).callback.status).toBe(200);
    const newer = await linkOf(await newLink(branch));

    for (const link of [used, older, branch.loginUrl]) {
      const response = await call(link);
      expect(response.status).toBe(401);
      expect(await response.text()).toMatch(/already used to connect the branch, or it was revoked/);
      expect(response.headers.get("set-cookie")).toBeNull();
    }
    expect((await call(newer)).status).toBe(302);
  });

  it("a link whose consent stored nothing (provider failure) still works", async () => {
    const branch = await registerBranch({
      providerBehavior: { failNext: { status: 400, error: "invalid_grant", count: 1 } },
    });
    expect((await runBrowserFlow(branch.loginUrl)).callback.status).toBe(400);
    expect((await runBrowserFlow(branch.loginUrl)).callback.status).toBe(200);
  });

  it("two tabs with two consents for one client: the first callback stores, the second gets 409 and stores nothing", async () => {
    const branch = await registerBranch();
    const browser = new Browser();
    const first = await startLogin(branch.loginUrl, {}, browser);
    const second = await startLogin(branch.loginUrl, {}, browser);
    const backFirst = await authorizeAtProvider(first.authorizeUrl, browser);
    const backSecond = await authorizeAtProvider(second.authorizeUrl, browser);
    expect((await callCallback(backSecond, browser)).status).toBe(200);
    const stored = await currentTokens(branch.clientId);
    const loser = await callCallback(backFirst, browser);
    const problem = await expectProblem(loser, 409, "conflict");
    expect(problem.detail).toMatch(/finished first/);
    expect(await tokenRows(branch.clientId)).toHaveLength(1);
    expect((await currentTokens(branch.clientId)).accessToken).toBe(stored.accessToken);
    expect((await introspect(stored.refreshToken as string, branch)).active).toBe(true);
  });

  it("two concurrent callbacks with different states: exactly one stores, the other gets a clear 409", async () => {
    const branch = await registerBranch();
    const a = await linkOf(await newLink(branch));
    const b = await linkOf(await newLink(branch));
    const browserA = new Browser();
    const browserB = new Browser();
    const backA = await authorizeAtProvider((await startLogin(a, {}, browserA)).authorizeUrl, browserA);
    // Another person (another account) consents through the other link at the same time.
    await setProviderBehavior(branch.oauthClientId, { account: "someone-else@example.com" });
    const backB = await authorizeAtProvider((await startLogin(b, {}, browserB)).authorizeUrl, browserB);
    const [ra, rb] = await Promise.all([callCallback(backA, browserA), callCallback(backB, browserB)]);
    expect([ra.status, rb.status].sort()).toEqual([200, 409]);
    await expectProblem(ra.status === 409 ? ra : rb, 409, "conflict");
    const rows = await tokenRows(branch.clientId);
    expect(rows).toHaveLength(1);
    // The loser's tokens came from a grant of its own (a first consent): they were revoked, the winner's live on.
    const stored = await currentTokens(branch.clientId);
    expect((await introspect(stored.refreshToken as string, branch)).active).toBe(true);
    expect((await providerStats(branch.oauthClientId)).activeRefreshTokens).toBe(1);
  });
});

describe("login links: revocation", () => {
  it("revoke_previous=true: earlier links stop working, the new one works; the answer is not cacheable", async () => {
    const branch = await registerBranch();
    const response = await newLink(branch, "?revoke_previous=true");
    expect(response.headers.get("cache-control")).toBe("no-store");
    const fresh = await linkOf(response);
    expect((await call(branch.loginUrl)).status).toBe(401);
    expect((await call(fresh)).status).toBe(302);
    // Without it, earlier links keep working.
    const another = await linkOf(await newLink(branch, "?revoke_previous=false"));
    expect((await call(fresh)).status).toBe(302);
    expect((await call(another)).status).toBe(302);
  });

  it("POST /clients/{id}/login-links/revoke ends every outstanding link and every consent begun with one", async () => {
    const branch = await connectBranch();
    const healthy = await currentTokens(branch.clientId);
    const pending = await linkOf(await newLink(branch));
    const browser = new Browser();
    const inFlight = await startLogin(pending, {}, browser);
    await setProviderBehavior(branch.oauthClientId, { account: "someone-else@example.com" });
    const back = await authorizeAtProvider(inFlight.authorizeUrl, browser);

    const revoked = await call(`/clients/${branch.clientId}/login-links/revoke`, { method: "POST", key: "admin" });
    expect(revoked.status).toBe(200);
    const body = await json<{ client_id: number; revoked_before: string }>(revoked);
    expect(body.client_id).toBe(branch.clientId);
    expect(Date.parse(body.revoked_before)).toBeLessThanOrEqual(Date.now());

    expect((await call(pending)).status).toBe(401);
    await expectProblem(await callCallback(back, browser), 409, "conflict");
    // Nothing changed for the existing connection, and the unstored grant did not linger.
    expect((await currentTokens(branch.clientId)).accessToken).toBe(healthy.accessToken);
    expect((await connection(branch.clientId)).status).toBe("connected");
    expect((await providerStats(branch.oauthClientId)).activeRefreshTokens).toBe(1);
    // A link issued afterwards works.
    expect((await call(await linkOf(await newLink(branch)))).status).toBe(302);
  });

  it("answers problem+json to bad input: unknown client 404, bad id or query 422, wrong keys 401/403", async () => {
    await expectProblem(
      await call("/clients/2147483000/login-links/revoke", { method: "POST", key: "admin" }),
      404,
      "not_found",
    );
    await expectProblem(await call("/clients/0/login-links/revoke", { method: "POST", key: "admin" }), 422);
    await expectProblem(await call("/clients/abc/login-links/revoke", { method: "POST", key: "admin" }), 422);
    await expectProblem(await call("/clients/1/login-links/revoke", { method: "POST" }), 401);
    await expectProblem(await call("/clients/1/login-links/revoke", { method: "POST", key: "service" }), 403);
    const branch = await registerBranch({ atProvider: false });
    await expectProblem(await newLink(branch, "?revoke_previous=maybe"), 422, "validation_failed");
    await expectProblem(await newLink(branch, "?other=1"), 422, "validation_failed");
    await expectProblem(await call("/clients/2147483000/login-url?revoke_previous=true", { key: "admin" }), 404);
  });

  it("refuses links of the first format (no issue time): the upgrade invalidated them", async () => {
    const branch = await registerBranch({ atProvider: false });
    const expires = Math.floor(Date.now() / 1000) + 3600;
    const signature = await sign(await loadKeyring(TEST_ENCRYPTION_KEY), `login:${branch.clientId}:${expires}`);
    const old = `/oauth/login/${branch.clientId}?expires=${expires}&signature=${encodeURIComponent(signature)}`;
    const response = await call(old);
    expect(response.status).toBe(401);
    expect(await response.text()).toMatch(/before an upgrade/);
  });
});

describe("login links: lifetime", () => {
  it("lasts 72 hours by default", async () => {
    const branch = await registerBranch({ atProvider: false });
    const { expires_at: expiresAt } = await json<{ expires_at: string }>(await newLink(branch));
    const hours = (Date.parse(expiresAt) - Date.now()) / 3600_000;
    expect(hours).toBeGreaterThan(71.9);
    expect(hours).toBeLessThanOrEqual(72);
  });

  it("refuses to start with LOGIN_LINK_TTL_SECONDS above 7 days; 7 days is accepted", async () => {
    const branch = await registerBranch({ atProvider: false });
    const tooLong = await call(`/clients/${branch.clientId}/login-url`, {
      key: "admin",
      envOverrides: { LOGIN_LINK_TTL_SECONDS: "604801" },
    });
    const problem = await expectProblem(tooLong, 500, "configuration_error");
    expect(problem.detail).toMatch(/LOGIN_LINK_TTL_SECONDS/);
    const week = await call(`/clients/${branch.clientId}/login-url`, {
      key: "admin",
      envOverrides: { LOGIN_LINK_TTL_SECONDS: "604800" },
    });
    expect(week.status).toBe(200);
  });
});

describe("a consent that replaces a grant", () => {
  it("another account: the new grant is stored, then the old one is revoked at the provider", async () => {
    const branch = await connectBranch();
    const old = await currentTokens(branch.clientId);
    await setProviderBehavior(branch.oauthClientId, { account: "new-owner@example.com" });
    expect((await runBrowserFlow(await linkOf(await newLink(branch)))).callback.status).toBe(200);
    const now = await currentTokens(branch.clientId);
    expect(now.refreshToken).not.toBe(old.refreshToken);
    expect((await introspect(old.refreshToken as string, branch)).active).toBe(false);
    expect((await introspect(now.refreshToken as string, branch)).active).toBe(true);
    expect((await providerStats(branch.oauthClientId)).revocations).toBe(1);
  });

  it("the same account again: no new refresh token, the old one is carried over and nothing is revoked", async () => {
    const branch = await connectBranch();
    const old = await currentTokens(branch.clientId);
    const again = await runBrowserFlow(await linkOf(await newLink(branch)));
    expect(again.callback.status).toBe(200);
    const now = await currentTokens(branch.clientId);
    expect(now.refreshToken).toBe(old.refreshToken);
    expect((await introspect(old.refreshToken as string, branch)).active).toBe(true);
    expect((await providerStats(branch.oauthClientId)).revocations).toBe(0);
  });

  it("the same account with prompt=consent: a new refresh token of the same grant, so the old one is not revoked (it would take the new one with it)", async () => {
    const branch = await connectBranch();
    const old = await currentTokens(branch.clientId);
    const forced = { OAUTH_EXTRA_AUTHORIZATION_PARAMS: "access_type=offline&prompt=consent" };
    const flow = await runBrowserFlow(await linkOf(await newLink(branch)), "json", { envOverrides: forced });
    expect(flow.start.authorizeUrl.searchParams.get("prompt")).toBe("consent");
    expect(flow.callback.status).toBe(200);
    const now = await currentTokens(branch.clientId);
    expect(now.refreshToken).not.toBe(old.refreshToken);
    expect((await providerStats(branch.oauthClientId)).revocations).toBe(0);
    expect((await introspect(now.refreshToken as string, branch)).active).toBe(true);
    // Why: at Google, revoking the old refresh token revokes the account's whole grant, the new token included.
    const revoke = await fetch(
      `${testEnv.OAUTH_SERVER_URL}/revoke?token=${encodeURIComponent(old.refreshToken as string)}`,
      {
        method: "POST",
      },
    );
    expect(revoke.status).toBe(200);
    expect((await introspect(now.refreshToken as string, branch)).active).toBe(false);
  });

  it("a textbook provider without OpenID Connect (one grant per consent): the old grant is revoked, the new one lives", async () => {
    const noOidc = { envOverrides: { OAUTH_OPENID: "false" } };
    const branch = await registerBranch({ providerBehavior: { profile: "textbook" } });
    expect((await runBrowserFlow(branch.loginUrl, "json", noOidc)).callback.status).toBe(200);
    const old = await currentTokens(branch.clientId);
    expect((await runBrowserFlow(await linkOf(await newLink(branch)), "json", noOidc)).callback.status).toBe(200);
    const now = await currentTokens(branch.clientId);
    expect((await introspect(old.refreshToken as string, branch)).active).toBe(false);
    expect((await introspect(now.refreshToken as string, branch)).active).toBe(true);
  });

  it("a failed revocation of the old grant does not undo the new connection", async () => {
    const branch = await connectBranch();
    await setProviderBehavior(branch.oauthClientId, { account: "new-owner@example.com" });
    const link = await linkOf(await newLink(branch));
    const flow = await runBrowserFlow(link, "json", {
      envOverrides: { OAUTH_REVOCATION_URL: "http://127.0.0.1:9/revoke" },
    });
    expect(flow.callback.status).toBe(200);
    expect((await connection(branch.clientId)).status).toBe("connected");
  });
});
