import { describe, expect, it } from "vitest";
import { toBase64Url } from "../../src/lib/encoding";
import { call, expectProblem, json, testEnv } from "./helpers";
import {
  connectBranch,
  currentTokens,
  introspect,
  postJson,
  providerStats,
  type RegisteredBranch,
  registerBranch,
  runBrowserFlow,
  setProviderBehavior,
  TEST_REDIRECT_URI,
  tokenRows,
} from "./oauth-helpers";

/**
 * The service against the local server's Google profile (the default of these tests): granular
 * consent, no refresh token on a second consent, refreshes without a new refresh token and with
 * expires_in 3599, Google's invalid_grant wording, the 100 refresh tokens per account.
 */

const BUSINESS_MANAGE = "https://www.googleapis.com/auth/business.manage";

interface ConnectionView {
  status: string;
  expires_at: string | null;
  last_error: string | null;
  consent_problem: { code: string; detail: string; at: string } | null;
}

async function connection(clientId: number): Promise<ConnectionView> {
  return (await json<{ connection: ConnectionView }>(await call(`/clients/${clientId}`, { key: "admin" }))).connection;
}

async function freshLink(branch: RegisteredBranch): Promise<string> {
  const response = await call(`/clients/${branch.clientId}/login-url`, { key: "admin" });
  return (await json<{ login_url: string }>(response)).login_url;
}

/**
 * A consent and code exchange made directly at the provider with the branch's OAuth client, as an
 * earlier installation (whose database is gone) or another program using the same client would.
 */
async function consentElsewhere(branch: RegisteredBranch, prompt?: "consent"): Promise<{ refresh_token?: string }> {
  const verifier = toBase64Url(crypto.getRandomValues(new Uint8Array(32)));
  const challenge = toBase64Url(await crypto.subtle.digest("SHA-256", new TextEncoder().encode(verifier)));
  const authorize = new URL(`${testEnv.OAUTH_SERVER_URL}/authorize`);
  for (const [name, value] of Object.entries({
    response_type: "code",
    client_id: branch.oauthClientId,
    redirect_uri: TEST_REDIRECT_URI,
    scope: BUSINESS_MANAGE,
    code_challenge: challenge,
    code_challenge_method: "S256",
    access_type: "offline",
    ...(prompt ? { prompt } : {}),
  })) {
    authorize.searchParams.set(name, value);
  }
  const back = await fetch(authorize, { redirect: "manual" });
  const code = new URL(back.headers.get("location") ?? "").searchParams.get("code") ?? "";
  const token = await fetch(`${testEnv.OAUTH_SERVER_URL}/token`, {
    method: "POST",
    headers: { "content-type": "application/x-www-form-urlencoded" },
    body: new URLSearchParams({
      grant_type: "authorization_code",
      code,
      redirect_uri: TEST_REDIRECT_URI,
      code_verifier: verifier,
      client_id: branch.oauthClientId,
      client_secret: branch.clientSecret,
    }),
  });
  expect(token.status).toBe(200);
  return (await token.json()) as { refresh_token?: string };
}

describe("granular consent: a required scope left unticked", () => {
  it("is shown on the page and in the status, stores nothing, revokes the partial grant; the link still works", async () => {
    const branch = await registerBranch({ providerBehavior: { untickedScopes: [BUSINESS_MANAGE] } });
    const page = await runBrowserFlow(branch.loginUrl, "html");
    const html = await page.callback.text();
    expect(page.callback.status).toBe(400);
    expect(html).toContain("Not every permission was granted");
    expect(html).toContain(BUSINESS_MANAGE);
    expect(await tokenRows(branch.clientId)).toEqual([]);
    const view = await connection(branch.clientId);
    expect(view.status).toBe("never_connected");
    expect(view.consent_problem).toMatchObject({ code: "scopes_not_granted" });
    expect(view.consent_problem?.detail).toContain(BUSINESS_MANAGE);
    // The partial grant did not linger at the provider.
    expect((await providerStats(branch.oauthClientId)).activeRefreshTokens).toBe(0);

    // JSON callers get the missing scopes; the same link works once every box is ticked.
    const json = await runBrowserFlow(branch.loginUrl);
    const problem = await expectProblem(json.callback, 400, "authorization_denied");
    expect((problem as { missing_scopes?: string[] }).missing_scopes).toEqual([BUSINESS_MANAGE]);
    await setProviderBehavior(branch.oauthClientId, { untickedScopes: [] });
    expect((await runBrowserFlow(branch.loginUrl)).callback.status).toBe(200);
    expect(await connection(branch.clientId)).toMatchObject({ status: "connected", consent_problem: null });
  });

  it("never costs an existing healthy connection: it is kept, served, and the problem is reported beside it", async () => {
    const branch = await connectBranch();
    const healthy = await currentTokens(branch.clientId);
    await setProviderBehavior(branch.oauthClientId, { untickedScopes: [BUSINESS_MANAGE] });
    const flow = await runBrowserFlow(await freshLink(branch));
    expect((await expectProblem(flow.callback, 400, "authorization_denied")).detail).toMatch(
      /existing connection is kept/,
    );
    expect((await currentTokens(branch.clientId)).accessToken).toBe(healthy.accessToken);
    // Same account: revoking the partial grant would have revoked the healthy one (Google), so it was not.
    expect((await introspect(healthy.refreshToken as string, branch)).active).toBe(true);
    expect((await providerStats(branch.oauthClientId)).revocations).toBe(0);
    expect(await connection(branch.clientId)).toMatchObject({
      status: "connected",
      consent_problem: { code: "scopes_not_granted" },
    });
    const read = await call(`/tokens/${branch.branchId}`, { key: "service" });
    expect(read.status).toBe(200);
  });

  it("by another account while a healthy grant exists: that account's partial grant is revoked, ours is kept", async () => {
    const branch = await connectBranch();
    const healthy = await currentTokens(branch.clientId);
    await setProviderBehavior(branch.oauthClientId, {
      untickedScopes: [BUSINESS_MANAGE],
      account: "someone-else@example.com",
    });
    await expectProblem((await runBrowserFlow(await freshLink(branch))).callback, 400, "authorization_denied");
    expect((await introspect(healthy.refreshToken as string, branch)).active).toBe(true);
    expect((await providerStats(branch.oauthClientId)).activeRefreshTokens).toBe(1);
  });
});

describe("a consent that brings no refresh token", () => {
  it("with none to carry over: says re-consent is needed (page and status), stores nothing, and the next sign-in forces the consent screen", async () => {
    const branch = await registerBranch();
    // The account already holds a live grant for this client that we never saw: Google sends no refresh token.
    await consentElsewhere(branch);
    const first = await runBrowserFlow(branch.loginUrl, "html");
    expect(first.start.authorizeUrl.searchParams.get("prompt")).toBeNull();
    const html = await first.callback.text();
    expect(first.callback.status).toBe(409);
    expect(html).toContain("did not issue a refresh token");
    expect(html).toContain("prompt=consent");
    expect(await tokenRows(branch.clientId)).toEqual([]);
    expect((await connection(branch.clientId)).consent_problem).toMatchObject({ code: "no_refresh_token" });

    // The same link (nothing was stored with it) now asks for the consent screen and connects.
    const second = await runBrowserFlow(branch.loginUrl);
    expect(second.start.authorizeUrl.searchParams.get("prompt")).toBe("consent");
    expect(second.callback.status).toBe(200);
    const body = await json<{ refresh_token_received: boolean }>(second.callback);
    expect(body.refresh_token_received).toBe(true);
    expect(await connection(branch.clientId)).toMatchObject({ status: "connected", consent_problem: null });
    expect((await providerStats(branch.oauthClientId)).revocations).toBe(0);
  });

  it("answers problem+json with reconsent_with_prompt_consent to JSON callers", async () => {
    const branch = await registerBranch();
    await consentElsewhere(branch);
    const problem = await expectProblem(
      (await runBrowserFlow(branch.loginUrl)).callback,
      409,
      "reauthorization_required",
    );
    expect((problem as { reconsent_with_prompt_consent?: boolean }).reconsent_with_prompt_consent).toBe(true);
  });
});

describe("refreshing against Google", () => {
  it("keeps the stored refresh token (none is sent back) and takes expires_in 3599", async () => {
    const branch = await connectBranch();
    const before = await currentTokens(branch.clientId);
    const sentAt = Date.now();
    const response = await postJson("/tokens/refresh", { client_id: branch.clientId });
    expect(response.status).toBe(200);
    const after = await currentTokens(branch.clientId);
    expect(after.accessToken).not.toBe(before.accessToken);
    expect(after.refreshToken).toBe(before.refreshToken);
    const answeredAt = Date.now();
    // Expiry counts from when the refresh was sent, somewhere between these two instants.
    const expiresAt = Date.parse(after.row.expires_at);
    expect(expiresAt).toBeGreaterThanOrEqual(sentAt + 3599_000);
    expect(expiresAt).toBeLessThanOrEqual(answeredAt + 3599_000);
  });

  it("a refresh token silently pushed out by 100 newer ones ends as needs_reauth with a way to reconnect", async () => {
    const branch = await connectBranch();
    // The same account consents 100 more times elsewhere with prompt=consent: ours is the oldest, dropped.
    for (let i = 0; i < 100; i++) await consentElsewhere(branch, "consent");
    expect((await providerStats(branch.oauthClientId)).activeRefreshTokens).toBe(100);
    const response = await postJson("/tokens/refresh", { client_id: branch.clientId });
    await expectProblem(response, 409, "reauthorization_required");
    const view = await connection(branch.clientId);
    expect(view.status).toBe("needs_reauth");
    expect(view.last_error).toMatch(/invalid_grant/);
  });
});
