import { createExecutionContext, waitOnExecutionContext } from "cloudflare:test";
import { describe, expect, it } from "vitest";
import { createApp, fastTokenRead } from "../../src/app";
import worker from "../../src/index";
import { recordFailure } from "../../src/lib/rate-limit";
import { TEST_ADMIN_KEY, TEST_SERVICE_KEY } from "./bindings";
import { expireIn, neonFault, newInbox, webhookBindings } from "./event-helpers";
import { BASE, call, testEnv, uniqueId } from "./helpers";
import { connectBranch, registerBranch, setProviderBehavior } from "./oauth-helpers";

/**
 * fastTokenRead (src/app.ts) answers a plain warm token read without the router. It must answer
 * exactly what the app would, and decline (undefined) everything the app must see itself.
 */

/** The app alone (routes and middleware), as the Worker runs it when the fast path declines. */
const app = createApp();

const request = (path: string, init: RequestInit & { key?: string } = {}) => {
  const { key = TEST_SERVICE_KEY, ...rest } = init;
  const headers = new Headers(rest.headers);
  if (key) headers.set("authorization", `Bearer ${key}`);
  // One request id for both answers, so their problem bodies can be compared whole.
  headers.set("cf-ray", "fast-path-test");
  return new Request(path.startsWith("http") ? path : `${BASE}${path}`, { ...rest, headers });
};

async function viaFastPath(path: string, init: RequestInit & { key?: string } = {}, env: Env = testEnv) {
  const ctx = createExecutionContext();
  const response = await fastTokenRead(request(path, init), env, ctx);
  await waitOnExecutionContext(ctx);
  return response;
}

async function viaApp(path: string, init: RequestInit & { key?: string } = {}, env: Env = testEnv) {
  const ctx = createExecutionContext();
  const response = await app.fetch(request(path, init), env, ctx);
  await waitOnExecutionContext(ctx);
  return response;
}

/** What a caller sees of an answer: status, every header, the body (seconds left may tick between the two). */
async function seen(response: Response) {
  const body = (await response.json()) as Record<string, unknown>;
  delete body.expires_in;
  const headers = Object.fromEntries(
    [...response.headers].map(([name, value]) => [
      name,
      name === "cache-status" ? value.replace(/; ttl=\d+/, "") : value,
    ]),
  );
  return { status: response.status, headers, body };
}

describe("the warm token read's fast path", () => {
  it("answers a plain read as the app does: the token, an unknown branch, a never-connected one", async () => {
    const connected = await connectBranch();
    const neverConnected = await registerBranch();
    // The keys are seen valid once by the app's full check (requireKey), as the first read of an isolate is.
    expect((await call(`/tokens/${connected.branchId}`, { key: "service" })).status).toBe(200);
    expect((await call(`/tokens/${connected.branchId}`, { key: "admin" })).status).toBe(200);

    const cases: [string, RequestInit & { key?: string }, number][] = [
      [`/tokens/${connected.branchId}`, { key: TEST_SERVICE_KEY }, 200],
      [`/tokens/${connected.branchId}`, { key: TEST_ADMIN_KEY }, 200],
      [`/tokens/${connected.branchId}`, { key: "", headers: { "x-api-key": TEST_SERVICE_KEY } }, 200],
      [`/tokens/${uniqueId("no-such-branch")}`, { key: TEST_SERVICE_KEY }, 404],
      ["/tokens/refresh", { key: TEST_SERVICE_KEY }, 404],
      [`/tokens/${neverConnected.branchId}`, { key: TEST_SERVICE_KEY }, 409],
    ];
    for (const [path, init, status] of cases) {
      const fast = await viaFastPath(path, init);
      expect(fast, `${path} was declined`).toBeInstanceOf(Response);
      const fromFast = await seen(fast!);
      expect(fromFast.status).toBe(status);
      // The app answers second, from the memory tier the fast path left: same tier for a 200.
      expect(fromFast).toEqual(await seen(await viaApp(path, init)));
    }
  });

  it("answers a database outage as the app does: 503 with Retry-After, nothing lost", async () => {
    const branch = await connectBranch();
    const warm = await registerBranch();
    expect((await call(`/tokens/${warm.branchId}`, { key: "service" })).status).toBe(409);
    // Only this branch's read fails (its id is a parameter of the statement), and it was never cached.
    await neonFault({ mode: "down", match: [branch.branchId] });
    let fast: Response | undefined;
    let fromApp: Response;
    try {
      fast = await viaFastPath(`/tokens/${branch.branchId}`);
      fromApp = await viaApp(`/tokens/${branch.branchId}`);
    } finally {
      await neonFault({ mode: "ok" });
    }
    expect(fast).toBeInstanceOf(Response);
    const fromFast = await seen(fast!);
    expect(fromFast.status).toBe(503);
    expect(fromFast.headers["retry-after"]).toBeDefined();
    expect(fromFast).toEqual(await seen(fromApp));
    expect((await viaFastPath(`/tokens/${branch.branchId}`))!.status).toBe(200);
  });

  it("delivers the events a read wrote, as the app does (needs_reauth after invalid_grant)", async () => {
    const inbox = await newInbox();
    // One env object: the configuration the isolate remembers the key for.
    const hooked = { ...testEnv, ...webhookBindings(inbox.url) } as Env;
    // The key is checked once by the app for this configuration (on another branch: the read would
    // cache this one's token).
    expect((await viaApp(`/tokens/${(await registerBranch()).branchId}`, {}, hooked)).status).toBe(409);
    const branch = await connectBranch();
    await expireIn(branch.clientId, -10);
    await setProviderBehavior(branch.oauthClientId, { failNext: { status: 400, error: "invalid_grant", count: 1 } });
    const fast = await viaFastPath(`/tokens/${branch.branchId}`, {}, hooked);
    expect(fast, "the read was declined").toBeInstanceOf(Response);
    expect(fast!.status).toBe(409);
    const sent = (await inbox.deliveries()).filter((d) => d.payload.data.branch_id === branch.branchId);
    expect(sent.map((d) => [d.payload.type, d.answered])).toEqual([["connection.needs_reauth", 204]]);
  });

  it("declines what the app must answer itself, and the Worker still answers it", async () => {
    const branch = await connectBranch();
    const path = `/tokens/${branch.branchId}`;
    expect((await call(path, { key: "service" })).status).toBe(200);
    expect(await viaFastPath(path)).toBeInstanceOf(Response);

    const declined: [string, string, RequestInit & { key?: string }, number][] = [
      ["no key", path, { key: "" }, 401],
      ["a wrong key", path, { key: "not-a-real-key-at-all-0000" }, 401],
      ["a HEAD request", path, { method: "HEAD" }, 200],
      ["a query string", `${path}?fields=all`, {}, 200],
      ["a percent-encoded id", `/tokens/${encodeURIComponent("a b")}`, {}, 404],
      ["an id over 128 characters", `/tokens/${"b".repeat(129)}`, {}, 422],
      ["no id", "/tokens/", {}, 404],
      ["a path under the id", `${path}/more`, {}, 404],
      ["a trailing slash", `${path}/`, {}, 404],
      ["a doubled slash", `http://localhost/token-management//tokens/${branch.branchId}`, {}, 404],
      ["another case", `http://localhost/TOKEN-MANAGEMENT/tokens/${branch.branchId}`, {}, 404],
      [
        "a wrong Bearer key beside a valid X-API-Key",
        path,
        { key: "not-a-real-key-at-all-0000", headers: { "x-api-key": TEST_SERVICE_KEY } },
        401,
      ],
      ["another route", "/clients/1", {}, 403],
    ];
    for (const [what, target, init, status] of declined) {
      expect(await viaFastPath(target, init), what).toBeUndefined();
      const ctx = createExecutionContext();
      const answer = await worker.fetch(
        request(target, init) as Request<unknown, IncomingRequestCfProperties>,
        testEnv,
        ctx,
      );
      await waitOnExecutionContext(ctx);
      expect(answer.status, what).toBe(status);
    }
  });

  it("never checks a key itself: a valid key this configuration has not seen yet goes to requireKey", async () => {
    const branch = await connectBranch();
    // A new env object is a new configuration for the isolate, with no key remembered.
    const fresh = { ...testEnv };
    expect(await viaFastPath(`/tokens/${branch.branchId}`, {}, fresh)).toBeUndefined();
    // Once the app has checked it for this configuration, the fast path answers.
    expect((await viaApp(`/tokens/${branch.branchId}`, {}, fresh)).status).toBe(200);
    expect((await viaFastPath(`/tokens/${branch.branchId}`, {}, fresh))?.status).toBe(200);
  });

  it("declines an address held back for failed keys, so its valid key gets the app's 429", async () => {
    const branch = await connectBranch();
    const address = "203.0.113.77";
    const init = { headers: { "cf-connecting-ip": address } };
    expect((await call(`/tokens/${branch.branchId}`, { key: "service", ...init })).status).toBe(200);
    expect(await viaFastPath(`/tokens/${branch.branchId}`, init)).toBeInstanceOf(Response);
    // The limiter refuses the address's next failure: the isolate holds it back for a period.
    expect(await recordFailure({ limit: async () => ({ success: false }) }, address, Date.now())).toBe(true);
    expect(await viaFastPath(`/tokens/${branch.branchId}`, init)).toBeUndefined();
    expect((await call(`/tokens/${branch.branchId}`, { key: "service", ...init })).status).toBe(429);
  });
});
