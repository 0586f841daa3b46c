/**
 * The local authorization server's Business Profile API (dev/oauth-server/business-profile.ts): the
 * Worker lists an account's locations through it and proxies calls to it, so it must check bearer
 * tokens as Google does, page as Google does, and fail on demand.
 */
import { createHash, randomBytes } from "node:crypto";
import * as oauth from "oauth4webapi";
import { afterAll, beforeAll, beforeEach, describe, expect, it } from "vitest";
import { defaultBusinessData } from "../../dev/oauth-server/business-profile.ts";
import { type OAuthServer, startOAuthServer } from "../../dev/oauth-server/server.ts";

const REDIRECT = "http://127.0.0.1:8787/callback";
const BUSINESS = "https://www.googleapis.com/auth/business.manage";
const ACCOUNT = "user@example.com";

let srv: OAuthServer;

beforeAll(async () => {
  srv = await startOAuthServer({ profile: "google" });
});
afterAll(() => srv.close());

beforeEach(async () => {
  await admin("POST", "/admin/reset");
  expect(
    (await admin("POST", "/admin/clients", { client_id: "app", client_secret: "s3cret", redirect_uris: [REDIRECT] }))
      .status,
  ).toBe(201);
});

async function admin(method: string, path: string, body?: unknown) {
  const res = await fetch(srv.url + path, {
    method,
    headers: body === undefined ? {} : { "content-type": "application/json" },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await res.text();
  return { status: res.status, json: JSON.parse(text) as Record<string, unknown> };
}

interface Tokens {
  access_token: string;
  refresh_token?: string;
}

/** A Google consent by `account` for `scope`, exchanged: the token response. */
async function consent(scope = `openid email ${BUSINESS}`, account = ACCOUNT): Promise<Tokens> {
  await admin("PUT", "/admin/clients/app/behavior", { account });
  const verifier = oauth.generateRandomCodeVerifier();
  const params = new URLSearchParams({
    response_type: "code",
    client_id: "app",
    redirect_uri: REDIRECT,
    scope,
    code_challenge: await oauth.calculatePKCECodeChallenge(verifier),
    code_challenge_method: "S256",
    access_type: "offline",
    prompt: "consent",
  });
  const authorized = await fetch(`${srv.authorizationEndpoint}?${params}`, { redirect: "manual" });
  const code = new URL(authorized.headers.get("location") ?? "").searchParams.get("code") ?? "";
  const res = await fetch(srv.tokenEndpoint, {
    method: "POST",
    headers: {
      "content-type": "application/x-www-form-urlencoded",
      authorization: `Basic ${Buffer.from("app:s3cret").toString("base64")}`,
    },
    body: new URLSearchParams({
      grant_type: "authorization_code",
      code,
      redirect_uri: REDIRECT,
      code_verifier: verifier,
    }),
  });
  expect(res.status).toBe(200);
  return (await res.json()) as Tokens;
}

async function api(path: string, token: string | null, init: RequestInit = {}) {
  const headers = new Headers(init.headers);
  if (token !== null) headers.set("authorization", `Bearer ${token}`);
  const res = await fetch(srv.url + path, { ...init, headers });
  const text = await res.text();
  let json: Record<string, unknown> = {};
  try {
    json = JSON.parse(text);
  } catch {
    // not JSON: the test looks at the status
  }
  return { status: res.status, headers: res.headers, json };
}

type Account = { name: string; accountName: string; type: string };
type Location = Record<string, unknown> & { name: string };

/** The caller's location group id (digits after accounts/). */
async function groupId(token: string): Promise<string> {
  const { json } = await api("/v1/accounts", token);
  const group = (json.accounts as Account[]).find((a) => a.type === "LOCATION_GROUP");
  return group?.name.slice("accounts/".length) ?? "";
}

const googleError = (code: number, status: string) => ({
  error: expect.objectContaining({ code, status, message: expect.any(String) }),
});

describe("accounts.list and accounts.locations.list", () => {
  it("lists the account's personal account and location group, paged by pageSize (max 20)", async () => {
    const { access_token } = await consent();
    const all = await api("/v1/accounts", access_token);
    expect(all.status).toBe(200);
    const accounts = all.json.accounts as Account[];
    expect(accounts.map((a) => a.type)).toEqual(["PERSONAL", "LOCATION_GROUP"]);
    for (const a of accounts) expect(a.name).toMatch(/^accounts\/[1-9]\d{20}$/);
    expect(all.json).not.toHaveProperty("nextPageToken");
    // Deterministic: the same ids for the same Google account, whatever server.
    expect(accounts.map((a) => a.name)).toEqual(defaultBusinessData(ACCOUNT).accounts.map((a) => a.name));

    const first = await api("/v1/accounts?pageSize=1", access_token);
    expect(first.json.accounts).toEqual([accounts[0]]);
    expect(first.json.nextPageToken).toEqual(expect.any(String));
    const second = await api(`/v1/accounts?pageSize=1&pageToken=${first.json.nextPageToken}`, access_token);
    expect(second.json).toEqual({ accounts: [accounts[1]] });
    expect((await api("/v1/accounts?pageSize=500", access_token)).json.accounts).toHaveLength(2);
    expect((await api("/v1/accounts?pageSize=-1", access_token)).status).toBe(400);
    expect((await api("/v1/accounts?pageToken=garbage", access_token)).json).toEqual(
      googleError(400, "INVALID_ARGUMENT"),
    );

    // Another Google account has accounts of its own.
    const other = await consent(BUSINESS, "someone-else@example.com");
    const theirs = (await api("/v1/accounts", other.access_token)).json.accounts as Account[];
    expect(theirs.map((a) => a.name)).not.toContain(accounts[0]?.name);
  });

  it("requires readMask (400 INVALID_ARGUMENT in Google's shape) and returns only its fields plus name", async () => {
    const { access_token } = await consent();
    const group = await groupId(access_token);
    const missing = await api(`/v1/accounts/${group}/locations`, access_token);
    expect(missing.status).toBe(400);
    expect(missing.json).toEqual(googleError(400, "INVALID_ARGUMENT"));
    expect(JSON.stringify(missing.json)).toContain("read_mask");
    const unknown = await api(`/v1/accounts/${group}/locations?readMask=title,secretField`, access_token);
    expect(unknown.status).toBe(400);

    const masked = await api(`/v1/accounts/${group}/locations?readMask=title,storefrontAddress`, access_token);
    expect(masked.status).toBe(200);
    const locations = masked.json.locations as Location[];
    expect(locations).toHaveLength(10); // the default page size
    for (const l of locations) {
      expect(Object.keys(l).sort()).toEqual(["name", "storefrontAddress", "title"]);
      expect(l.name).toMatch(/^locations\/\d+$/);
    }
    const nested = await api(`/v1/accounts/${group}/locations?readMask=storefrontAddress.locality`, access_token);
    expect((nested.json.locations as Location[])[0]).toEqual({
      name: locations[0]?.name,
      storefrontAddress: { locality: "Springfield" },
    });
  });

  it("pages through the group's 25 locations (pageSize default 10, max 100) with totalSize", async () => {
    const { access_token } = await consent();
    const group = await groupId(access_token);
    const seen: string[] = [];
    const sizes: number[] = [];
    let token: string | undefined;
    do {
      const query = new URLSearchParams({ readMask: "name,title", ...(token ? { pageToken: token } : {}) });
      const page = await api(`/v1/accounts/${group}/locations?${query}`, access_token);
      expect(page.status).toBe(200);
      expect(page.json.totalSize).toBe(25);
      const locations = page.json.locations as Location[];
      sizes.push(locations.length);
      seen.push(...locations.map((l) => l.name));
      token = page.json.nextPageToken as string | undefined;
    } while (token);
    expect(sizes).toEqual([10, 10, 5]);
    expect(new Set(seen).size).toBe(25);

    const big = await api(`/v1/accounts/${group}/locations?readMask=title&pageSize=1000`, access_token);
    expect(big.json.locations).toHaveLength(25);
    expect(big.json).not.toHaveProperty("nextPageToken");
    // A page token of another collection (the accounts list) is refused.
    const accountsPage = await api("/v1/accounts?pageSize=1", access_token);
    const foreign = await api(
      `/v1/accounts/${group}/locations?readMask=title&pageToken=${accountsPage.json.nextPageToken}`,
      access_token,
    );
    expect(foreign.status).toBe(400);
  });

  it("refuses another Google account's business account (403) and lists the personal one's single location", async () => {
    const mine = await consent();
    const other = await consent(BUSINESS, "someone-else@example.com");
    const group = await groupId(mine.access_token);
    const denied = await api(`/v1/accounts/${group}/locations?readMask=title`, other.access_token);
    expect(denied.status).toBe(403);
    expect(denied.json).toEqual(googleError(403, "PERMISSION_DENIED"));
    const personal = ((await api("/v1/accounts", mine.access_token)).json.accounts as Account[])[0]?.name ?? "";
    const home = await api(`/v1/${personal}/locations?readMask=title`, mine.access_token);
    expect(home.json.locations).toHaveLength(1);
  });
});

describe("reviews", () => {
  async function firstLocation(token: string) {
    const group = await groupId(token);
    const page = await api(`/v1/accounts/${group}/locations?readMask=title`, token);
    const location = (page.json.locations as Location[])[0]?.name.slice("locations/".length) ?? "";
    return { group, location, base: `/v4/accounts/${group}/locations/${location}/reviews` };
  }

  it("lists a location's reviews with averageRating and totalReviewCount, paged (max 50)", async () => {
    const { access_token } = await consent();
    const { base } = await firstLocation(access_token);
    const all = await api(base, access_token);
    expect(all.status).toBe(200);
    const reviews = all.json.reviews as { starRating: string; name: string; reviewId: string }[];
    expect(reviews.length).toBeGreaterThanOrEqual(3);
    expect(all.json.totalReviewCount).toBe(reviews.length);
    const stars = { ONE: 1, TWO: 2, THREE: 3, FOUR: 4, FIVE: 5 } as Record<string, number>;
    const average = reviews.reduce((sum, r) => sum + (stars[r.starRating] ?? 0), 0) / reviews.length;
    expect(all.json.averageRating).toBeCloseTo(average, 1);
    for (const r of reviews) expect(r.name).toBe(`${base.slice("/v4/".length)}/${r.reviewId}`);

    const first = await api(`${base}?pageSize=2`, access_token);
    expect(first.json.reviews).toEqual(reviews.slice(0, 2));
    const rest = await api(`${base}?pageSize=2&pageToken=${first.json.nextPageToken}`, access_token);
    expect(rest.json.reviews).toEqual(reviews.slice(2, 4));
    expect((await api(`${base.replace(/locations\/\d+/, "locations/404")}`, access_token)).json).toEqual(
      googleError(404, "NOT_FOUND"),
    );
  });

  it("PUT .../reviews/{r}/reply stores the reply and echoes {comment, updateTime}; bad bodies are 400", async () => {
    const { access_token } = await consent();
    const { base } = await firstLocation(access_token);
    const reviews = (await api(base, access_token)).json.reviews as { reviewId: string }[];
    const target = reviews[1]?.reviewId ?? "";
    const put = (body: string, type = "application/json") =>
      api(`${base}/${target}/reply`, access_token, { method: "PUT", headers: { "content-type": type }, body });
    const replied = await put(JSON.stringify({ comment: "Thanks for coming!" }));
    expect(replied.status).toBe(200);
    expect(replied.json).toEqual({ comment: "Thanks for coming!", updateTime: expect.any(String) });
    expect(Math.abs(Date.parse(String(replied.json.updateTime)) - Date.now())).toBeLessThan(5_000);
    const after = (await api(base, access_token)).json.reviews as { reviewId: string; reviewReply?: unknown }[];
    expect(after.find((r) => r.reviewId === target)?.reviewReply).toEqual(replied.json);

    expect((await put("not json")).status).toBe(400);
    expect((await put(JSON.stringify({ comment: "" }))).json).toEqual(googleError(400, "INVALID_ARGUMENT"));
    expect((await put(JSON.stringify({ comment: "x".repeat(4097) }))).status).toBe(400);
    const unknown = await api(`${base}/no-such-review/reply`, access_token, {
      method: "PUT",
      body: JSON.stringify({ comment: "hi" }),
    });
    expect(unknown.status).toBe(404);
    expect((await api(base, access_token, { method: "POST", body: "{}" })).status).toBe(405);
  });
});

describe("bearer tokens", () => {
  it("401 UNAUTHENTICATED with WWW-Authenticate for a missing, unknown, expired or revoked token", async () => {
    const expect401 = async (token: string | null, headers: Record<string, string> = {}) => {
      const res = await api("/v1/accounts", token, { headers });
      expect(res.status).toBe(401);
      expect(res.headers.get("www-authenticate")).toBe('Bearer error="invalid_token"');
      expect(res.json).toEqual(googleError(401, "UNAUTHENTICATED"));
    };
    await expect401(null);
    await expect401(null, { authorization: "Basic YXBwOnMzY3JldA==" });
    await expect401("at_not-issued-here");

    const { access_token, refresh_token } = await consent();
    expect((await api("/v1/accounts", access_token)).status).toBe(200);
    // Expired: the server's clock moves past the access token's 3599 s.
    await admin("POST", "/admin/clock", { advanceSeconds: 3600 });
    await expect401(access_token);
    // A fresh one from the refresh token works until the grant is revoked (Google: by any of its tokens).
    const refreshed = await fetch(srv.tokenEndpoint, {
      method: "POST",
      headers: { "content-type": "application/x-www-form-urlencoded" },
      body: new URLSearchParams({
        grant_type: "refresh_token",
        refresh_token: refresh_token ?? "",
        client_id: "app",
        client_secret: "s3cret",
      }),
    });
    const fresh = ((await refreshed.json()) as Tokens).access_token;
    expect((await api("/v1/accounts", fresh)).status).toBe(200);
    expect((await fetch(`${srv.revocationEndpoint}?token=${refresh_token}`, { method: "POST" })).status).toBe(200);
    await expect401(fresh);
  });

  it("403 PERMISSION_DENIED for a live token without the business.manage scope", async () => {
    const { access_token } = await consent("openid email");
    const res = await api("/v1/accounts", access_token);
    expect(res.status).toBe(403);
    expect(res.json).toEqual(googleError(403, "PERMISSION_DENIED"));
    expect(res.headers.get("www-authenticate")).toContain('error="insufficient_scope"');
    // Unticked at the consent screen: the same.
    await admin("PUT", "/admin/clients/app/behavior", { untickedScopes: [BUSINESS] });
    const unticked = await consent();
    expect((await api("/v1/accounts", unticked.access_token)).status).toBe(403);
  });
});

describe("fault toggles and request stats", () => {
  it("failNext answers 401 once, or 429 with Retry-After twice, before anything else; null clears one without count", async () => {
    const { access_token } = await consent();
    expect((await admin("PUT", "/admin/api-behavior", { failNext: { status: 401, count: 1 } })).status).toBe(200);
    const once = await api("/v1/accounts", access_token);
    expect(once.status).toBe(401);
    expect(once.headers.get("www-authenticate")).toBe('Bearer error="invalid_token"');
    expect((await api("/v1/accounts", access_token)).status).toBe(200);

    await admin("PUT", "/admin/api-behavior", { failNext: { status: 429, retryAfter: 30, count: 2 } });
    for (let i = 0; i < 2; i++) {
      const limited = await api("/v1/accounts", access_token);
      expect(limited.status).toBe(429);
      expect(limited.headers.get("retry-after")).toBe("30");
      expect(limited.json).toEqual(googleError(429, "RESOURCE_EXHAUSTED"));
    }
    expect((await api("/v1/accounts", access_token)).status).toBe(200);

    await admin("PUT", "/admin/api-behavior", { failNext: { status: 503 } });
    expect((await api("/v1/accounts", access_token)).status).toBe(503);
    expect((await api("/v1/accounts", access_token)).json).toEqual(googleError(503, "UNAVAILABLE"));
    expect((await admin("GET", "/admin/api-behavior")).json).toEqual({ failNext: { status: 503 } });
    await admin("PUT", "/admin/api-behavior", { failNext: null });
    expect((await api("/v1/accounts", access_token)).status).toBe(200);
    // The token endpoint is not affected by the API's toggles.
    await admin("PUT", "/admin/api-behavior", { failNext: { status: 500 } });
    await consent();

    for (const bad of [
      { failNext: { status: 200 } },
      { failNext: { status: 429, retryAfter: -1 } },
      { failNext: { status: 429, count: 0 } },
      { failNext: "429" },
      { other: 1 },
    ]) {
      expect((await admin("PUT", "/admin/api-behavior", bad)).status).toBe(400);
    }
  });

  it("api-stats counts requests per path and names the headers received, never the token", async () => {
    const { access_token } = await consent();
    const group = await groupId(access_token);
    await api(`/v1/accounts/${group}/locations?readMask=title`, access_token, {
      headers: { cookie: "session=abc", "x-request-id": "r-1" },
    });
    await api("/v1/accounts", null);
    const stats = (await admin("GET", "/admin/api-stats")).json;
    expect(stats).toMatchObject({
      requests: 3,
      byPath: { "/v1/accounts": 2, [`/v1/accounts/${group}/locations`]: 1 },
      lastAuthorization: null,
      lastMethod: "GET",
      lastPath: "/v1/accounts",
    });
    expect(JSON.stringify(stats)).not.toContain(access_token);

    await api(`/v1/accounts/${group}/locations?readMask=title`, access_token, {
      headers: { cookie: "session=abc", "x-request-id": "r-1" },
    });
    const after = (await admin("GET", "/admin/api-stats")).json;
    expect(after.lastAuthorization).toBe("Bearer …");
    expect(after.lastHeaders).toEqual(expect.arrayContaining(["authorization", "cookie", "x-request-id", "host"]));
    expect(after.lastPath).toBe(`/v1/accounts/${group}/locations?readMask=title`);
    expect(JSON.stringify(after)).not.toContain(access_token);
    expect(JSON.stringify(after)).not.toContain("session=abc");

    expect((await admin("DELETE", "/admin/api-stats")).json).toMatchObject({ requests: 0, byPath: {} });
    await api("/v1/accounts", access_token);
    await admin("POST", "/admin/reset");
    expect((await admin("GET", "/admin/api-stats")).json.requests).toBe(0);
  });
});

describe("test data", () => {
  it("POST /admin/business-profile replaces one Google account's accounts, locations and reviews", async () => {
    const mine = await consent();
    const other = await consent(BUSINESS, "someone-else@example.com");
    const othersBefore = (await api("/v1/accounts", other.access_token)).json;
    const created = await admin("POST", "/admin/business-profile", {
      account: ACCOUNT,
      accounts: [{ name: "accounts/42", accountName: "Chain HQ", type: "ORGANIZATION" }],
      locations: {
        "42": [
          { name: "locations/1", title: "North", storeCode: "N" },
          { name: "locations/2", title: "South" },
        ],
      },
      reviews: { "1": [{ reviewId: "rv1", starRating: "FOUR", comment: "Good" }] },
    });
    expect(created).toEqual({ status: 201, json: { account: ACCOUNT, accounts: 1, locations: 2 } });
    expect((await api("/v1/accounts", mine.access_token)).json).toEqual({
      accounts: [{ name: "accounts/42", accountName: "Chain HQ", type: "ORGANIZATION" }],
    });
    expect((await api("/v1/accounts/42/locations?readMask=title,storeCode", mine.access_token)).json).toEqual({
      locations: [
        { name: "locations/1", title: "North", storeCode: "N" },
        { name: "locations/2", title: "South" },
      ],
      totalSize: 2,
    });
    expect((await api("/v4/accounts/42/locations/1/reviews", mine.access_token)).json).toEqual({
      reviews: [{ name: "accounts/42/locations/1/reviews/rv1", reviewId: "rv1", starRating: "FOUR", comment: "Good" }],
      averageRating: 4,
      totalReviewCount: 1,
    });
    // No reviews: Google leaves the empty fields out.
    expect((await api("/v4/accounts/42/locations/2/reviews", mine.access_token)).json).toEqual({});
    // Another Google account keeps its own data.
    expect((await api("/v1/accounts", other.access_token)).json).toEqual(othersBefore);

    for (const bad of [
      {},
      { account: "" },
      { account: ACCOUNT, accounts: [{ name: "42", accountName: "x", type: "ORGANIZATION" }] },
      { account: ACCOUNT, accounts: [{ name: "accounts/1", accountName: "x", type: "SHOP" }] },
      { account: ACCOUNT, locations: { "999": [{ name: "locations/1", title: "x" }] } },
      {
        account: ACCOUNT,
        locations: {
          "42": [
            { name: "locations/1", title: "a" },
            { name: "locations/1", title: "b" },
          ],
        },
      },
      { account: ACCOUNT, locations: { "42": [{ name: "locations/1" }] } },
      { account: ACCOUNT, reviews: { "5": [] } },
    ]) {
      expect((await admin("POST", "/admin/business-profile", bad)).status, JSON.stringify(bad)).toBe(400);
    }
    const named = await admin("POST", "/admin/business-profile", {
      account: ACCOUNT,
      accounts: [{ name: "accounts/1", accountName: "x", type: "SHOP" }],
    });
    expect(named.json.error_description).toContain("accounts[0].type");
    const notJson = await fetch(`${srv.url}/admin/business-profile`, { method: "POST", body: "nope" });
    expect(notJson.status).toBe(400);
    // A failed replacement stored nothing.
    expect(((await api("/v1/accounts", mine.access_token)).json.accounts as Account[])[0]?.name).toBe("accounts/42");
  });
});

describe("echo (large bodies both ways)", () => {
  it("POST /v1/echo streams the body and answers its byte count and sha256; over 10 MiB is 413", async () => {
    const { access_token } = await consent();
    const body = randomBytes(3 * 1024 * 1024 + 7);
    const sized = await api("/v1/echo", access_token, {
      method: "POST",
      headers: { "content-type": "application/octet-stream" },
      body,
    });
    expect(sized.json).toEqual({
      bytes: body.length,
      sha256: createHash("sha256").update(body).digest("hex"),
      contentType: "application/octet-stream",
      contentLength: body.length,
      chunked: false,
    });
    // A streamed (chunked) request body.
    const parts = [randomBytes(100_000), randomBytes(200_000)];
    const stream = new ReadableStream<Uint8Array>({
      start(controller) {
        for (const p of parts) controller.enqueue(p);
        controller.close();
      },
    });
    const chunked = await api("/v1/echo", access_token, {
      method: "POST",
      body: stream,
      duplex: "half",
    } as RequestInit);
    expect(chunked.json).toMatchObject({
      bytes: 300_000,
      sha256: createHash("sha256").update(Buffer.concat(parts)).digest("hex"),
      contentLength: null,
      chunked: true,
    });
    const tooBig = await api("/v1/echo", access_token, { method: "POST", body: Buffer.alloc(10 * 1024 * 1024 + 1) });
    expect(tooBig.status).toBe(413);
    expect((await api("/v1/echo", null, { method: "POST", body: "x" })).status).toBe(401);
  });

  it("GET /v1/echo?bytes=N streams N bytes (byte i = i mod 256), chunked", async () => {
    const { access_token } = await consent();
    const n = 5 * 1024 * 1024 + 3;
    const res = await fetch(`${srv.url}/v1/echo?bytes=${n}`, { headers: { authorization: `Bearer ${access_token}` } });
    expect(res.status).toBe(200);
    expect(res.headers.get("transfer-encoding")).toBe("chunked");
    expect(res.headers.get("content-length")).toBeNull();
    const bytes = new Uint8Array(await res.arrayBuffer());
    expect(bytes.length).toBe(n);
    expect([bytes[0], bytes[255], bytes[256], bytes[n - 1]]).toEqual([0, 255, 0, (n - 1) % 256]);
    expect((await api("/v1/echo?bytes=0", access_token)).status).toBe(200);
    for (const bad of ["-1", "abc", String(65 * 1024 * 1024)]) {
      expect((await api(`/v1/echo?bytes=${bad}`, access_token)).status).toBe(400);
    }
  });
});
