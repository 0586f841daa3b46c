import { createExecutionContext } from "cloudflare:test";
import { describe, expect, it } from "vitest";
import worker from "../../src/index";
import { BASE, call, expectProblem, json, testEnv, uniqueId } from "./helpers";
import {
  connectBranch,
  currentTokens,
  introspect,
  postJson,
  providerStats,
  registerBranch,
  setProviderBehavior,
  sql,
  tokenRows,
} from "./oauth-helpers";

interface TokenBody {
  success: boolean;
  message: string;
  client_id: number;
  branch_id: string;
  access_token: string;
  expires_at: string;
  expires_in: number;
  token_type: string;
  scope: string | null;
  refreshed: boolean;
}

const getToken = (branchId: string, key: "service" | "admin" | null = "service") =>
  call(`/tokens/${encodeURIComponent(branchId)}`, { key });

/** Moves the branch's current token to expire `seconds` from now (negative: already expired). */
async function expireIn(clientId: number, seconds: number): Promise<void> {
  await sql("update tokens set expires_at = now() + make_interval(secs => $2) where client_id = $1 and is_valid", [
    clientId,
    seconds,
  ]);
}

describe("GET /tokens/{branch_id}", () => {
  it("serves a fresh token without calling the provider, with the old fields and no refresh token", async () => {
    const branch = await connectBranch();
    const stored = await currentTokens(branch.clientId);
    const before = await providerStats(branch.oauthClientId);

    const response = await getToken(branch.branchId);
    expect(response.status).toBe(200);
    expect(response.headers.get("cache-control")).toBe("no-store");
    const text = await response.text();
    const body = JSON.parse(text) as TokenBody;
    expect(body).toMatchObject({
      success: true,
      client_id: branch.clientId,
      branch_id: branch.branchId,
      access_token: stored.accessToken,
      token_type: "Bearer",
      refreshed: false,
    });
    expect(body.expires_in).toBeGreaterThan(3500);
    expect(new Date(body.expires_at).getTime()).toBeGreaterThan(Date.now() + 3_500_000);
    expect(text).not.toContain(stored.refreshToken!);
    expect(text).not.toContain("refresh_token");
    expect((await providerStats(branch.oauthClientId)).tokenRequests).toBe(before.tokenRequests);
  });

  it("also accepts the admin key, and refuses no key or a wrong key", async () => {
    const branch = await connectBranch();
    expect((await getToken(branch.branchId, "admin")).status).toBe(200);
    const missing = await getToken(branch.branchId, null);
    await expectProblem(missing, 401, "unauthorized");
    expect(missing.headers.get("www-authenticate")).toContain("Bearer");
    await expectProblem(await call(`/tokens/${branch.branchId}`, { key: "not-a-real-key-at-all-000" }), 401);
  });

  it("remembers a key only while it is configured: a key taken out of SERVICE_API_KEY is refused at once", async () => {
    const branch = await connectBranch();
    const env = { ...testEnv, SERVICE_API_KEY: "rotating-service-key-0000000001,rotating-service-key-0000000002" };
    // One env object per configuration, as the runtime hands an isolate (call() makes a new one each time).
    const read = (key: string, environment: typeof testEnv) =>
      worker.fetch(
        new Request(`${BASE}/tokens/${branch.branchId}`, { headers: { authorization: `Bearer ${key}` } }),
        environment,
        createExecutionContext(),
      );
    // Used twice: the second check is the isolate's remembered one.
    expect((await read("rotating-service-key-0000000001", env)).status).toBe(200);
    expect((await read("rotating-service-key-0000000001", env)).status).toBe(200);
    // A wrong key after a valid one is still refused.
    await expectProblem(await read("rotating-service-key-0000000003", env), 401, "unauthorized");
    // The rotation ends: the first key is taken out.
    const rotated = { ...env, SERVICE_API_KEY: "rotating-service-key-0000000002" };
    await expectProblem(await read("rotating-service-key-0000000001", rotated), 401, "unauthorized");
    expect((await read("rotating-service-key-0000000002", rotated)).status).toBe(200);
  });

  it("refreshes first when the token expires within REFRESH_AHEAD_SECONDS", async () => {
    const branch = await connectBranch();
    const old = await currentTokens(branch.clientId);
    await expireIn(branch.clientId, 120);

    const sentAt = Date.now();
    const body = await json<TokenBody>(await getToken(branch.branchId));
    expect(body.refreshed).toBe(true);
    expect(body.access_token).not.toBe(old.accessToken);
    expect((await introspect(body.access_token, branch)).active).toBe(true);
    // Expiry counts from when the refresh request was sent: 3600 s after, give or take the call.
    const expiresAt = new Date(body.expires_at).getTime();
    expect(expiresAt).toBeGreaterThanOrEqual(sentAt + 3_600_000 - 1000);
    expect(expiresAt).toBeLessThanOrEqual(Date.now() + 3_600_000);
    expect((await providerStats(branch.oauthClientId)).refreshGrants).toBe(1);

    const stored = await currentTokens(branch.clientId);
    expect(stored.accessToken).toBe(body.access_token);
    // The provider sent no new refresh token (no rotation): the old one is kept.
    expect(stored.refreshToken).toBe(old.refreshToken);
  });

  it("refreshes a short-lived token at a fraction of its lifetime, not on every call", async () => {
    const branch = await connectBranch({ providerBehavior: { accessTokenTtlSeconds: 120 } });
    // The database path's rule: the edge cache is off, since the test moves the expiry behind its back.
    const uncached = { key: "service", envOverrides: { TOKEN_CACHE_MAX_AGE_SECONDS: "0" } } as const;
    const read = () => call(`/tokens/${branch.branchId}`, uncached);
    const first = await json<TokenBody>(await read());
    expect(first.refreshed).toBe(false);
    expect((await json<TokenBody>(await read())).refreshed).toBe(false);
    expect((await providerStats(branch.oauthClientId)).refreshGrants).toBe(0);

    await expireIn(branch.clientId, 50); // under half of the 120 s lifetime
    const second = await json<TokenBody>(await read());
    expect(second.refreshed).toBe(true);
    expect(second.access_token).not.toBe(first.access_token);
  });

  it("gives 50 concurrent reads of an expired token one refresh grant, and persists the rotated refresh token", async () => {
    const branch = await connectBranch({ providerBehavior: { rotateRefreshTokens: true, tokenDelayMs: 200 } });
    const old = await currentTokens(branch.clientId);
    await expireIn(branch.clientId, -60);

    // The provider answers in 200 ms, but 50 reads in one isolate on a loaded machine can stretch
    // the leader's call and its write past the tests' 2 s OAUTH_TIMEOUT_MS, and the waiters' wait
    // (bounded by the lease, which that timeout sets) with it: then a second grant or a 503, at
    // random. What is tested is that one refresh serves everyone, not how fast the machine is: a
    // timeout no run comes near, which costs nothing when all goes well.
    const patient = { OAUTH_TIMEOUT_MS: "60000" };
    const responses = await Promise.all(
      Array.from({ length: 50 }, () =>
        call(`/tokens/${encodeURIComponent(branch.branchId)}`, { key: "service", envOverrides: patient }),
      ),
    );
    expect(responses.map((r) => r.status)).toEqual(Array(50).fill(200));
    const bodies = await Promise.all(responses.map((r) => json<TokenBody>(r)));
    const served = new Set(bodies.map((b) => b.access_token));
    expect(served.size).toBe(1);
    expect((await providerStats(branch.oauthClientId)).refreshGrants).toBe(1);

    const stored = await currentTokens(branch.clientId);
    expect(stored.accessToken).toBe(bodies[0]!.access_token);
    expect(stored.refreshToken).not.toBe(old.refreshToken);
    expect((await introspect(stored.refreshToken!, branch)).active).toBe(true);
    expect((await introspect(old.refreshToken!, branch)).active).toBe(false);
    expect(stored.row.status).toBe("active");
  });

  it("takes over the refresh when the lease holder crashed (its lease expires)", async () => {
    const branch = await connectBranch();
    await expireIn(branch.clientId, -60);
    await sql(
      "update tokens set lease_owner = 'crashed-isolate', lease_expires_at = now() + interval '400 milliseconds' where client_id = $1 and is_valid",
      [branch.clientId],
    );
    const response = await getToken(branch.branchId);
    expect(response.status).toBe(200);
    expect((await json<TokenBody>(response)).refreshed).toBe(true);
    const [row] = await sql("select lease_owner from tokens where client_id = $1 and is_valid", [branch.clientId]);
    expect(row![0]).toBeNull();
  });

  it("marks the grant dead on invalid_grant and stops calling the provider", async () => {
    const branch = await connectBranch({ providerBehavior: {} });
    await expireIn(branch.clientId, 60);
    await fetch(`${testEnv.OAUTH_SERVER_URL}/admin/refresh-tokens/${branch.oauthClientId}/revoke-all`, {
      method: "POST",
    });

    const body: Record<string, unknown> = await expectProblem(
      await getToken(branch.branchId),
      409,
      "reauthorization_required",
    );
    expect(body.login_hint).toBe(`/token-management/clients/${branch.clientId}/login-url`);
    const [row] = (await tokenRows(branch.clientId)).slice(-1);
    expect(row).toMatchObject({ status: "needs_reauth", is_valid: false });

    const requests = (await providerStats(branch.oauthClientId)).tokenRequests;
    await expectProblem(await getToken(branch.branchId), 409, "reauthorization_required");
    expect((await providerStats(branch.oauthClientId)).tokenRequests).toBe(requests);
    const client = await json<{ connection: { status: string } }>(
      await call(`/clients/${branch.clientId}`, { key: "admin" }),
    );
    expect(client.connection.status).toBe("needs_reauth");
  });

  it("flags the client on invalid_client, serving the current token while it lasts", async () => {
    const branch = await connectBranch();
    const current = await currentTokens(branch.clientId);
    await expireIn(branch.clientId, 120);
    await setProviderBehavior(branch.oauthClientId, { failNext: { status: 401, error: "invalid_client" } });

    const served = await json<TokenBody>(await getToken(branch.branchId));
    expect(served).toMatchObject({ access_token: current.accessToken, refreshed: false });
    const [flag] = await sql(
      "select credentials_rejected_at is not null from apps where id = (select app_id from clients where id = $1)",
      [branch.clientId],
    );
    expect(flag![0]).toBe("t");

    await expireIn(branch.clientId, -1);
    await expectProblem(await getToken(branch.branchId), 409, "client_credentials_rejected");
    const client = await json<{ connection: { credentials_rejected: boolean; status: string } }>(
      await call(`/clients/${branch.clientId}`, { key: "admin" }),
    );
    expect(client.connection).toMatchObject({ credentials_rejected: true, status: "connected" });
  });

  it("serves the still-valid token when the provider fails (500), records the failure and backs off", async () => {
    const branch = await connectBranch();
    const current = await currentTokens(branch.clientId);
    await expireIn(branch.clientId, 120);
    await setProviderBehavior(branch.oauthClientId, { failNext: { status: 500 } });

    const served = await json<TokenBody>(await getToken(branch.branchId));
    expect(served).toMatchObject({ access_token: current.accessToken, refreshed: false });
    const [row] = await sql(
      "select failure_count, last_error, next_attempt_at > now(), status, is_valid, lease_owner from tokens where client_id = $1 order by id desc limit 1",
      [branch.clientId],
    );
    expect(row).toEqual(["1", expect.stringContaining("500"), "t", "active", "t", null]);

    // In backoff: the next read does not call the provider again.
    const requests = (await providerStats(branch.oauthClientId)).tokenRequests;
    expect((await getToken(branch.branchId)).status).toBe(200);
    expect((await providerStats(branch.oauthClientId)).tokenRequests).toBe(requests);
  });

  it("answers 503 with Retry-After when the token expired and the provider fails, keeping the grant", async () => {
    const branch = await connectBranch();
    await expireIn(branch.clientId, -10);
    await setProviderBehavior(branch.oauthClientId, { failNext: { status: 503 } });
    const response = await getToken(branch.branchId);
    await expectProblem(response, 503, "provider_unavailable");
    expect(Number(response.headers.get("retry-after"))).toBeGreaterThanOrEqual(1);
    const [row] = (await tokenRows(branch.clientId)).slice(-1);
    expect(row).toMatchObject({ status: "active", is_valid: true });
  });

  it("honours the provider's Retry-After on 429", async () => {
    const branch = await connectBranch();
    await expireIn(branch.clientId, -10);
    await setProviderBehavior(branch.oauthClientId, { failNext: { status: 429 } });
    const response = await getToken(branch.branchId);
    await expectProblem(response, 503, "provider_unavailable");
    const [row] = await sql("select failure_count, last_error from tokens where client_id = $1 and is_valid", [
      branch.clientId,
    ]);
    expect(row![0]).toBe("1");
    expect(row![1]).toContain("busy");
  });

  it("gives up on a hanging provider after the timeout, without killing the grant", async () => {
    const branch = await connectBranch();
    await expireIn(branch.clientId, -10);
    await setProviderBehavior(branch.oauthClientId, { hang: true });
    const started = Date.now();
    const response = await getToken(branch.branchId);
    const elapsed = Date.now() - started;
    await setProviderBehavior(branch.oauthClientId, { hang: false });
    await expectProblem(response, 503, "provider_unavailable");
    expect(elapsed).toBeLessThan(10_000); // OAUTH_TIMEOUT_MS is 2000 in tests
    const [row] = await sql(
      "select status, is_valid, lease_owner, last_error from tokens where client_id = $1 order by id desc limit 1",
      [branch.clientId],
    );
    expect(row!.slice(0, 3)).toEqual(["active", "t", null]);
    expect(row![3]).toContain("did not answer");
  });

  it("answers 404 for an unknown branch and 409 with a login hint for a never-connected one", async () => {
    await expectProblem(await getToken(uniqueId("no-such-branch")), 404, "not_found");
    const branch = await registerBranch();
    const body: Record<string, unknown> = await expectProblem(await getToken(branch.branchId), 409, "not_connected");
    expect(body.login_hint).toBe(`/token-management/clients/${branch.clientId}/login-url`);
  });

  it("answers 404 for a deactivated client", async () => {
    const branch = await connectBranch();
    const patch = await postJson(`/clients/${branch.clientId}`, { is_active: false }, { method: "PATCH" });
    expect(patch.status).toBe(200);
    await expectProblem(await getToken(branch.branchId), 404, "not_found");
  });
});

describe("POST /tokens/refresh", () => {
  it("refreshes now by internal client_id, as the old service did", async () => {
    const branch = await connectBranch();
    const old = await currentTokens(branch.clientId);
    const response = await postJson("/tokens/refresh", { client_id: branch.clientId });
    expect(response.status).toBe(200);
    expect(response.headers.get("cache-control")).toBe("no-store");
    const body = await json<TokenBody>(response);
    expect(body).toMatchObject({
      success: true,
      refreshed: true,
      client_id: branch.clientId,
      branch_id: branch.branchId,
    });
    expect(body.access_token).not.toBe(old.accessToken);
  });

  it("refreshes now by branch_id", async () => {
    const branch = await connectBranch();
    const body = await json<TokenBody>(await postJson("/tokens/refresh", { branch_id: branch.branchId }));
    expect(body.refreshed).toBe(true);
    expect((await providerStats(branch.oauthClientId)).refreshGrants).toBe(1);
  });

  it("joins a refresh already in flight instead of refreshing twice", async () => {
    const branch = await connectBranch({ providerBehavior: { tokenDelayMs: 200, rotateRefreshTokens: true } });
    const responses = await Promise.all(
      Array.from({ length: 8 }, () => postJson("/tokens/refresh", { branch_id: branch.branchId })),
    );
    expect(responses.map((r) => r.status)).toEqual(Array(8).fill(200));
    const bodies = await Promise.all(responses.map((r) => json<TokenBody>(r)));
    expect(new Set(bodies.map((b) => b.access_token)).size).toBe(1);
    expect(bodies.every((b) => b.refreshed)).toBe(true);
    expect((await providerStats(branch.oauthClientId)).refreshGrants).toBe(1);
  });

  it("needs the admin key and a valid body", async () => {
    const branch = await connectBranch();
    await expectProblem(
      await postJson("/tokens/refresh", { client_id: branch.clientId }, { key: "service" }),
      403,
      "forbidden",
    );
    await expectProblem(await postJson("/tokens/refresh", { client_id: "one" }), 422, "validation_failed");
    await expectProblem(await postJson("/tokens/refresh", {}), 422, "validation_failed");
    await expectProblem(await postJson("/tokens/refresh", "{not json"), 400, "bad_request");
    await expectProblem(await postJson("/tokens/refresh", { client_id: 2_000_000_000 }), 404, "not_found");
  });
});

describe("DELETE /tokens/{branch_id}", () => {
  it("revokes at the provider and here; the client shows revoked until connected again", async () => {
    const branch = await connectBranch();
    const { accessToken, refreshToken } = await currentTokens(branch.clientId);
    const response = await call(`/tokens/${branch.branchId}`, { method: "DELETE", key: "admin" });
    expect(response.status).toBe(200);
    expect(await json(response)).toMatchObject({
      success: true,
      revoked_at_provider: true,
      client_id: branch.clientId,
    });
    expect((await introspect(refreshToken!, branch)).active).toBe(false);
    expect((await introspect(accessToken, branch)).active).toBe(false);

    await expectProblem(await getToken(branch.branchId), 409, "not_connected");
    const client = await json<{ connection: { status: string } }>(
      await call(`/clients/${branch.clientId}`, { key: "admin" }),
    );
    expect(client.connection.status).toBe("revoked");
  });

  it("still revokes here when the provider is down", async () => {
    const branch = await connectBranch();
    // Nothing listens on port 9: the revocation request fails at the network level.
    const response = await call(`/tokens/${branch.branchId}`, {
      method: "DELETE",
      key: "admin",
      envOverrides: { OAUTH_REVOCATION_URL: "http://127.0.0.1:9/revoke" },
    });
    expect(await json(response)).toMatchObject({ success: true, revoked_at_provider: false });
    await expectProblem(await getToken(branch.branchId), 409, "not_connected");
  });

  it("needs the admin key, and 404s an unknown branch", async () => {
    const branch = await connectBranch();
    await expectProblem(await call(`/tokens/${branch.branchId}`, { method: "DELETE", key: "service" }), 403);
    await expectProblem(await call(`/tokens/${uniqueId("nope")}`, { method: "DELETE", key: "admin" }), 404);
  });
});
