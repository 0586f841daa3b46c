import { describe, expect, it } from "vitest";
import { TEST_ADMIN_KEY, TEST_ENCRYPTION_KEY, TEST_SERVICE_KEY } from "./bindings";
import { type CallOptions, call, json, testEnv } from "./helpers";
import {
  authorizeAtProvider,
  callCallback,
  clearProviderBehavior,
  connectBranch,
  currentTokens,
  introspect,
  newClientBody,
  postJson,
  providerStats,
  setProviderBehavior,
  sql,
  startLogin,
  tokenRows,
} from "./oauth-helpers";

/**
 * Reliability when a dependency fails. The database outage is simulated per request by pointing
 * the Worker at a closed port (the real database is shared with the other test files, so it is
 * never taken down here); the provider's failures are set per client at the local OAuth server.
 */

/** Nothing listens on the discard port: every query fails to connect. */
const DOWN: CallOptions["envOverrides"] = { NEON_LOCAL_FETCH_ENDPOINT: "http://127.0.0.1:9/sql" };
const LEAKS = [
  testEnv.TOKEN_MANAGEMENT_DATABASE_URL as string,
  testEnv.NEON_LOCAL_FETCH_ENDPOINT as string,
  "127.0.0.1:9",
  "postgres://",
  "postgresql://",
  TEST_ADMIN_KEY,
  TEST_SERVICE_KEY,
  TEST_ENCRYPTION_KEY,
];

interface TokenBody {
  access_token: string;
  expires_at: string;
  refreshed: boolean;
  branch_id: string;
}

/** Asserts the outage answer: 503 problem+json database_unavailable with Retry-After, nothing leaked. */
async function expectDatabaseUnavailable(response: Response, label: string): Promise<void> {
  const text = await response.text();
  expect(response.status, `${label}: ${text}`).toBe(503);
  expect(response.headers.get("content-type"), label).toMatch(/^application\/problem\+json/);
  expect(Number(response.headers.get("retry-after")), label).toBeGreaterThan(0);
  const body = JSON.parse(text) as Record<string, unknown>;
  expect(body, label).toMatchObject({ status: 503, code: "database_unavailable", success: false });
  expect(String(body.detail).length, label).toBeGreaterThan(10);
  for (const secret of LEAKS) expect(text.includes(secret), `${label} leaks ${secret}`).toBe(false);
}

const getToken = (branchId: string, options: CallOptions = {}) =>
  call(`/tokens/${encodeURIComponent(branchId)}`, { key: "service", ...options });

/** Moves the branch's current token to expire `seconds` from now (negative: already expired). */
async function expireIn(clientId: number, seconds: number): Promise<void> {
  await sql("update tokens set expires_at = now() + make_interval(secs => $2) where client_id = $1 and is_valid", [
    clientId,
    seconds,
  ]);
}

/** As if the backoff had elapsed: the next read may try the provider again. */
async function endBackoff(clientId: number): Promise<void> {
  await sql("update tokens set next_attempt_at = null where client_id = $1 and is_valid", [clientId]);
}

async function grantState(clientId: number) {
  const rows = await tokenRows(clientId);
  return rows.map((row) => ({ status: row.status, is_valid: row.is_valid }));
}

describe("database unreachable", () => {
  it("answers every route with 503 problem+json database_unavailable and Retry-After, never a 500", async () => {
    const branch = await connectBranch();
    const down = { envOverrides: DOWN };
    const admin = { ...down, key: "admin" } as const;
    const routes: [string, () => Promise<Response>][] = [
      ["GET /health", () => call("/health", down)],
      ["GET /tokens/{branch}", () => getToken(branch.branchId, down)],
      ["GET /tokens/{branch} admin", () => getToken(branch.branchId, admin)],
      ["DELETE /tokens/{branch}", () => call(`/tokens/${branch.branchId}`, { ...admin, method: "DELETE" })],
      ["POST /tokens/refresh", () => postJson("/tokens/refresh", { branch_id: branch.branchId }, down)],
      ["GET /clients", () => call("/clients", admin)],
      ["POST /clients", () => postJson("/clients", newClientBody(), down)],
      ["GET /clients/{id}", () => call(`/clients/${branch.clientId}`, admin)],
      [
        "PATCH /clients/{id}",
        () => postJson(`/clients/${branch.clientId}`, { workspace_name: "x" }, { ...down, method: "PATCH" }),
      ],
      ["DELETE /clients/{id}", () => call(`/clients/${branch.clientId}`, { ...admin, method: "DELETE" })],
      ["GET /clients/{id}/login-url", () => call(`/clients/${branch.clientId}/login-url`, admin)],
      [
        "POST /clients/{id}/login-links/revoke",
        () => call(`/clients/${branch.clientId}/login-links/revoke`, { ...admin, method: "POST" }),
      ],
      [
        "GET /oauth/login/{id} (JSON)",
        () => call(`/oauth/login/${branch.clientId}`, { ...admin, headers: { accept: "application/json" } }),
      ],
    ];
    // One at a time: the driver's endpoint is a per-isolate setting that each request sets.
    for (const [label, send] of routes) await expectDatabaseUnavailable(await send(), label);
    // And nothing changed: the branch is still there and served.
    expect((await getToken(branch.branchId)).status).toBe(200);
  });

  it("answers a browser on the login page with a 503 page that says to try again, and no secret", async () => {
    const branch = await connectBranch();
    const link = await json<{ login_url: string }>(
      await call(`/clients/${branch.clientId}/login-url`, { key: "admin" }),
    );
    const response = await call(link.login_url, { envOverrides: DOWN, headers: { accept: "text/html" } });
    const text = await response.text();
    expect(response.status).toBe(503);
    expect(response.headers.get("content-type")).toMatch(/^text\/html/);
    expect(text).toContain("Try again");
    expect(text).not.toMatch(/^\s*at .+:\d+:\d+\)?\s*$/m);
    for (const secret of LEAKS) expect(text.includes(secret)).toBe(false);
  });

  it("answers the callback with 503 while down; the same callback completes once the database is back", async () => {
    const branch = await connectBranch();
    const link = await json<{ login_url: string }>(
      await call(`/clients/${branch.clientId}/login-url`, { key: "admin" }),
    );
    const start = await startLogin(link.login_url);
    const providerRedirect = await authorizeAtProvider(start.authorizeUrl);
    const before = await providerStats(branch.oauthClientId);

    await expectDatabaseUnavailable(await callCallback(providerRedirect, start.cookie, "json", DOWN), "callback");
    // Nothing reached the provider: the code is still unused.
    expect((await providerStats(branch.oauthClientId)).authorizationCodeGrants).toBe(before.authorizationCodeGrants);

    const retried = await callCallback(providerRedirect, start.cookie, "json");
    expect(retried.status, await retried.clone().text()).toBe(200);
    expect((await json<{ branch_id: string }>(retried)).branch_id).toBe(branch.branchId);
  });

  it("keeps everything stored before: after the outage the same clients and tokens are served", async () => {
    const branches = await Promise.all([connectBranch(), connectBranch(), connectBranch()]);
    const stored = await Promise.all(branches.map((b) => currentTokens(b.clientId)));
    const rowsBefore = await Promise.all(branches.map((b) => tokenRows(b.clientId)));

    // A burst of every kind of request while down, writes included.
    for (const branch of branches) {
      await expectDatabaseUnavailable(await getToken(branch.branchId, { envOverrides: DOWN }), "read");
      await expectDatabaseUnavailable(
        await postJson("/tokens/refresh", { branch_id: branch.branchId }, { envOverrides: DOWN }),
        "refresh",
      );
      await expectDatabaseUnavailable(
        await call(`/clients/${branch.clientId}`, { key: "admin", method: "DELETE", envOverrides: DOWN }),
        "delete",
      );
    }

    // Back up: no restart, nothing lost, nothing changed.
    for (const [i, branch] of branches.entries()) {
      const response = await getToken(branch.branchId);
      expect(response.status).toBe(200);
      const body = await json<TokenBody>(response);
      expect(body).toMatchObject({
        branch_id: branch.branchId,
        access_token: stored[i]!.accessToken,
        refreshed: false,
      });
      expect(await tokenRows(branch.clientId)).toEqual(rowsBefore[i]);
      const client = await call(`/clients/${branch.clientId}`, { key: "admin" });
      expect(client.status).toBe(200);
      expect((await json<{ connection: { status: string } }>(client)).connection.status).toBe("connected");
    }
    const health = await call("/health");
    expect(health.status).toBe(200);
  });
});

describe("provider failing while tokens expire", () => {
  it("keeps serving valid tokens through 500s and a hang, marks no grant dead, and recovers with the provider", async () => {
    const [fresh, due, expired] = await Promise.all([connectBranch(), connectBranch(), connectBranch()]);
    const tokensBefore = await Promise.all([fresh, due, expired].map((b) => currentTokens(b.clientId)));
    await expireIn(due.clientId, 120); // inside the refresh-ahead window, still good to use
    await expireIn(expired.clientId, -60);
    for (const branch of [fresh, due, expired]) {
      await setProviderBehavior(branch.oauthClientId, { failNext: { status: 500, count: 1000 } });
    }

    // Phase 1: the provider answers 500.
    const fresh1 = await getToken(fresh.branchId);
    expect(fresh1.status).toBe(200);
    expect((await json<TokenBody>(fresh1)).access_token).toBe(tokensBefore[0]!.accessToken);
    const due1 = await getToken(due.branchId);
    expect(due1.status).toBe(200);
    expect(await json<TokenBody>(due1)).toMatchObject({ access_token: tokensBefore[1]!.accessToken, refreshed: false });
    const expired1 = await getToken(expired.branchId);
    expect(expired1.status).toBe(503);
    expect(expired1.headers.get("content-type")).toMatch(/^application\/problem\+json/);
    expect(Number(expired1.headers.get("retry-after"))).toBeGreaterThan(0);
    expect((await json<{ code: string }>(expired1)).code).toBe("provider_unavailable");
    // In backoff now: further reads do not call the failing provider again.
    const failedSoFar = (await providerStats(due.oauthClientId)).failedRequests;
    expect((await getToken(due.branchId)).status).toBe(200);
    expect((await getToken(expired.branchId)).status).toBe(503);
    expect((await providerStats(due.oauthClientId)).failedRequests).toBe(failedSoFar);

    // Phase 2: the provider hangs (the backoff elapsed, so the next reads try it again).
    for (const branch of [fresh, due, expired]) {
      await setProviderBehavior(branch.oauthClientId, { failNext: null, hang: true });
      await endBackoff(branch.clientId);
    }
    const startedAt = Date.now();
    expect((await getToken(fresh.branchId)).status).toBe(200);
    expect(Date.now() - startedAt).toBeLessThan(1_500); // a fresh token never waits on the provider
    const due2 = await getToken(due.branchId);
    expect(due2.status).toBe(200);
    expect((await json<TokenBody>(due2)).access_token).toBe(tokensBefore[1]!.accessToken);
    const expired2 = await getToken(expired.branchId);
    expect(expired2.status).toBe(503);
    expect((await json<{ code: string }>(expired2)).code).toBe("provider_unavailable");

    // No grant was marked dead.
    for (const branch of [fresh, due, expired]) {
      const rows = await grantState(branch.clientId);
      expect(rows.at(-1)).toEqual({ status: "active", is_valid: true });
      expect(rows.some((row) => row.status === "needs_reauth")).toBe(false);
      const view = await json<{ connection: { status: string } }>(
        await call(`/clients/${branch.clientId}`, { key: "admin" }),
      );
      expect(view.connection.status).toBe("connected");
    }

    // Phase 3: the provider recovers (a hanging request resumes when behaviour changes).
    for (const branch of [fresh, due, expired]) await clearProviderBehavior(branch.oauthClientId);
    // The due branch is in backoff again after the hang: a forced refresh goes through anyway.
    const forced = await postJson("/tokens/refresh", { branch_id: due.branchId });
    expect(forced.status, await forced.clone().text()).toBe(200);
    const dueBody = await json<TokenBody>(forced);
    expect(dueBody.refreshed).toBe(true);
    expect(dueBody.access_token).not.toBe(tokensBefore[1]!.accessToken);
    expect((await introspect(dueBody.access_token, due)).active).toBe(true);
    // The expired one recovers on its own once its backoff elapses.
    await endBackoff(expired.clientId);
    const recovered = await getToken(expired.branchId);
    expect(recovered.status, await recovered.clone().text()).toBe(200);
    const expiredBody = await json<TokenBody>(recovered);
    expect(expiredBody.refreshed).toBe(true);
    expect((await introspect(expiredBody.access_token, expired)).active).toBe(true);
    expect(new Date(expiredBody.expires_at).getTime()).toBeGreaterThan(Date.now() + 3_000_000);

    const [failures] = await sql(
      "select count(*) filter (where failure_count > 0 or next_attempt_at is not null or last_error is not null) from tokens where client_id = any($1::int[]) and is_valid",
      [`{${[due.clientId, expired.clientId].join(",")}}`],
    );
    expect(failures?.[0]).toBe("0"); // the success cleared the failure bookkeeping
    expect((await getToken(fresh.branchId)).status).toBe(200);
  });
});
