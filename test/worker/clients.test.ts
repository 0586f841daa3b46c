import { describe, expect, it } from "vitest";
import { TEST_SERVICE_KEY } from "./bindings";
import { call, expectProblem, json, testEnv, uniqueId } from "./helpers";
import {
  appRowOf,
  clientRow,
  connectBranch,
  currentTokens,
  introspect,
  newClientBody,
  postJson,
  providerStats,
  reconnectBranch,
  registerBranch,
  registerProviderClient,
  runBrowserFlow,
  setProviderBehavior,
  sql,
  startLogin,
  TEST_REDIRECT_URI,
  tokenRows,
} from "./oauth-helpers";

interface ClientView {
  client_id: number;
  client_oauth_id: string;
  branch_id: string;
  branch_identifier: string;
  email: string;
  workspace_name: string;
  redirect_uri: string;
  scopes: string | null;
  is_active: boolean;
  created_at: string;
  updated_at: string;
  connection: {
    status: string;
    expires_at: string | null;
    last_refreshed_at: string | null;
    last_error: string | null;
    credentials_rejected: boolean;
  };
}

interface Page {
  success: true;
  clients: ClientView[];
  next_cursor: number | null;
}

const ADMIN_ROUTES: { method: string; path: string; body?: unknown }[] = [
  { method: "POST", path: "/clients", body: {} },
  { method: "GET", path: "/clients" },
  { method: "GET", path: "/clients/1" },
  { method: "PATCH", path: "/clients/1", body: { workspace_name: "x" } },
  { method: "DELETE", path: "/clients/1" },
  { method: "GET", path: "/clients/1/login-url" },
  { method: "POST", path: "/clients/1/login-links/revoke" },
];

function routeCall(route: (typeof ADMIN_ROUTES)[number], headers: Record<string, string>) {
  return call(route.path, {
    method: route.method,
    headers: { "content-type": "application/json", ...headers },
    ...(route.body === undefined ? {} : { body: JSON.stringify(route.body) }),
  });
}

async function getClientView(id: number): Promise<ClientView> {
  const response = await call(`/clients/${id}`, { key: "admin" });
  expect(response.status).toBe(200);
  return json<ClientView>(response);
}

async function patchClient(id: number, body: unknown): Promise<Response> {
  return postJson(`/clients/${id}`, body, { method: "PATCH" });
}

/** Walks every page of GET /clients with the given query and returns all clients seen. */
async function walkPages(query: string, limit: number): Promise<{ clients: ClientView[]; pages: Page[] }> {
  const pages: Page[] = [];
  let cursor: number | null = null;
  do {
    const response = await call(`/clients?limit=${limit}${query}${cursor === null ? "" : `&cursor=${cursor}`}`, {
      key: "admin",
    });
    expect(response.status).toBe(200);
    const page = await json<Page>(response);
    pages.push(page);
    cursor = page.next_cursor;
    if (pages.length > 10_000) throw new Error("paging does not terminate");
  } while (cursor !== null);
  return { clients: pages.flatMap((p) => p.clients), pages };
}

describe("API keys on admin routes", () => {
  it.each(ADMIN_ROUTES)("$method $path without a key answers 401 with a Bearer challenge", async (route) => {
    const response = await routeCall(route, {});
    await expectProblem(response, 401, "unauthorized");
    expect(response.headers.get("www-authenticate")).toBe('Bearer realm="token-management"');
  });

  it.each(ADMIN_ROUTES)("$method $path with a wrong key answers 401 invalid_token", async (route) => {
    const response = await routeCall(route, { authorization: "Bearer not-the-right-key-at-all-000" });
    await expectProblem(response, 401, "unauthorized");
    expect(response.headers.get("www-authenticate")).toContain('error="invalid_token"');
  });

  it.each(ADMIN_ROUTES)("$method $path with the service key answers 403", async (route) => {
    const response = await routeCall(route, { authorization: `Bearer ${TEST_SERVICE_KEY}` });
    await expectProblem(response, 403, "forbidden");
  });

  it("rejects a non-Bearer Authorization scheme", async () => {
    const response = await call("/clients", { headers: { authorization: `Basic ${btoa("admin:x")}` } });
    await expectProblem(response, 401, "unauthorized");
  });

  it("accepts the second comma-separated admin key", async () => {
    const second = String(testEnv.ADMIN_API_KEY).split(",")[1] as string;
    expect(second).toBeTruthy();
    const response = await call("/clients?limit=1", { key: second });
    expect(response.status).toBe(200);
  });

  it("accepts the admin key in X-API-Key", async () => {
    const key = String(testEnv.ADMIN_API_KEY).split(",")[0] as string;
    const response = await call("/clients?limit=1", { headers: { "x-api-key": key } });
    expect(response.status).toBe(200);
  });

  it("does not accept a prefix of the admin key", async () => {
    const key = String(testEnv.ADMIN_API_KEY).split(",")[0] as string;
    await expectProblem(await call("/clients", { key: key.slice(0, -1) }), 401, "unauthorized");
  });
});

describe("POST /clients", () => {
  it("registers a client: 201 with the old fields and a login link, never the secret", async () => {
    const body = newClientBody({ scopes: "read write", workspaceName: "Main Street" });
    const response = await postJson("/clients", body);
    const text = await response.text();
    expect(response.status, text).toBe(201);
    expect(text).not.toContain(body.client_secret);
    expect(text).not.toContain("client_secret");
    const created = JSON.parse(text);
    expect(created).toMatchObject({
      success: true,
      client_oauth_id: body.client_id,
      branch_id: body.branch_id,
      branch_identifier: body.branch_id,
      email: body.workspace_email,
      workspace_name: "Main Street",
      redirect_uri: TEST_REDIRECT_URI,
      scopes: "read write",
      is_active: true,
      connection: { status: "never_connected", expires_at: null, credentials_rejected: false },
    });
    expect(typeof created.message).toBe("string");
    expect(Number.isInteger(created.client_id)).toBe(true);
    expect(Date.parse(created.created_at)).toBeGreaterThan(Date.now() - 60_000);
    const login = new URL(created.login_url);
    expect(login.pathname).toBe(`/token-management/oauth/login/${created.client_id}`);
    expect(login.searchParams.get("signature")).toMatch(/^[A-Za-z0-9_-]{43}$/);
    expect(Number(login.searchParams.get("expires")) * 1000).toBe(Date.parse(created.login_url_expires_at));

    // Stored sealed on the app, not in plain text, and not on the branch.
    const row = await appRowOf(created.client_id);
    expect(String(row?.client_secret)).toMatch(/^v2\./);
    expect(JSON.stringify(row)).not.toContain(body.client_secret);
    expect((await clientRow(created.client_id))?.client_secret).toBeNull();
  });

  it("trims surrounding whitespace from text fields", async () => {
    const body = { ...newClientBody(), workspace_name: "  Padded  " };
    const response = await postJson("/clients", body);
    expect(response.status).toBe(201);
    expect((await json<ClientView>(response)).workspace_name).toBe("Padded");
  });

  it("attaches a second branch to the app of a known client_id when the secret matches", async () => {
    const first = newClientBody();
    const one = await json<{ client_id: number; app_id: number }>(await postJson("/clients", first));
    const response = await postJson("/clients", {
      ...newClientBody(),
      client_id: first.client_id,
      client_secret: first.client_secret,
    });
    expect(response.status).toBe(201);
    const two = await json<{ client_id: number; app_id: number; client_oauth_id: string }>(response);
    expect(two.app_id).toBe(one.app_id);
    expect(two.client_id).not.toBe(one.client_id);
    expect(two.client_oauth_id).toBe(first.client_id);
    expect(await sql("select count(*)::int from apps where client_id = $1", [first.client_id])).toEqual([["1"]]);
  });

  it("answers 409 naming client_secret when a known client_id comes with another secret", async () => {
    const first = newClientBody();
    expect((await postJson("/clients", first)).status).toBe(201);
    const response = await postJson("/clients", { ...newClientBody(), client_id: first.client_id });
    const problem = await expectProblem(response, 409, "conflict");
    expect(problem.errors).toEqual([{ field: "client_secret", message: expect.any(String) }]);
    expect(problem.detail).toContain("already registered");
    expect(JSON.stringify(problem)).not.toContain(first.client_secret);
  });

  it("answers 409 naming branch_id when the branch already has a client", async () => {
    const first = newClientBody();
    expect((await postJson("/clients", first)).status).toBe(201);
    const response = await postJson("/clients", { ...newClientBody(), branch_id: first.branch_id });
    const problem = await expectProblem(response, 409, "conflict");
    expect(problem.errors).toEqual([{ field: "branch_id", message: expect.any(String) }]);
  });

  const invalid: [string, Record<string, unknown>, string][] = [
    ["an invalid email", { workspace_email: "not-an-email" }, "workspace_email"],
    ["a redirect_uri that is not a URL", { redirect_uri: "not a url" }, "redirect_uri"],
    ["an http redirect_uri off localhost", { redirect_uri: "http://example.com/cb" }, "redirect_uri"],
    ["a redirect_uri with a fragment", { redirect_uri: "https://example.com/cb#x" }, "redirect_uri"],
    ["a non-http redirect_uri", { redirect_uri: "javascript:alert(1)" }, "redirect_uri"],
    ["an empty client_id", { client_id: "" }, "client_id"],
    ["a blank workspace_name", { workspace_name: "   " }, "workspace_name"],
    ["an empty client_secret", { client_secret: "" }, "client_secret"],
    ["an empty scopes", { scopes: "" }, "scopes"],
    ["an oversize client_id", { client_id: "x".repeat(256) }, "client_id"],
    ["an oversize branch_id", { branch_id: "b".repeat(129) }, "branch_id"],
    ["an oversize workspace_name", { workspace_name: "n".repeat(256) }, "workspace_name"],
    ["an oversize redirect_uri", { redirect_uri: `https://example.com/${"p".repeat(2048)}` }, "redirect_uri"],
    ["a number where a string belongs", { branch_id: 42 }, "branch_id"],
    ["a missing field", { workspace_name: undefined }, "workspace_name"],
  ];
  it.each(invalid)("rejects %s with 422 naming the field", async (_name, change, field) => {
    const body = { ...newClientBody(), ...change };
    const problem = await expectProblem(await postJson("/clients", body), 422, "validation_failed");
    expect(problem.errors?.map((e) => e.field)).toContain(field);
  });

  it("accepts https redirect URIs and http on localhost", async () => {
    for (const redirect_uri of ["https://example.com/cb", "http://localhost:8787/token-management/auth/callback"]) {
      const response = await postJson("/clients", { ...newClientBody(), redirect_uri });
      expect(response.status, redirect_uri).toBe(201);
    }
  });

  it("rejects unknown fields with 422 that names them", async () => {
    const problem = await expectProblem(
      await postJson("/clients", { ...newClientBody(), is_admin: true }),
      422,
      "validation_failed",
    );
    expect(JSON.stringify(problem.errors)).toContain("is_admin");
  });

  it("names each unknown field in errors[].field", async () => {
    const problem = await expectProblem(
      await postJson("/clients", { ...newClientBody(), is_admin: true }),
      422,
      "validation_failed",
    );
    expect(problem.errors?.map((e) => e.field)).toEqual(["is_admin"]);
  });

  it("rejects a body that is not JSON with 415", async () => {
    const response = await call("/clients", {
      method: "POST",
      key: "admin",
      headers: { "content-type": "text/plain" },
      body: JSON.stringify(newClientBody()),
    });
    await expectProblem(response, 415, "unsupported_media_type");
  });

  it("rejects a body without Content-Type with 415", async () => {
    const response = await call("/clients", { method: "POST", key: "admin", body: JSON.stringify(newClientBody()) });
    await expectProblem(response, 415, "unsupported_media_type");
  });

  it("rejects malformed JSON with a 400 problem", async () => {
    await expectProblem(await postJson("/clients", '{"client_id": "x",'), 400, "bad_request");
  });

  it("rejects a JSON array body with 422", async () => {
    await expectProblem(await postJson("/clients", "[]"), 422, "validation_failed");
  });

  it("rejects a body over 64 KiB with 413", async () => {
    const body = { ...newClientBody(), workspace_name: "w".repeat(70 * 1024) };
    await expectProblem(await postJson("/clients", body), 413, "payload_too_large");
  });

  it("stores nothing when validation fails", async () => {
    const body = { ...newClientBody(), workspace_email: "bad" };
    await postJson("/clients", body);
    expect(await sql("select id from clients where branch_id = $1", [body.branch_id])).toEqual([]);
  });
});

describe("GET /clients", () => {
  it("pages through every client in id order with limit, cursor and next_cursor", async () => {
    const mine = [] as number[];
    for (let i = 0; i < 3; i++) mine.push((await registerBranch({ atProvider: false })).clientId);
    const { clients, pages } = await walkPages("", 2);
    const ids = clients.map((c) => c.client_id);
    for (const id of mine) expect(ids.filter((x) => x === id)).toHaveLength(1);
    expect([...ids].sort((a, b) => a - b)).toEqual(ids);
    expect(new Set(ids).size).toBe(ids.length);
    for (const page of pages) {
      expect(page.clients.length).toBeLessThanOrEqual(2);
      if (page.next_cursor !== null) {
        expect(page.clients).toHaveLength(2);
        expect(page.next_cursor).toBe(page.clients.at(-1)?.client_id);
      }
    }
    const rawSecretLeak = JSON.stringify(pages);
    expect(rawSecretLeak).not.toContain("client_secret");
  });

  it("starts after the cursor", async () => {
    const a = await registerBranch({ atProvider: false });
    const b = await registerBranch({ atProvider: false });
    const response = await call(`/clients?cursor=${a.clientId}&limit=100`, { key: "admin" });
    const page = await json<Page>(response);
    expect(page.clients.every((c) => c.client_id > a.clientId)).toBe(true);
    expect(page.clients.map((c) => c.client_id)).toContain(b.clientId);
  });

  it("filters by is_active", async () => {
    const active = await registerBranch({ atProvider: false });
    const inactive = await registerBranch({ atProvider: false });
    expect((await patchClient(inactive.clientId, { is_active: false })).status).toBe(200);

    const onlyInactive = (await walkPages("&is_active=false", 100)).clients;
    expect(onlyInactive.every((c) => c.is_active === false)).toBe(true);
    expect(onlyInactive.map((c) => c.client_id)).toContain(inactive.clientId);
    expect(onlyInactive.map((c) => c.client_id)).not.toContain(active.clientId);

    const onlyActive = (await walkPages("&is_active=true", 100)).clients;
    expect(onlyActive.every((c) => c.is_active === true)).toBe(true);
    expect(onlyActive.map((c) => c.client_id)).toContain(active.clientId);
    expect(onlyActive.map((c) => c.client_id)).not.toContain(inactive.clientId);
  });

  it.each([
    ["limit=0", "limit"],
    ["limit=101", "limit"],
    ["limit=abc", "limit"],
    ["cursor=-1", "cursor"],
    ["is_active=yes", "is_active"],
    ["colour=blue", "colour"],
  ])("rejects the query %s with 422", async (query, field) => {
    const problem = await expectProblem(await call(`/clients?${query}`, { key: "admin" }), 422, "validation_failed");
    expect(problem.errors?.map((e) => e.field)).toContain(field);
  });
});

describe("GET /clients/{id}", () => {
  it("shows never_connected, then connected after the consent flow", async () => {
    const branch = await registerBranch();
    const before = await getClientView(branch.clientId);
    expect(before.connection).toEqual({
      status: "never_connected",
      expires_at: null,
      last_refreshed_at: null,
      last_error: null,
      credentials_rejected: false,
      consent_problem: null,
    });

    const { callback } = await runBrowserFlow(branch.loginUrl);
    expect(callback.status).toBe(200);
    const after = await getClientView(branch.clientId);
    expect(after.connection.status).toBe("connected");
    expect(Date.parse(after.connection.expires_at ?? "")).toBeGreaterThan(Date.now() + 50 * 60_000);
    expect(after.connection.last_refreshed_at).not.toBeNull();
    expect(after.client_oauth_id).toBe(branch.oauthClientId);
    expect(JSON.stringify(after)).not.toContain(branch.clientSecret);
  });

  it("answers 404 for an unknown id", async () => {
    await expectProblem(await call("/clients/2147483000", { key: "admin" }), 404, "not_found");
  });

  it.each(["abc", "0", "-3", "1.5", "99999999999"])("answers a 4xx problem for the id %s", async (id) => {
    const response = await call(`/clients/${id}`, { key: "admin" });
    expect(response.status).toBeGreaterThanOrEqual(400);
    expect(response.status).toBeLessThan(500);
    await expectProblem(response, response.status);
  });
});

describe("PATCH /clients/{id}", () => {
  it("rotates the secret: sealed anew, and the flow works with the new secret at the provider", async () => {
    const branch = await registerBranch();
    const before = await appRowOf(branch.clientId);
    const newSecret = uniqueId("rotated-secret");
    await registerProviderClient(branch.oauthClientId, newSecret, [branch.redirectUri]);

    // The provider no longer accepts the stored secret.
    const stale = await runBrowserFlow(branch.loginUrl);
    expect(stale.callback.status).toBe(502);

    const response = await patchClient(branch.clientId, { client_secret: newSecret });
    const text = await response.text();
    expect(response.status, text).toBe(200);
    expect(text).not.toContain(newSecret);
    const after = await appRowOf(branch.clientId);
    expect(after?.client_secret).not.toBe(before?.client_secret);
    expect(String(after?.client_secret)).toMatch(/^v2\./);
    expect(JSON.stringify(after)).not.toContain(newSecret);

    const fresh = await runBrowserFlow(branch.loginUrl);
    expect(fresh.callback.status, await fresh.callback.clone().text()).toBe(200);
    expect((await getClientView(branch.clientId)).connection.status).toBe("connected");
  });

  it("changes redirect_uri, scopes and names, and the login link uses them", async () => {
    const branch = await registerBranch();
    const redirect = "http://localhost/token-management/auth/callback";
    const response = await patchClient(branch.clientId, {
      redirect_uri: redirect,
      scopes: "alpha beta",
      workspace_name: "Renamed",
      workspace_email: "new@example.com",
    });
    expect(response.status).toBe(200);
    const view = await json<ClientView & { success: boolean }>(response);
    expect(view).toMatchObject({
      success: true,
      redirect_uri: redirect,
      scopes: "alpha beta",
      workspace_name: "Renamed",
      email: "new@example.com",
    });
    expect(Date.parse(view.updated_at)).toBeGreaterThanOrEqual(Date.parse(view.created_at));
    expect(await getClientView(branch.clientId)).toMatchObject({ redirect_uri: redirect, scopes: "alpha beta" });

    const { authorizeUrl } = await startLogin(branch.loginUrl);
    expect(authorizeUrl.searchParams.get("redirect_uri")).toBe(redirect);
    expect(authorizeUrl.searchParams.get("scope")).toBe("alpha beta openid email");
  });

  it("scopes: null falls back to the default scopes", async () => {
    const branch = await registerBranch({ scopes: "custom" });
    const response = await patchClient(branch.clientId, { scopes: null });
    expect(response.status).toBe(200);
    expect((await json<ClientView>(response)).scopes).toBeNull();
    const { authorizeUrl } = await startLogin(branch.loginUrl);
    expect(authorizeUrl.searchParams.get("scope")).toBe(`${testEnv.OAUTH_SCOPES} openid email`);
  });

  it("deactivates: the login link then answers 404, and reactivating restores it", async () => {
    const branch = await registerBranch();
    const response = await patchClient(branch.clientId, { is_active: false });
    expect(response.status).toBe(200);
    expect((await json<ClientView>(response)).is_active).toBe(false);

    const login = await call(branch.loginUrl);
    expect(login.status).toBe(404);
    expect(login.headers.get("content-type")).toContain("text/html");
    expect(login.headers.get("set-cookie")).toBeNull();

    expect((await patchClient(branch.clientId, { is_active: true })).status).toBe(200);
    expect((await call(branch.loginUrl)).status).toBe(302);
  });

  it("rejects an empty body with 422", async () => {
    const branch = await registerBranch({ atProvider: false });
    await expectProblem(await patchClient(branch.clientId, {}), 422, "validation_failed");
  });

  it("rejects unknown fields (including ones that cannot change) with 422", async () => {
    const branch = await registerBranch({ atProvider: false });
    for (const body of [{ nickname: "x" }, { client_id: "other" }, { branch_id: "other" }]) {
      await expectProblem(await patchClient(branch.clientId, body), 422, "validation_failed");
    }
    const view = await getClientView(branch.clientId);
    expect(view.client_oauth_id).toBe(branch.oauthClientId);
    expect(view.branch_id).toBe(branch.branchId);
  });

  it("rejects invalid values naming the field", async () => {
    const branch = await registerBranch({ atProvider: false });
    const problem = await expectProblem(
      await patchClient(branch.clientId, { redirect_uri: "http://evil.example/cb" }),
      422,
      "validation_failed",
    );
    expect(problem.errors?.map((e) => e.field)).toEqual(["redirect_uri"]);
  });

  it("answers 404 for an unknown id", async () => {
    await expectProblem(await patchClient(2147483001, { workspace_name: "x" }), 404, "not_found");
  });
});

describe("DELETE /clients/{id}", () => {
  it("revokes the grant at the provider and removes the client and its tokens", async () => {
    const branch = await connectBranch();
    const { refreshToken, accessToken } = await currentTokens(branch.clientId);
    expect(refreshToken).not.toBeNull();
    expect((await introspect(refreshToken as string, branch)).active).toBe(true);
    const statsBefore = await providerStats(branch.oauthClientId);

    const response = await call(`/clients/${branch.clientId}`, { method: "DELETE", key: "admin" });
    expect(response.status).toBe(200);
    expect(await json(response)).toMatchObject({
      success: true,
      client_id: branch.clientId,
      tokens_revoked: 1,
      revocation_failures: 0,
    });

    expect((await providerStats(branch.oauthClientId)).revocations).toBe(statsBefore.revocations + 1);
    expect((await introspect(refreshToken as string, branch)).active).toBe(false);
    expect((await introspect(accessToken, branch)).active).toBe(false);
    await expectProblem(await call(`/clients/${branch.clientId}`, { key: "admin" }), 404, "not_found");
    expect(await clientRow(branch.clientId)).toBeUndefined();
    expect(await tokenRows(branch.clientId)).toEqual([]);
  });

  it("deletes a never-connected client without calling the provider", async () => {
    const branch = await registerBranch();
    const response = await call(`/clients/${branch.clientId}`, { method: "DELETE", key: "admin" });
    expect(await json(response)).toMatchObject({ tokens_revoked: 0, revocation_failures: 0 });
    expect((await providerStats(branch.oauthClientId)).revocations).toBe(0);
    expect(await clientRow(branch.clientId)).toBeUndefined();
  });

  it("still deletes when the provider's revocation endpoint is unreachable, and reports the failure", async () => {
    const branch = await connectBranch();
    const response = await call(`/clients/${branch.clientId}`, {
      method: "DELETE",
      key: "admin",
      envOverrides: { OAUTH_REVOCATION_URL: "http://127.0.0.1:9/revoke" },
    });
    expect(response.status).toBe(200);
    expect(await json(response)).toMatchObject({ tokens_revoked: 0, revocation_failures: 1 });
    expect(await clientRow(branch.clientId)).toBeUndefined();
    expect(await tokenRows(branch.clientId)).toEqual([]);
  });

  // The local provider injects faults on its token endpoint only, so these point revocation there.
  it("still deletes when the provider answers 500, and reports the failure", async () => {
    const branch = await connectBranch();
    await setProviderBehavior(branch.oauthClientId, { failNext: { status: 500 } });
    const response = await call(`/clients/${branch.clientId}`, {
      method: "DELETE",
      key: "admin",
      envOverrides: { OAUTH_REVOCATION_URL: `${testEnv.OAUTH_SERVER_URL}/token` },
    });
    expect(response.status).toBe(200);
    expect(await json(response)).toMatchObject({ tokens_revoked: 0, revocation_failures: 1 });
    expect((await providerStats(branch.oauthClientId)).failedRequests).toBe(1);
    expect(await clientRow(branch.clientId)).toBeUndefined();
  });

  it("still deletes when the provider hangs (bounded by the timeout), and reports the failure", async () => {
    const branch = await connectBranch();
    await setProviderBehavior(branch.oauthClientId, { hang: true });
    try {
      const started = Date.now();
      const response = await call(`/clients/${branch.clientId}`, {
        method: "DELETE",
        key: "admin",
        envOverrides: { OAUTH_REVOCATION_URL: `${testEnv.OAUTH_SERVER_URL}/token`, OAUTH_TIMEOUT_MS: "500" },
      });
      expect(Date.now() - started).toBeLessThan(10_000);
      expect(response.status).toBe(200);
      expect(await json(response)).toMatchObject({ tokens_revoked: 0, revocation_failures: 1 });
      expect(await clientRow(branch.clientId)).toBeUndefined();
    } finally {
      await setProviderBehavior(branch.oauthClientId, { hang: false });
    }
  });

  it("also revokes an earlier grant that a later consent replaced", async () => {
    // Textbook provider: each consent is its own grant, revoked on its own. prompt=consent keeps
    // the replacement from revoking the earlier grant (see README), so the deletion finds two.
    // Without OpenID Connect (one grant per consent, as before apps).
    const branch = await registerBranch({ providerBehavior: { profile: "textbook" } });
    const noOidc = { OAUTH_OPENID: "false" };
    expect((await runBrowserFlow(branch.loginUrl, "json", { envOverrides: noOidc })).callback.status).toBe(200);
    const first = await currentTokens(branch.clientId);
    const link = await call(`/clients/${branch.clientId}/login-url`, { key: "admin" });
    const { callback } = await runBrowserFlow((await json<{ login_url: string }>(link)).login_url, "json", {
      envOverrides: { ...noOidc, OAUTH_EXTRA_AUTHORIZATION_PARAMS: "access_type=offline&prompt=consent" },
    });
    expect(callback.status).toBe(200);
    const second = await currentTokens(branch.clientId);
    expect(second.refreshToken).not.toBe(first.refreshToken);
    expect((await introspect(first.refreshToken as string, branch)).active).toBe(true);

    const response = await call(`/clients/${branch.clientId}`, { method: "DELETE", key: "admin" });
    expect(await json(response)).toMatchObject({ tokens_revoked: 2, revocation_failures: 0 });
    expect((await introspect(first.refreshToken as string, branch)).active).toBe(false);
    expect((await introspect(second.refreshToken as string, branch)).active).toBe(false);
  });

  it("revokes a refresh token carried over to a newer row only once", async () => {
    const branch = await connectBranch();
    await setProviderBehavior(branch.oauthClientId, { issueRefreshToken: false });
    await reconnectBranch(branch);
    const { refreshToken } = await currentTokens(branch.clientId);
    const before = (await providerStats(branch.oauthClientId)).revocations;

    const response = await call(`/clients/${branch.clientId}`, { method: "DELETE", key: "admin" });
    expect(await json(response)).toMatchObject({ tokens_revoked: 1, revocation_failures: 0 });
    expect((await providerStats(branch.oauthClientId)).revocations).toBe(before + 1);
    expect((await introspect(refreshToken as string, branch)).active).toBe(false);
  });

  it("still deletes when the stored values no longer open (encryption key lost), and reports it", async () => {
    const branch = await connectBranch();
    const otherKey = btoa(String.fromCharCode(...Array.from({ length: 32 }, (_, i) => 200 + i)));
    const response = await call(`/clients/${branch.clientId}`, {
      method: "DELETE",
      key: "admin",
      envOverrides: { TOKEN_ENCRYPTION_KEY: otherKey },
    });
    expect(response.status).toBe(200);
    expect(await json(response)).toMatchObject({ tokens_revoked: 0, revocation_failures: 1 });
    expect(await clientRow(branch.clientId)).toBeUndefined();
    expect(await tokenRows(branch.clientId)).toEqual([]);
  });

  it("answers 404 for an unknown id", async () => {
    await expectProblem(await call("/clients/2147483002", { method: "DELETE", key: "admin" }), 404, "not_found");
  });
});

describe("GET /clients/{id}/login-url", () => {
  it("returns a fresh signed link that starts the flow", async () => {
    const branch = await registerBranch();
    const response = await call(`/clients/${branch.clientId}/login-url`, { key: "admin" });
    expect(response.status).toBe(200);
    const body = await json<{ success: boolean; client_id: number; login_url: string; expires_at: string }>(response);
    expect(body).toMatchObject({ success: true, client_id: branch.clientId });
    const expiresAt = Date.parse(body.expires_at);
    // LOGIN_LINK_TTL_SECONDS defaults to 72 hours.
    expect(expiresAt).toBeGreaterThan(Date.now() + 71 * 3600_000);
    expect(expiresAt).toBeLessThanOrEqual(Date.now() + 72 * 3600_000 + 1000);
    expect(response.headers.get("cache-control")).toBe("no-store");
    const { authorizeUrl } = await startLogin(body.login_url);
    expect(authorizeUrl.searchParams.get("client_id")).toBe(branch.oauthClientId);
  });

  it("answers 404 for an unknown id", async () => {
    await expectProblem(await call("/clients/2147483003/login-url", { key: "admin" }), 404, "not_found");
  });
});
