// Apps, grants and branches: many branches on one app, served from one grant.
import { describe, expect, it, vi } from "vitest";
import { createServices } from "../../src/context";
import { listBranches } from "../../src/services/branch-list";
import { eventsOf } from "./event-helpers";
import { call, expectProblem, json, type TestEnv, testEnv, uniqueId } from "./helpers";
import {
  appRowOf,
  connectBranch,
  currentTokens,
  postJson,
  providerStats,
  type RegisteredBranch,
  registerBranch,
  registerProviderClient,
  runBrowserFlow,
  sql,
} from "./oauth-helpers";

interface ClientBody {
  client_id: number;
  app_id: number;
  grant_id: number | null;
  connection: { status: string };
}

const getToken = (branchId: string) => call(`/tokens/${encodeURIComponent(branchId)}`, { key: "service" });

async function attach(branch: { clientId: number }, grantId: number) {
  return call(`/clients/${branch.clientId}/grant`, {
    key: "admin",
    method: "PUT",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({ grant_id: grantId }),
  });
}

/** A second branch of the same app (same OAuth client id and secret). */
async function sibling(of: RegisteredBranch, providerResource?: string): Promise<RegisteredBranch> {
  return registerBranch({
    oauthClientId: of.oauthClientId,
    clientSecret: of.clientSecret,
    atProvider: false,
    ...(providerResource ? { providerResource } : {}),
  });
}

async function clientBody(clientId: number): Promise<ClientBody> {
  return json<ClientBody>(await call(`/clients/${clientId}`, { key: "admin" }));
}

async function expireGrant(grantId: number): Promise<void> {
  await sql("update tokens set expires_at = now() - interval '1 second' where id = $1", [grantId]);
}

async function twoBranchesOneGrant() {
  const first = await connectBranch();
  const second = await sibling(first);
  const grantId = (await clientBody(first.clientId)).grant_id!;
  const attached = await attach(second, grantId);
  expect(attached.status, await attached.clone().text()).toBe(200);
  return { first, second, grantId };
}

describe("apps", () => {
  it("POST /apps, GET /apps and GET /apps/{id}: never the secret", async () => {
    const secret = uniqueId("app-secret");
    const created = await postJson(
      "/apps",
      { name: "Reviews", client_id: uniqueId("oc"), client_secret: secret },
      { key: "admin" },
    );
    const text = await created.text();
    expect(created.status, text).toBe(201);
    expect(text).not.toContain(secret);
    const app = JSON.parse(text) as { app_id: number; profile: string; branches: number };
    expect(app).toMatchObject({ profile: "google", branches: 0 });
    const one = await call(`/apps/${app.app_id}`, { key: "admin" });
    expect(one.status).toBe(200);
    const list = await json<{ apps: { app_id: number }[] }>(await call("/apps", { key: "admin" }));
    expect(list.apps.map((a) => a.app_id)).toContain(app.app_id);
    await expectProblem(await call("/apps/999999", { key: "admin" }), 404, "not_found");
    await expectProblem(await call("/apps", { key: "service" }), 403);
  });

  it("refuses bad app bodies with a problem naming the field", async () => {
    const noSecret = await postJson("/apps", { name: "x", client_id: "y" }, { key: "admin" });
    await expectProblem(noSecret, 422, "validation_failed");
    const googleWithSettings = await postJson(
      "/apps",
      { name: "x", client_id: uniqueId("oc"), client_secret: "s", settings: { scopes: "a" } },
      { key: "admin" },
    );
    await expectProblem(googleWithSettings, 422, "validation_failed");
    const oauth2NoUrls = await postJson(
      "/apps",
      { name: "x", profile: "oauth2", client_id: uniqueId("oc"), client_secret: "s", settings: { scopes: "a" } },
      { key: "admin" },
    );
    await expectProblem(oauth2NoUrls, 422, "validation_failed");
    const taken = uniqueId("oc");
    expect(
      (await postJson("/apps", { name: "x", client_id: taken, client_secret: "s" }, { key: "admin" })).status,
    ).toBe(201);
    await expectProblem(
      await postJson("/apps", { name: "x", client_id: taken, client_secret: "s" }, { key: "admin" }),
      409,
      "conflict",
    );
  });

  it("an oauth2 app reads its provider from a discovery document and serves a branch through it", async () => {
    const server = new URL(`/.well-known/oauth-authorization-server`, (await appServer()).url);
    const oauthClientId = uniqueId("oc2");
    const secret = uniqueId("secret");
    const created = await postJson(
      "/apps",
      {
        name: "Generic",
        profile: "oauth2",
        client_id: oauthClientId,
        client_secret: secret,
        settings: {
          discovery_url: server.toString(),
          scopes: "https://www.googleapis.com/auth/business.manage",
          extra_authorization_params: "access_type=offline",
        },
      },
      { key: "admin" },
    );
    const text = await created.text();
    expect(created.status, text).toBe(201);
    const app = JSON.parse(text) as { app_id: number; settings: { token_url: string; issuer: string } };
    expect(app.settings.token_url).toBe(new URL("/token", server).toString());
    // A branch of that app connects through the app's provider.
    const branch = await connectBranch({ oauthClientId, clientSecret: secret });
    expect((await clientBody(branch.clientId)).app_id).toBe(app.app_id);
    expect((await getToken(branch.branchId)).status).toBe(200);
    // The isolate keeps the app's provider; a change of its settings takes effect at once.
    const refresh = () => postJson("/tokens/refresh", { branch_id: branch.branchId }, { key: "admin" });
    const patchSettings = (settings: Record<string, unknown>) =>
      call(`/apps/${app.app_id}`, {
        key: "admin",
        method: "PATCH",
        headers: { "content-type": "application/json" },
        body: JSON.stringify({ settings }),
      });
    const unreachable = await patchSettings({
      issuer: app.settings.issuer,
      authorization_url: new URL("/authorize", server).toString(),
      token_url: "http://127.0.0.1:9/token",
      scopes: "https://www.googleapis.com/auth/business.manage",
    });
    expect(unreachable.status, await unreachable.clone().text()).toBe(200);
    // An expired grant makes the forced refresh call the provider, at the new token_url.
    const grantId = (await clientBody(branch.clientId)).grant_id!;
    await expireGrant(grantId);
    expect([502, 503]).toContain((await refresh()).status);
    expect(
      (
        await patchSettings({
          discovery_url: server.toString(),
          scopes: "https://www.googleapis.com/auth/business.manage",
        })
      ).status,
    ).toBe(200);
    const refreshed = await refresh();
    expect(refreshed.status).toBe(200);
    expect((await json<{ refreshed: boolean }>(refreshed)).refreshed).toBe(true);
    // An unreachable discovery document is a 502 that stores nothing.
    const broken = await postJson(
      "/apps",
      {
        name: "Broken",
        profile: "oauth2",
        client_id: uniqueId("oc3"),
        client_secret: "s",
        settings: { discovery_url: "http://127.0.0.1:9/.well-known/openid-configuration", scopes: "a" },
      },
      { key: "admin" },
    );
    await expectProblem(broken, 502, "provider_error");
  });

  it("rotating the app's secret is one change for all its branches", async () => {
    const { first, second } = await twoBranchesOneGrant();
    const before = await appRowOf(second.clientId);
    const newSecret = uniqueId("rotated");
    await registerProviderClient(first.oauthClientId, newSecret, [first.redirectUri]);
    const appId = Number(before?.id);
    const patched = await call(`/apps/${appId}`, {
      key: "admin",
      method: "PATCH",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ client_secret: newSecret }),
    });
    const text = await patched.text();
    expect(patched.status, text).toBe(200);
    expect(text).not.toContain(newSecret);
    expect((await appRowOf(first.clientId))?.client_secret).not.toBe(before?.client_secret);
    // Both branches use it: a consent of the second branch works with the new secret.
    const { callback } = await runBrowserFlow(second.loginUrl);
    expect(callback.status, await callback.clone().text()).toBe(200);
  });
});

describe("grants", () => {
  it("two branches on one grant are served the same token, and one expiry costs one provider call", async () => {
    const { first, second, grantId } = await twoBranchesOneGrant();
    const a = await currentTokens(first.clientId);
    // Nothing read yet (no edge cache entry): the expired grant is refreshed on the first reads.
    await expireGrant(grantId);
    const before = await providerStats(first.oauthClientId);
    const reads = await Promise.all([
      ...Array.from({ length: 5 }, () => getToken(first.branchId)),
      ...Array.from({ length: 5 }, () => getToken(second.branchId)),
    ]);
    expect(reads.map((r) => r.status)).toEqual(Array(10).fill(200));
    const tokens = new Set(
      await Promise.all(reads.map(async (r) => (await json<{ access_token: string }>(r)).access_token)),
    );
    expect(tokens.size).toBe(1);
    expect([...tokens][0]).not.toBe(a.accessToken);
    const after = await providerStats(first.oauthClientId);
    expect(after.refreshGrants - before.refreshGrants).toBe(1);
  });

  it("a dead grant moves every branch behind it to needs_reauth, one event per branch with the grant", async () => {
    const { first, second, grantId } = await twoBranchesOneGrant();
    await sql("update tokens set expires_at = now() - interval '1 second' where id = $1", [grantId]);
    const revoked = await fetch(
      `${(await appServer()).url}/admin/refresh-tokens/${encodeURIComponent(first.oauthClientId)}/revoke-all`,
      { method: "POST" },
    );
    expect(revoked.ok).toBe(true);
    await expectProblem(await getToken(first.branchId), 409, "reauthorization_required");
    await expectProblem(await getToken(second.branchId), 409, "reauthorization_required");
    for (const branch of [first, second]) {
      const events = (await eventsOf(branch.clientId)).filter((e) => e.type === "connection.needs_reauth");
      expect(events).toHaveLength(1);
      const [row] = await sql("select grant_id from events where id = $1", [String(events[0]!.id)]);
      expect(Number(row![0])).toBe(grantId);
      expect((await clientBody(branch.clientId)).connection.status).toBe("needs_reauth");
    }
  });

  it("DELETE /tokens of one branch revokes the shared grant for every branch", async () => {
    const { first, second } = await twoBranchesOneGrant();
    const response = await call(`/tokens/${encodeURIComponent(first.branchId)}`, { key: "admin", method: "DELETE" });
    expect(response.status, await response.clone().text()).toBe(200);
    await expectProblem(await getToken(second.branchId), 409, "not_connected");
    expect((await eventsOf(second.clientId)).map((e) => e.type)).toContain("connection.revoked");
  });

  it("a Cache API failure after the revocation committed is no error: the change stands", async () => {
    const { first, second } = await twoBranchesOneGrant();
    const failing = vi.spyOn(Cache.prototype, "delete").mockRejectedValue(new Error("cache unavailable"));
    try {
      const response = await call(`/tokens/${encodeURIComponent(first.branchId)}`, { key: "admin", method: "DELETE" });
      expect(response.status, await response.clone().text()).toBe(200);
      expect(failing).toHaveBeenCalled();
    } finally {
      failing.mockRestore();
    }
    await expectProblem(await getToken(second.branchId), 409, "not_connected");
  });

  it("deleting one branch keeps the grant its siblings are served from", async () => {
    const { first, second, grantId } = await twoBranchesOneGrant();
    const removed = await call(`/clients/${first.clientId}`, { key: "admin", method: "DELETE" });
    expect(removed.status, await removed.clone().text()).toBe(200);
    expect((await getToken(second.branchId)).status).toBe(200);
    expect(await sql("select count(*)::int from tokens where id = $1", [grantId])).toEqual([["1"]]);
  });

  it("GET /grants lists the grant with its branches; attach refuses another app's or an unknown grant", async () => {
    const { first, second, grantId } = await twoBranchesOneGrant();
    const grant = await json<{ branches: { client_id: number }[]; status: string; app_id: number }>(
      await call(`/grants/${grantId}`, { key: "admin" }),
    );
    expect(grant.status).toBe("connected");
    expect(grant.branches.map((b) => b.client_id).sort()).toEqual([first.clientId, second.clientId].sort());
    const page = await json<{ grants: { grant_id: number }[] }>(
      await call(`/grants?app_id=${grant.app_id}`, { key: "admin" }),
    );
    expect(page.grants.map((g) => g.grant_id)).toContain(grantId);

    const stranger = await registerBranch();
    await expectProblem(await attach(stranger, grantId), 409, "conflict");
    await expectProblem(await attach(second, 99_999_999), 404, "not_found");
    await expectProblem(await call("/grants/99999999", { key: "admin" }), 404, "not_found");
    const bad = await call(`/clients/${second.clientId}/grant`, {
      key: "admin",
      method: "PUT",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ grant_id: "x" }),
    });
    await expectProblem(bad, 422, "validation_failed");
  });

  it("the console's branch list shows an attached branch with its grant's status", async () => {
    const { second } = await twoBranchesOneGrant();
    const services = await createServices(testEnv as TestEnv);
    const page = await listBranches(services.db, { search: second.branchId, limit: 10 });
    expect(page.rows.map((row) => [row.branchId, row.status])).toEqual([[second.branchId, "connected"]]);
  });

  it("the token read returns the branch's provider resource", async () => {
    const first = await connectBranch();
    const location = "accounts/123/locations/456";
    const second = await sibling(first, location);
    await attach(second, (await clientBody(first.clientId)).grant_id!);
    const body = await json<{ provider_resource: string | null }>(await getToken(second.branchId));
    expect(body.provider_resource).toBe(location);
  });
});

async function appServer(): Promise<{ url: string }> {
  const { testEnv } = await import("./helpers");
  return { url: testEnv.OAUTH_SERVER_URL };
}
