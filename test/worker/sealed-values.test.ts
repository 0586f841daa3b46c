import { describe, expect, it } from "vitest";
import { createServices } from "../../src/context";
import { refreshDeps, refreshTokens } from "../../src/services/scheduled";
import { TEST_ENCRYPTION_KEY } from "./bindings";
import { eventsOf } from "./event-helpers";
import { call, expectProblem, json, testEnv } from "./helpers";
import { sealV1 } from "./legacy-seal";
import { appRowOf, connectBranch, currentTokens, postJson, runBrowserFlow, sql, tokenRows } from "./oauth-helpers";

/**
 * Sealed values are bound to their row: whoever can write the database cannot move one branch's
 * token or secret to another branch. The branch whose row holds a foreign value gets a clear 409;
 * every other branch keeps working.
 */

const getToken = (branchId: string, options: Parameters<typeof call>[1] = {}) =>
  call(`/tokens/${encodeURIComponent(branchId)}`, { key: "service", ...options });

async function copyCurrentToken(column: "access_token" | "refresh_token", from: number, to: number): Promise<void> {
  await sql(
    `update tokens set ${column} = (select ${column} from tokens where client_id = $1 and is_valid) where client_id = $2 and is_valid`,
    [from, to],
  );
}

describe("a sealed value copied to another branch's row", () => {
  it("an access token: that branch gets a 409 naming the problem, the owner keeps being served", async () => {
    const [a, b] = await Promise.all([connectBranch(), connectBranch()]);
    const aToken = (await currentTokens(a.clientId)).accessToken;
    await copyCurrentToken("access_token", a.clientId, b.clientId);

    const response = await getToken(b.branchId);
    const text = await response.clone().text();
    const problem = await expectProblem(response, 409, "sealed_value_unreadable");
    expect(problem.detail).toContain(`client ${b.clientId}`);
    expect(problem.detail).toMatch(/token .* cannot be opened/);
    expect(problem.detail).toMatch(/login link/);
    expect(response.headers.get("cache-control")).toBe("no-store");
    // Branch A's token is never handed to branch B's caller.
    expect(text).not.toContain(aToken);

    const served = await getToken(a.branchId);
    expect(served.status).toBe(200);
    expect((await json<{ access_token: string }>(served)).access_token).toBe(aToken);
  });

  it("a client secret: refreshing that branch is a 409, its grant is not marked dead, others still refresh", async () => {
    const [a, b] = await Promise.all([connectBranch(), connectBranch()]);
    // The secret of A's app copied onto B's app.
    await sql(
      `update apps set client_secret = (select a.client_secret from apps a join clients c on c.app_id = a.id where c.id = $1)
        where id = (select app_id from clients where id = $2)`,
      [a.clientId, b.clientId],
    );

    const refreshB = await postJson("/tokens/refresh", { client_id: b.clientId }, { key: "admin" });
    const problem = await expectProblem(refreshB, 409, "sealed_value_unreadable");
    expect(problem.detail).toContain("client secret");
    expect(problem.detail).toContain(`PATCH /apps/${(await appRowOf(b.clientId))?.id}`);
    // Nothing stored is lost: the grant stays current and active, the lease is released.
    const [row] = await tokenRows(b.clientId);
    expect(row).toMatchObject({ is_valid: true, status: "active", lease_owner: null });

    const refreshA = await postJson("/tokens/refresh", { client_id: a.clientId }, { key: "admin" });
    expect(refreshA.status).toBe(200);
    expect((await json<{ refreshed: boolean }>(refreshA)).refreshed).toBe(true);

    // Setting the secret again (sealed for B's row) is the documented way out.
    const patched = await call(`/clients/${b.clientId}`, {
      method: "PATCH",
      key: "admin",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ client_secret: b.clientSecret }),
    });
    expect(patched.status).toBe(200);
    const again = await postJson("/tokens/refresh", { client_id: b.clientId }, { key: "admin" });
    expect(again.status, await again.clone().text()).toBe(200);
  });

  it("a value moved to another column of the same row does not open either", async () => {
    const branch = await connectBranch();
    await sql("update tokens set access_token = refresh_token where client_id = $1 and is_valid", [branch.clientId]);
    await expectProblem(await getToken(branch.branchId), 409, "sealed_value_unreadable");
  });
});

describe("the cron and a foreign value", () => {
  it("refreshes every other branch; the one holding another's refresh token fails alone, its grant kept", async () => {
    const [a, b] = await Promise.all([connectBranch(), connectBranch()]);
    await copyCurrentToken("refresh_token", a.clientId, b.clientId);
    const ids = [(await currentTokens(a.clientId)).row.id, (await tokenRows(b.clientId)).at(-1)!.id];

    // Both tokens are fresh: widen the cron's window so both are due now.
    const d = { ...refreshDeps(await createServices(testEnv)), windowSeconds: 24 * 60 * 60 };
    const counts = await refreshTokens(d, ids, new Date());
    expect(counts).toMatchObject({ refreshed: 1, failed: 1, dead: 0 });
    const [rowB] = (await tokenRows(b.clientId)).filter((row) => row.is_valid);
    // Not a dead grant: still current and active, with the reason on record for the operator.
    expect(rowB).toMatchObject({ status: "active" });
    const [lastError] = await sql("select last_error from tokens where id = $1", [ids[1]]);
    expect(lastError?.[0]).toMatch(/^sealed value unreadable: tokens\.refresh_token does not open/);
    expect((await getToken(a.branchId)).status).toBe(200);

    // A visible state, one event, and the cron leaves it until an operator fixes it.
    const view = await json<{ connection: { status: string; last_error: string } }>(
      await call(`/clients/${b.clientId}`, { key: "admin" }),
    );
    expect(view.connection.last_error).toMatch(/^sealed value unreadable/);
    const degraded = (await eventsOf(b.clientId)).filter((e) => e.type === "connection.degraded");
    expect(degraded).toHaveLength(1);
    expect(await refreshTokens(d, [ids[1]!], new Date())).toMatchObject({ refreshed: 0, failed: 0, skipped: 1 });
    expect((await eventsOf(b.clientId)).filter((e) => e.type === "connection.degraded")).toHaveLength(1);
    // A read once the access token is due says what to do, with no provider call.
    await sql("update tokens set expires_at = now() - interval '1 second' where id = $1", [ids[1]]);
    const problem = await expectProblem(await getToken(b.branchId), 409, "sealed_value_unreadable");
    expect(problem.detail).toMatch(/PATCH \/token-management\/apps\/\d+/);
    // The fix: a new consent. Google sends no refresh token to an account holding one, and the stored
    // one does not open: the first consent says so, the next forces the consent screen and renews it.
    const newLink = async () =>
      (await json<{ login_url: string }>(await call(`/clients/${b.clientId}/login-url`, { key: "admin" }))).login_url;
    expect((await runBrowserFlow(await newLink())).callback.status).toBe(409);
    const forced = await runBrowserFlow(await newLink());
    expect(forced.start.authorizeUrl.searchParams.get("prompt")).toBe("consent");
    expect(forced.callback.status).toBe(200);
    expect((await getToken(b.branchId)).status).toBe(200);
    const [after] = await sql("select last_error, next_attempt_at from tokens where id = $1", [ids[1]]);
    expect(after).toEqual([null, null]);
  });
});

describe("values sealed before row binding (v1 envelopes)", () => {
  it("are refused by default (wrangler.toml and unset alike), served while TOKEN_ENCRYPTION_ACCEPT_V1 is on", async () => {
    const branch = await connectBranch();
    const legacy = await sealV1(TEST_ENCRYPTION_KEY, "ya29.legacy-access-token", "tokens.access_token");
    await sql("update tokens set access_token = $1 where client_id = $2 and is_valid", [legacy, branch.clientId]);
    // Read from the database each time: the edge cache would serve the token it holds.
    const noCache = { TOKEN_CACHE_MAX_AGE_SECONDS: "0" };

    // The tests' bindings are wrangler.toml's [vars]: a new deployment's configuration.
    await expectProblem(await getToken(branch.branchId, { envOverrides: noCache }), 409, "sealed_value_unreadable");
    const unset = await getToken(branch.branchId, { envOverrides: { ...noCache, TOKEN_ENCRYPTION_ACCEPT_V1: "" } });
    await expectProblem(unset, 409, "sealed_value_unreadable");

    // An upgraded deployment before `db:reseal` has finished: the value was left in place and serves.
    const served = await getToken(branch.branchId, {
      envOverrides: { ...noCache, TOKEN_ENCRYPTION_ACCEPT_V1: "true" },
    });
    expect(served.status).toBe(200);
    expect((await json<{ access_token: string }>(served)).access_token).toBe("ya29.legacy-access-token");
  });
});
