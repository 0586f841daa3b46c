// One Google account, many locations: consents join the account's grant (OpenID Connect `sub`).
import { describe, expect, it } from "vitest";
import { createServices } from "../../src/context";
import { sweepTimeLimitedGrants } from "../../src/services/grants";
import { eventsOf } from "./event-helpers";
import { call, expectProblem, json, type TestEnv, testEnv, uniqueId } from "./helpers";
import {
  connectBranch,
  providerStats,
  type RegisteredBranch,
  registerBranch,
  revokeAtProvider,
  runBrowserFlow,
  setProviderBehavior,
  sql,
} from "./oauth-helpers";

interface ClientBody {
  grant_id: number | null;
  connection: { status: string };
}

interface GrantBody {
  grant_id: number;
  account: { subject: string | null; email: string | null };
  refresh_tokens_minted: number;
  token_limit_near: boolean;
  access_ends_at: string | null;
  branches: { client_id: number }[];
}

const clientBody = async (id: number) => json<ClientBody>(await call(`/clients/${id}`, { key: "admin" }));
const grantBody = async (id: number) => json<GrantBody>(await call(`/grants/${id}`, { key: "admin" }));
const getToken = (branchId: string) => call(`/tokens/${encodeURIComponent(branchId)}`, { key: "service" });

/** Another branch of the same app (same OAuth client), not yet connected. */
function sibling(of: RegisteredBranch): Promise<RegisteredBranch> {
  return registerBranch({ oauthClientId: of.oauthClientId, clientSecret: of.clientSecret, atProvider: false });
}

async function consent(branch: RegisteredBranch) {
  const { start, callback } = await runBrowserFlow(branch.loginUrl);
  return { authorizeUrl: new URL(start.authorizeUrl), status: callback.status, body: await callback.text() };
}

describe("one Google account, many locations", () => {
  it("asks for openid email and sends a nonce; the grant knows the account", async () => {
    const first = await registerBranch();
    const { authorizeUrl, status, body } = await consent(first);
    expect(status, body).toBe(200);
    const scope = authorizeUrl.searchParams.get("scope")!.split(" ");
    expect(scope).toEqual(
      expect.arrayContaining(["https://www.googleapis.com/auth/business.manage", "openid", "email"]),
    );
    expect(authorizeUrl.searchParams.get("nonce")).toMatch(/^[A-Za-z0-9_-]{43}$/);
    expect(authorizeUrl.searchParams.get("prompt")).toBeNull();
    const grant = await grantBody((await clientBody(first.clientId)).grant_id!);
    expect(grant.account.subject).toMatch(/^\d{21}$/);
    expect(grant.account.email).toBe("user@example.com");
    expect(grant.refresh_tokens_minted).toBe(1);
  });

  it("ten locations of one account share one grant: one refresh token minted, no consent screen forced", async () => {
    const first = await connectBranch();
    const grantId = (await clientBody(first.clientId)).grant_id!;
    for (let i = 0; i < 9; i++) {
      const next = await sibling(first);
      const { authorizeUrl, status, body } = await consent(next);
      // Google issues no refresh token to an account that holds one: no error, the branch joins.
      expect(status, body).toBe(200);
      expect(authorizeUrl.searchParams.get("prompt")).toBeNull();
      expect((await clientBody(next.clientId)).grant_id).toBe(grantId);
      expect((await getToken(next.branchId)).status).toBe(200);
    }
    const stats = await providerStats(first.oauthClientId);
    expect(stats.activeRefreshTokens).toBe(1);
    const grant = await grantBody(grantId);
    expect(grant.branches).toHaveLength(10);
    expect(grant.refresh_tokens_minted).toBe(1);
    // No revocation at the provider from any of these consents.
    expect(stats.revocations).toBe(0);
  });

  it("another account on the same app gets its own grant", async () => {
    const first = await connectBranch();
    const other = await sibling(first);
    await setProviderBehavior(first.oauthClientId, { account: `${uniqueId("owner")}@example.com` });
    const { status, body } = await consent(other);
    expect(status, body).toBe(200);
    const mine = (await clientBody(first.clientId)).grant_id;
    const theirs = (await clientBody(other.clientId)).grant_id;
    expect(theirs).not.toBe(mine);
    expect((await getToken(first.branchId)).status).toBe(200);
  });

  it("a consent that renews a dead grant of the account brings back every branch behind it, one event each", async () => {
    const first = await connectBranch();
    const second = await sibling(first);
    expect((await consent(second)).status).toBe(200);
    const grantId = (await clientBody(first.clientId)).grant_id!;
    await sql("update tokens set status = 'needs_reauth', is_valid = false where id = $1", [grantId]);
    // The user removed access at Google meanwhile: the next consent brings a new refresh token.
    await revokeAtProvider(first.oauthClientId);
    const link = await json<{ login_url: string }>(
      await call(`/clients/${first.clientId}/login-url`, { key: "admin" }),
    );
    const { callback } = await runBrowserFlow(link.login_url);
    expect(callback.status, await callback.clone().text()).toBe(200);
    expect((await clientBody(first.clientId)).grant_id).toBe(grantId);
    expect((await getToken(second.branchId)).status).toBe(200);
    const secondEvents = (await eventsOf(second.clientId)).map((e) => e.type);
    expect(secondEvents.at(-1)).toBe("connection.recovered");
    expect((await grantBody(grantId)).refresh_tokens_minted).toBe(2);
  });

  it("warns before Google's 100-token cap: grant.token_limit_near naming the app and account", async () => {
    const first = await connectBranch();
    const grantId = (await clientBody(first.clientId)).grant_id!;
    await sql("update tokens set refresh_tokens_minted = 89 where id = $1", [grantId]);
    // A consent that forces the consent screen mints another refresh token for the account.
    await sql("update clients set consent_problem = 'no_refresh_token' where id = $1", [first.clientId]);
    const link = await json<{ login_url: string }>(
      await call(`/clients/${first.clientId}/login-url`, { key: "admin" }),
    );
    const { start, callback } = await runBrowserFlow(link.login_url);
    expect(new URL(start.authorizeUrl).searchParams.get("prompt")).toBe("consent");
    expect(callback.status, await callback.clone().text()).toBe(200);
    const grant = await grantBody(grantId);
    expect(grant).toMatchObject({ refresh_tokens_minted: 90, token_limit_near: true });
    const warning = (await eventsOf(first.clientId)).find((e) => e.type === "grant.token_limit_near");
    expect(warning?.reason).toContain("user@example.com");
    expect(warning?.reason).toContain("90 refresh tokens");
  });

  it("refuses an ID token from another issuer or for another audience, storing nothing; accepts Google's bare issuer", async () => {
    for (const behavior of [{ idTokenIssuer: "https://evil.example" }, { idTokenAudience: "someone-else" }]) {
      const branch = await registerBranch({ providerBehavior: behavior });
      const { status } = await consent(branch);
      expect(status).toBe(502);
      expect((await clientBody(branch.clientId)).grant_id).toBeNull();
      await expectProblem(await getToken(branch.branchId), 409, "not_connected");
    }
    const bare = await registerBranch({ providerBehavior: { idTokenIssuer: "bare" } });
    expect((await consent(bare)).status).toBe(200);
  });
});

async function sweep(now = new Date()) {
  const services = await createServices(testEnv as TestEnv);
  return sweepTimeLimitedGrants(services.db, services.events, now, services.config.GRANT_EXPIRY_WARNING_SECONDS);
}

describe("time-limited access", () => {
  it("is seen before it ends (connection.expiring once per branch) and ends without a provider call", async () => {
    const first = await connectBranch({ providerBehavior: { refreshTokenLifetimeSeconds: 24 * 3600 } });
    const second = await sibling(first);
    expect((await consent(second)).status).toBe(200);
    const grantId = (await clientBody(first.clientId)).grant_id!;
    const grant = await grantBody(grantId);
    const endsAt = Date.parse(grant.access_ends_at!);
    expect(endsAt).toBeGreaterThan(Date.now() + 23 * 3600_000);
    expect(endsAt).toBeLessThan(Date.now() + 25 * 3600_000);

    await sweep();
    await sweep();
    for (const branch of [first, second]) {
      const expiring = (await eventsOf(branch.clientId)).filter((e) => e.type === "connection.expiring");
      expect(expiring).toHaveLength(1);
      expect(expiring[0]?.reason).toContain("limited time");
    }

    // The end passes: a read of an expired access token is a 409 with no refresh attempted.
    await sql(
      "update tokens set refresh_token_expires_at = now() - interval '1 second', expires_at = now() - interval '1 second' where id = $1",
      [grantId],
    );
    const before = await providerStats(first.oauthClientId);
    await expectProblem(await getToken(first.branchId), 409, "reauthorization_required");
    expect((await providerStats(first.oauthClientId)).refreshGrants).toBe(before.refreshGrants);
    // The cron moves the grant to needs_reauth, one event per branch.
    expect((await sweep()).ended).toBeGreaterThanOrEqual(2);
    for (const branch of [first, second]) {
      expect((await clientBody(branch.clientId)).connection.status).toBe("needs_reauth");
      expect((await eventsOf(branch.clientId)).map((e) => e.type)).toContain("connection.needs_reauth");
    }
  });

  it("a google grant that dies about 7 days after its consent marks its app as probably in Testing", async () => {
    const young = await connectBranch();
    const old = await connectBranch();
    for (const [branch, days] of [
      [young, 1],
      [old, 7],
    ] as const) {
      const grantId = (await clientBody(branch.clientId)).grant_id!;
      await sql(`update tokens set consented_at = now() - interval '${days} days' where id = $1`, [grantId]);
      await revokeAtProvider(branch.oauthClientId);
      const refreshed = await call("/tokens/refresh", {
        key: "admin",
        method: "POST",
        headers: { "content-type": "application/json" },
        body: JSON.stringify({ branch_id: branch.branchId }),
      });
      await expectProblem(refreshed, 409, "reauthorization_required");
    }
    const appOf = async (branch: RegisteredBranch) => {
      const appId = (await json<{ app_id: number }>(await call(`/clients/${branch.clientId}`, { key: "admin" })))
        .app_id;
      return json<{ testing_suspected_at: string | null }>(await call(`/apps/${appId}`, { key: "admin" }));
    };
    expect((await appOf(young)).testing_suspected_at).toBeNull();
    expect((await appOf(old)).testing_suspected_at).not.toBeNull();
  });
});

describe("a login link bound to the account expected to consent", () => {
  const boundLink = async (branch: RegisteredBranch, account: string) =>
    (
      await json<{ login_url: string }>(
        await call(`/clients/${branch.clientId}/login-url?account=${encodeURIComponent(account)}`, { key: "admin" }),
      )
    ).login_url;

  it("stores nothing when another account signs in, and connects the expected one (login_hint sent)", async () => {
    const branch = await registerBranch();
    const wrong = await runBrowserFlow(await boundLink(branch, "someone.else@example.com"));
    expect(new URL(wrong.start.authorizeUrl).searchParams.get("login_hint")).toBe("someone.else@example.com");
    expect(wrong.callback.status).toBe(400);
    expect(await wrong.callback.text()).toContain("someone.else@example.com");
    expect((await clientBody(branch.clientId)).grant_id).toBeNull();

    const right = await runBrowserFlow(await boundLink(branch, "USER@example.com"));
    expect(right.callback.status, await right.callback.clone().text()).toBe(200);
    expect((await clientBody(branch.clientId)).grant_id).not.toBeNull();
  });

  it("a link whose account was changed is not valid", async () => {
    const branch = await registerBranch();
    const link = new URL(await boundLink(branch, "user@example.com"));
    link.searchParams.set("account", "attacker@example.com");
    const response = await call(link.toString());
    expect(response.status).toBe(401);
  });
});
