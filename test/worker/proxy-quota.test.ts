import { describe, expect, it, vi } from "vitest";
import { editedResource, retryAfterSeconds } from "../../src/lib/proxy-rules";
import { QUOTA_WINDOW_MS, QuotaLedger } from "../../src/proxy/ledger";
import { expectProblem } from "./helpers";
import { connectBranch, currentTokens } from "./oauth-helpers";
import { isolatedQuota, proxy, Upstream } from "./proxy-helpers";

/**
 * The app's budgets at its provider: the ledger's rules with time as a parameter, then the Durable
 * Object through the proxy (each test with an object of its own, see isolatedQuota).
 */

const LIMITS = { requestsPerMinute: 3, editsPerMinutePerResource: 2 };

describe("the quota ledger", () => {
  it("lets through the requests per minute in any sliding minute, then says when the next fits", () => {
    const ledger = new QuotaLedger();
    const t0 = 1_000_000;
    expect(ledger.take({ limits: LIMITS }, t0)).toEqual({ granted: true });
    expect(ledger.take({ limits: LIMITS }, t0 + 10_000)).toEqual({ granted: true });
    expect(ledger.take({ limits: LIMITS }, t0 + 20_000)).toEqual({ granted: true });
    expect(ledger.take({ limits: LIMITS }, t0 + 30_000)).toEqual({
      granted: false,
      reason: "requests",
      retryAfterSeconds: 30,
    });
    // A refused ask is not counted: the first slot frees at t0 + 60 s exactly.
    expect(ledger.take({ limits: LIMITS }, t0 + QUOTA_WINDOW_MS - 1)).toMatchObject({ granted: false });
    expect(ledger.take({ limits: LIMITS }, t0 + QUOTA_WINDOW_MS)).toEqual({ granted: true });
    expect(ledger.take({ limits: LIMITS }, t0 + QUOTA_WINDOW_MS + 1)).toMatchObject({
      granted: false,
      retryAfterSeconds: 10,
    });
  });

  it("holds edits per resource apart from other resources, and reads outside the edit budget", () => {
    const ledger = new QuotaLedger();
    const limits = { requestsPerMinute: 100, editsPerMinutePerResource: 2 };
    const t0 = 5_000_000;
    expect(ledger.take({ limits, resource: "locations/1" }, t0)).toEqual({ granted: true });
    expect(ledger.take({ limits, resource: "locations/1" }, t0 + 1_000)).toEqual({ granted: true });
    expect(ledger.take({ limits, resource: "locations/1" }, t0 + 2_000)).toEqual({
      granted: false,
      reason: "edits",
      retryAfterSeconds: 58,
    });
    expect(ledger.take({ limits, resource: "locations/2" }, t0 + 2_000)).toEqual({ granted: true });
    expect(ledger.take({ limits }, t0 + 2_000)).toEqual({ granted: true });
    expect(ledger.take({ limits, resource: "locations/1" }, t0 + QUOTA_WINDOW_MS)).toEqual({ granted: true });
  });

  it("an edit refused for its resource does not spend the app's requests; an edit needs both budgets", () => {
    const ledger = new QuotaLedger();
    const limits = { requestsPerMinute: 2, editsPerMinutePerResource: 1 };
    const t0 = 9_000_000;
    expect(ledger.take({ limits, resource: "locations/1" }, t0)).toEqual({ granted: true });
    expect(ledger.take({ limits, resource: "locations/1" }, t0)).toMatchObject({ granted: false, reason: "edits" });
    expect(ledger.take({ limits }, t0)).toEqual({ granted: true });
    expect(ledger.take({ limits, resource: "locations/2" }, t0)).toMatchObject({ granted: false, reason: "requests" });
  });

  it("refuses everything while paused; a later pause wins, an earlier one changes nothing", () => {
    const ledger = new QuotaLedger();
    const t0 = 2_000_000;
    expect(ledger.pause(t0 + 30_000)).toBe(true);
    expect(ledger.take({ limits: LIMITS }, t0)).toEqual({ granted: false, reason: "paused", retryAfterSeconds: 30 });
    expect(ledger.pause(t0 + 10_000)).toBe(false);
    expect(ledger.take({ limits: LIMITS }, t0 + 29_500)).toEqual({
      granted: false,
      reason: "paused",
      retryAfterSeconds: 1,
    });
    expect(ledger.take({ limits: LIMITS }, t0 + 30_000)).toEqual({ granted: true });
    expect(ledger.pause(t0 + 90_000)).toBe(true);
    expect(ledger.take({ limits: LIMITS }, t0 + 31_000)).toMatchObject({ granted: false, retryAfterSeconds: 59 });
  });
});

describe("the proxy's rules for quotas", () => {
  it("counts writes to a location as its edits, and nothing else", () => {
    expect(editedResource("PATCH", "v1/locations/123")).toBe("locations/123");
    expect(editedResource("POST", "v4/accounts/9/locations/123/localPosts")).toBe("locations/123");
    expect(editedResource("PUT", "v4/accounts/9/locations/123/reviews/5/reply")).toBe("locations/123");
    expect(editedResource("POST", "v1/locations/123:clearLocationAssociation")).toBe("locations/123");
    expect(editedResource("GET", "v1/locations/123")).toBeUndefined();
    expect(editedResource("HEAD", "v1/locations/123")).toBeUndefined();
    expect(editedResource("POST", "v1/accounts/9/invitations")).toBeUndefined();
  });

  it("reads Retry-After as seconds or an HTTP date", () => {
    const now = new Date("2026-12-03T08:00:00Z");
    expect(retryAfterSeconds("120", now)).toBe(120);
    expect(retryAfterSeconds(" 0 ", now)).toBe(0);
    expect(retryAfterSeconds("Thu, 03 Dec 2026 08:01:30 GMT", now)).toBe(90);
    expect(retryAfterSeconds("Thu, 03 Dec 2026 07:00:00 GMT", now)).toBe(0);
    expect(retryAfterSeconds("soon", now)).toBeUndefined();
    expect(retryAfterSeconds("-5", now)).toBeUndefined();
    expect(retryAfterSeconds(null, now)).toBeUndefined();
  });
});

describe("the quota object, through the proxy", () => {
  it("answers 429 with Retry-After once the app's requests per minute are spent, sending nothing", async () => {
    const branch = await connectBranch();
    const upstream = new Upstream();
    const overrides = { PROXY_QUOTA: isolatedQuota(), PROXY_QUOTA_PER_MINUTE: "3" };
    for (let i = 0; i < 3; i++) {
      const response = await proxy(upstream, branch.branchId, "v1/accounts", { overrides });
      expect(response.status).toBe(200);
      await response.arrayBuffer();
    }
    const refused = await proxy(upstream, branch.branchId, "v1/accounts", { overrides });
    const problem = await expectProblem(refused, 429, "quota_exceeded");
    expect((problem as Record<string, unknown>).quota).toBe("requests");
    const retryAfter = Number(refused.headers.get("retry-after"));
    expect(retryAfter).toBeGreaterThanOrEqual(1);
    expect(retryAfter).toBeLessThanOrEqual(60);
    expect(await upstream.requests()).toHaveLength(3);
  });

  it("is one budget for every branch of the app", async () => {
    // Two branches of one app (the same OAuth client; the same account joins the first's grant).
    const a = await connectBranch();
    const b = await connectBranch({ oauthClientId: a.oauthClientId, clientSecret: a.clientSecret, atProvider: false });
    const upstream = new Upstream();
    const overrides = { PROXY_QUOTA: isolatedQuota(), PROXY_QUOTA_PER_MINUTE: "2" };
    for (const branch of [a, b]) {
      const response = await proxy(upstream, branch.branchId, "v1/accounts", { overrides });
      expect(response.status).toBe(200);
      await response.arrayBuffer();
    }
    await expectProblem(await proxy(upstream, a.branchId, "v1/accounts", { overrides }), 429, "quota_exceeded");
    await expectProblem(await proxy(upstream, b.branchId, "v1/accounts", { overrides }), 429, "quota_exceeded");
    expect(await upstream.requests()).toHaveLength(2);
  });

  it("counts a 401's retry as a request: with one left, the retry is refused and not sent", async () => {
    const branch = await connectBranch();
    const old = await currentTokens(branch.clientId);
    const upstream = new Upstream();
    await upstream.script({ rejectTokens: [old.accessToken] });
    const overrides = { PROXY_QUOTA: isolatedQuota(), PROXY_QUOTA_PER_MINUTE: "1" };
    const response = await proxy(upstream, branch.branchId, "v1/accounts", { overrides });
    await expectProblem(response, 429, "quota_exceeded");
    expect(await upstream.requests()).toHaveLength(1);
  });

  it("holds 10 edits per minute per location; other locations and reads go on", async () => {
    const branch = await connectBranch();
    const upstream = new Upstream();
    const overrides = { PROXY_QUOTA: isolatedQuota() };
    const edit = (location: string) =>
      proxy(upstream, branch.branchId, `v1/locations/${location}?updateMask=title`, {
        overrides,
        method: "PATCH",
        headers: { "content-type": "application/json", "content-length": "17" },
        body: '{"title":"Cafe"}\n',
      });
    for (let i = 0; i < 10; i++) {
      const response = await edit("77");
      expect(response.status).toBe(200);
      await response.arrayBuffer();
    }
    const refused = await edit("77");
    const problem = await expectProblem(refused, 429, "quota_exceeded");
    expect((problem as Record<string, unknown>).quota).toBe("edits");
    const other = await edit("78");
    expect(other.status).toBe(200);
    await other.arrayBuffer();
    const read = await proxy(upstream, branch.branchId, "v1/locations/77?readMask=title", { overrides });
    expect(read.status).toBe(200);
    await read.arrayBuffer();
    expect(await upstream.requests()).toHaveLength(12);
  });

  it("passes an upstream 429 back and pauses the app until its Retry-After", async () => {
    const branch = await connectBranch();
    const upstream = new Upstream();
    const body = '{"error":{"code":429,"status":"RESOURCE_EXHAUSTED"}}';
    await upstream.script({ responses: [{ status: 429, headers: { "retry-after": "30" }, body }] });
    const overrides = { PROXY_QUOTA: isolatedQuota() };

    const limited = await proxy(upstream, branch.branchId, "v1/accounts", { overrides });
    expect(limited.status).toBe(429);
    expect(limited.headers.get("retry-after")).toBe("30");
    expect(limited.headers.get("proxy-retry-after-clamped")).toBeNull();
    expect(await limited.text()).toBe(body);

    const paused = await proxy(upstream, branch.branchId, "v1/accounts", { overrides });
    const problem = await expectProblem(paused, 429, "quota_exceeded");
    expect((problem as Record<string, unknown>).quota).toBe("paused");
    const retryAfter = Number(paused.headers.get("retry-after"));
    expect(retryAfter).toBeGreaterThanOrEqual(28);
    expect(retryAfter).toBeLessThanOrEqual(30);
    expect(await upstream.requests()).toHaveLength(1);
  });

  it("pauses the app for 1 s after an upstream 429 without Retry-After, and adds none", async () => {
    const branch = await connectBranch();
    const upstream = new Upstream();
    await upstream.script({ responses: [{ status: 429 }] });
    const overrides = { PROXY_QUOTA: isolatedQuota() };
    const limited = await proxy(upstream, branch.branchId, "v1/accounts", { overrides });
    expect(limited.status).toBe(429);
    expect(limited.headers.get("retry-after")).toBeNull();
    await limited.arrayBuffer();
    const paused = await proxy(upstream, branch.branchId, "v1/accounts", { overrides });
    await expectProblem(paused, 429, "quota_exceeded");
    expect(paused.headers.get("retry-after")).toBe("1");
    // The pause ends: the app's calls go out again (polled, nothing sleeps in the Worker).
    await vi.waitFor(
      async () => {
        const again = await proxy(upstream, branch.branchId, "v1/accounts", { overrides });
        await again.arrayBuffer();
        expect(again.status).toBe(200);
      },
      { timeout: 3_000, interval: 250 },
    );
    expect(await upstream.requests()).toHaveLength(2);
  });

  it("clamps a huge Retry-After to PROXY_MAX_RETRY_AFTER_SECONDS and says so", async () => {
    const branch = await connectBranch();
    const upstream = new Upstream();
    await upstream.script({ responses: [{ status: 429, headers: { "retry-after": "3600" } }] });
    const overrides = { PROXY_QUOTA: isolatedQuota(), PROXY_MAX_RETRY_AFTER_SECONDS: "45" };

    const limited = await proxy(upstream, branch.branchId, "v1/accounts", { overrides });
    expect(limited.status).toBe(429);
    expect(limited.headers.get("retry-after")).toBe("45");
    expect(limited.headers.get("proxy-retry-after-clamped")).toBe("3600");
    await limited.arrayBuffer();

    const paused = await proxy(upstream, branch.branchId, "v1/accounts", { overrides });
    await expectProblem(paused, 429, "quota_exceeded");
    const retryAfter = Number(paused.headers.get("retry-after"));
    expect(retryAfter).toBeGreaterThanOrEqual(43);
    expect(retryAfter).toBeLessThanOrEqual(45);
    expect(await upstream.requests()).toHaveLength(1);
  });
});
