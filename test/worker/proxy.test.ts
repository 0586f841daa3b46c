import { afterEach, describe, expect, it, vi } from "vitest";
import { call, expectProblem, json, recordingDataset, testEnv, uniqueId } from "./helpers";
import { appRowOf, connectBranch, currentTokens, registerBranch, sql } from "./oauth-helpers";
import { generatedBytes, proxy, sha256Hex, Upstream } from "./proxy-helpers";

/**
 * The proxy's forwarding rules against the upstream stand-in (test/worker/upstream.ts): what goes
 * up, what comes back, which upstreams it may call, streaming, and each refusal's status.
 */

afterEach(() => vi.restoreAllMocks());

/** The JSON the stand-in answers by default: the request as it arrived (without its Authorization). */
interface Echo {
  method: string;
  url: string;
  headers: Record<string, string | undefined>;
  bodyBytes: number;
  bodySha256: string;
}

function proxyLines(spy: { mock: { calls: unknown[][] } }): Record<string, unknown>[] {
  return spy.mock.calls
    .map((args) => String(args[0]))
    .filter((line) => line.includes('"proxy_call"'))
    .map((line) => JSON.parse(line) as Record<string, unknown>);
}

/** A view of the database under its own user name: the Worker's SQL round trips through it are counted. */
function countedDatabase() {
  const user = uniqueId("proxy").replace(/-/g, "_");
  const url = new URL(testEnv.TOKEN_MANAGEMENT_DATABASE_URL as string);
  url.username = user;
  return {
    TOKEN_MANAGEMENT_DATABASE_URL: url.toString(),
    async requests(): Promise<number> {
      const response = await fetch(`${testEnv.NEON_LOCAL_URL}/stats?user=${user}`);
      return ((await response.json()) as { requests: number }).requests;
    },
  };
}

describe("forwarding", () => {
  it("sends method, path, query, body and end-to-end headers with the branch's token, and returns the upstream's answer", async () => {
    const branch = await connectBranch();
    const { accessToken } = await currentTokens(branch.clientId);
    const upstream = new Upstream();
    await upstream.script({
      responses: [
        {
          status: 201,
          headers: {
            "content-type": "application/json",
            "x-goog-request-id": "r-1",
            etag: '"v2"',
            connection: "x-upstream-hop",
            "x-upstream-hop": "hop value",
            "keep-alive": "timeout=5",
            "set-cookie": "upstream=1; Path=/",
          },
          body: '{"name":"accounts/1/locations/2/reviews/3/reply"}',
        },
      ],
    });
    const log = vi.spyOn(console, "log");
    const body = '{"comment":"Thank you!"}';

    const response = await proxy(
      upstream,
      branch.branchId,
      "v4/accounts/1/locations/2/reviews/3/reply?updateMask=comment&x=a%20b",
      {
        method: "PUT",
        headers: {
          "content-type": "application/json",
          "x-goog-user-project": "project-1",
          "if-match": '"v1"',
          "accept-language": "de",
          cookie: "session=caller-cookie",
          "x-api-key": "not-forwarded-key-0000",
          connection: "x-caller-hop",
          "x-caller-hop": "secret hop",
          "proxy-authorization": "Basic cHJveHk6cHJveHk=",
          te: "trailers",
          "cf-connecting-ip": "203.0.113.9",
        },
        body,
      },
    );

    expect(response.status).toBe(201);
    expect(await response.text()).toBe('{"name":"accounts/1/locations/2/reviews/3/reply"}');
    expect(response.headers.get("x-goog-request-id")).toBe("r-1");
    expect(response.headers.get("etag")).toBe('"v2"');
    expect(response.headers.get("content-type")).toBe("application/json");
    for (const dropped of ["set-cookie", "x-upstream-hop", "keep-alive", "connection"]) {
      expect(response.headers.get(dropped), dropped).toBeNull();
    }
    for (const [, value] of response.headers) expect(value).not.toContain(accessToken);

    const [sent] = await upstream.requests();
    expect(sent?.method).toBe("PUT");
    expect(sent?.url).toBe(`/${upstream.name}/v4/accounts/1/locations/2/reviews/3/reply?updateMask=comment&x=a%20b`);
    expect(sent?.bodySha256).toBe(await sha256Hex(new TextEncoder().encode(body)));
    expect(sent?.headers).toMatchObject({
      authorization: `Bearer ${accessToken}`,
      "content-type": "application/json",
      "x-goog-user-project": "project-1",
      "if-match": '"v1"',
      "accept-language": "de",
    });
    for (const dropped of [
      "cookie",
      "x-api-key",
      "x-caller-hop",
      "proxy-authorization",
      "proxy-base-url",
      "cf-connecting-ip",
    ]) {
      expect(sent?.headers[dropped], dropped).toBeUndefined();
    }
    expect(sent?.headers.te).toBeUndefined();

    const lines = proxyLines(log);
    expect(lines).toHaveLength(1);
    expect(lines[0]).toMatchObject({
      event: "proxy_call",
      branch: branch.branchId,
      app: `app:${(await appRowOf(branch.clientId))?.id}`,
      upstream_host: new URL(upstream.base).host,
      method: "PUT",
      status: 201,
      refreshed: false,
      retried: false,
    });
    expect(typeof lines[0]?.ms).toBe("number");
    for (const args of log.mock.calls) expect(String(args[0])).not.toContain(accessToken);
  });

  it("lists a branch's accounts and a location's reviews at the local authorization server's Business Profile API", async () => {
    const branch = await connectBranch();
    const api = { PROXY_BASE_URLS: testEnv.OAUTH_SERVER_URL };
    const accounts = await proxy(new Upstream(), branch.branchId, "v1/accounts", { envOverrides: api });
    expect(accounts.status).toBe(200);
    const listed = await json<{ accounts: { name: string }[] }>(accounts);
    expect(listed.accounts.length).toBeGreaterThan(0);
    const account = listed.accounts[0]!.name;
    const locations = await proxy(new Upstream(), branch.branchId, `v1/${account}/locations?readMask=name,title`, {
      envOverrides: api,
    });
    expect(locations.status).toBe(200);
    const location = (await json<{ locations: { name: string }[] }>(locations)).locations[0]!.name;
    const reviews = await proxy(new Upstream(), branch.branchId, `v4/${account}/${location}/reviews?pageSize=5`, {
      envOverrides: api,
    });
    expect(reviews.status).toBe(200);
    expect(Array.isArray((await json<{ reviews?: unknown[] }>(reviews)).reviews ?? [])).toBe(true);
  });

  it("takes the token from the edge cache: a warm call sends no SQL", async () => {
    const branch = await connectBranch();
    const upstream = new Upstream();
    const db = countedDatabase();
    const first = await proxy(upstream, branch.branchId, "v1/accounts", { overrides: db });
    expect(first.status).toBe(200);
    await first.arrayBuffer();
    const before = await db.requests();
    for (let i = 0; i < 3; i++) {
      const warm = await proxy(upstream, branch.branchId, "v1/accounts", { overrides: db });
      expect(warm.status).toBe(200);
      await warm.arrayBuffer();
    }
    expect(await db.requests()).toBe(before);
    expect(await upstream.requests()).toHaveLength(4);
  });

  it("forwards HEAD and DELETE as themselves, without a body", async () => {
    const branch = await connectBranch();
    const upstream = new Upstream();
    await upstream.script({ responses: [{ status: 200, headers: { "x-total": "3" } }, { status: 204 }] });
    const head = await proxy(upstream, branch.branchId, "v1/accounts", { method: "HEAD" });
    expect(head.status).toBe(200);
    expect(head.headers.get("x-total")).toBe("3");
    expect(await head.text()).toBe("");
    const gone = await proxy(upstream, branch.branchId, "v4/accounts/1/locations/2/reviews/3/reply", {
      method: "DELETE",
    });
    expect(gone.status).toBe(204);
    expect((await upstream.requests()).map((r) => [r.method, r.bodyBytes])).toEqual([
      ["HEAD", 0],
      ["DELETE", 0],
    ]);
  });

  it("returns a redirect as it is, without following it", async () => {
    const branch = await connectBranch();
    const upstream = new Upstream();
    const elsewhere = new Upstream();
    await upstream.script({ responses: [{ status: 302, headers: { location: `${elsewhere.base}/moved` } }] });
    const response = await proxy(upstream, branch.branchId, "v1/accounts");
    expect(response.status).toBe(302);
    expect(response.headers.get("location")).toBe(`${elsewhere.base}/moved`);
    expect(await elsewhere.requests()).toHaveLength(0);
  });

  it("passes the upstream's own errors through unchanged (status, headers, body)", async () => {
    const branch = await connectBranch();
    const upstream = new Upstream();
    const error = '{"error":{"code":404,"message":"Requested entity was not found.","status":"NOT_FOUND"}}';
    await upstream.script({
      responses: [{ status: 404, headers: { "content-type": "application/json" }, body: error }],
    });
    const response = await proxy(upstream, branch.branchId, "v1/locations/404");
    expect(response.status).toBe(404);
    expect(response.headers.get("content-type")).toBe("application/json");
    expect(await response.text()).toBe(error);
  });

  it("needs a service or admin key, and forwards neither", async () => {
    const branch = await connectBranch();
    const upstream = new Upstream();
    await expectProblem(await proxy(upstream, branch.branchId, "v1/accounts", { key: null }), 401, "unauthorized");
    await expectProblem(
      await proxy(upstream, branch.branchId, "v1/accounts", { key: "not-a-real-key-at-all-000" }),
      401,
      "unauthorized",
    );
    expect(await upstream.requests()).toHaveLength(0);
    const admin = await proxy(upstream, branch.branchId, "v1/accounts", { key: "admin" });
    expect(admin.status).toBe(200);
    const echo = await json<Echo>(admin);
    expect(JSON.stringify(echo)).not.toContain("test-admin-key");
    const [sent] = await upstream.requests();
    expect(String(sent?.headers.authorization)).not.toContain("test-admin-key");
  });
});

describe("allowed upstreams", () => {
  it("each app has its own allowlist: an oauth2 app's api_base_urls, not PROXY_BASE_URLS", async () => {
    const upstream = new Upstream();
    await upstream.script({ responses: [{ status: 200 }] });
    const oauthClientId = uniqueId("oc-proxy");
    const secret = uniqueId("secret");
    const created = await call("/apps", {
      key: "admin",
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({
        name: "Other API",
        profile: "oauth2",
        client_id: oauthClientId,
        client_secret: secret,
        settings: {
          discovery_url: `${testEnv.OAUTH_SERVER_URL}/.well-known/oauth-authorization-server`,
          scopes: "https://www.googleapis.com/auth/business.manage",
          extra_authorization_params: "access_type=offline",
          api_base_urls: [upstream.base],
        },
      }),
    });
    expect(created.status, await created.clone().text()).toBe(201);
    const branch = await connectBranch({ oauthClientId, clientSecret: secret });
    const other = new Upstream();
    // PROXY_BASE_URLS names another upstream: the app's own allowlist is used.
    const response = await proxy(other, branch.branchId, "v1/accounts");
    expect(response.status, await response.clone().text()).toBe(200);
    expect(await upstream.requests()).toHaveLength(1);
    expect(await other.requests()).toHaveLength(0);
    // PROXY_BASE_URLS is not this app's: naming it is a 400, nothing sent.
    const refused = await proxy(other, branch.branchId, "v1/accounts", { headers: { "Proxy-Base-Url": other.base } });
    await expectProblem(refused, 400, "bad_request");
    expect(await other.requests()).toHaveLength(0);
  });

  it("uses the first allowed base, or the one Proxy-Base-Url names", async () => {
    const branch = await connectBranch();
    const first = new Upstream();
    const second = new Upstream();
    const bases = `${first.base} ${second.base}/`;
    const plain = await proxy(first, branch.branchId, "v1/accounts", { envOverrides: { PROXY_BASE_URLS: bases } });
    expect(plain.status).toBe(200);
    for (const named of [second.base, `${second.base}/`]) {
      const chosen = await proxy(first, branch.branchId, "v1/accounts", {
        envOverrides: { PROXY_BASE_URLS: bases },
        headers: { "proxy-base-url": named },
      });
      expect(chosen.status).toBe(200);
    }
    expect(await first.requests()).toHaveLength(1);
    const toSecond = await second.requests();
    expect(toSecond).toHaveLength(2);
    expect(toSecond[0]?.url).toBe(`/${second.name}/v1/accounts`);
    expect(toSecond[0]?.headers["proxy-base-url"]).toBeUndefined();
  });

  it("refuses any other base with a 400 and sends nothing", async () => {
    const branch = await connectBranch();
    const upstream = new Upstream();
    const base = new URL(upstream.base);
    const port = Number(base.port);
    const refused = [
      `http://${base.host}.evil.example${base.pathname}`,
      `http://evil.example/${base.host}${base.pathname}`,
      `http://user:pass@${base.host}${base.pathname}`,
      `http://${base.host}@evil.example${base.pathname}`,
      `http://127.0.0.1:${port + 1}${base.pathname}`,
      `https://${base.host}${base.pathname}`,
      `http://localhost:${port}${base.pathname}`,
      `${upstream.base}-other`,
      `${upstream.base}/v1`,
      `${upstream.base}?x=1`,
      `${upstream.base}#frag`,
      `http://${base.host}`,
      "not a url",
      "",
    ];
    for (const value of refused) {
      const response = await proxy(upstream, branch.branchId, "v1/accounts", { headers: { "proxy-base-url": value } });
      const problem = await expectProblem(response, 400, "bad_request");
      expect((problem as Record<string, unknown>).allowed_base_urls, value).toEqual([upstream.base]);
    }
    expect(await upstream.requests()).toHaveLength(0);
  });

  it("refuses encoded slashes, backslashes, dots and dot segments in the path with a 400 and sends nothing", async () => {
    const branch = await connectBranch();
    const upstream = new Upstream();
    const paths = [
      "v1/..%2F..%2Fadmin",
      "v1/%2e%2e%2fadmin",
      "v1%2Faccounts",
      "v1/accounts%5C..%5Cadmin",
      "v1/%252e%252e/admin",
      "v1/accounts/%2E%2Ejson",
      "v1/a%00b",
    ];
    for (const path of paths) {
      await expectProblem(await proxy(upstream, branch.branchId, path), 400, "bad_request");
    }
    expect(await upstream.requests()).toHaveLength(0);
  });

  it("refuses a plain-http base at start-up unless OAUTH_ALLOW_INSECURE_HTTP, and bases with user info or a query", async () => {
    const branch = await connectBranch();
    const upstream = new Upstream();
    for (const [bases, insecure] of [
      [upstream.base, "false"],
      ["https://user@mybusiness.googleapis.com", "true"],
      ["https://mybusiness.googleapis.com/?key=1", "true"],
      ["mybusiness.googleapis.com", "true"],
    ] as const) {
      const response = await proxy(upstream, branch.branchId, "v1/accounts", {
        key: "admin",
        envOverrides: {
          PROXY_BASE_URLS: bases,
          OAUTH_ALLOW_INSECURE_HTTP: insecure,
          // The https checks of the other provider URLs must pass on their own.
          ...(insecure === "false" ? httpsProviderUrls() : {}),
        },
      });
      const problem = await expectProblem(response, 500, "configuration_error");
      expect(problem.detail).toContain("PROXY_BASE_URLS");
    }
    expect(await upstream.requests()).toHaveLength(0);
  });
});

/** The provider URLs as https (nothing is called): so only PROXY_BASE_URLS can fail the https check. */
function httpsProviderUrls() {
  return {
    OAUTH_ISSUER: "https://accounts.google.com",
    OAUTH_AUTHORIZATION_URL: "https://accounts.google.com/o/oauth2/v2/auth",
    OAUTH_TOKEN_URL: "https://oauth2.googleapis.com/token",
    OAUTH_REVOCATION_URL: "https://oauth2.googleapis.com/revoke",
    RISC_CONFIGURATION_URL: "https://accounts.google.com/.well-known/risc-configuration",
  };
}

describe("streaming", () => {
  it("streams a large body up and a large body down, byte for byte", async () => {
    const branch = await connectBranch();
    const upstream = new Upstream();
    const size = 8 * 1024 * 1024;
    await upstream.script({
      responses: [{ status: 200, headers: { "content-type": "application/octet-stream" }, bodyBytes: size }],
    });
    const upload = generatedBytes(size, 7);
    const response = await proxy(upstream, branch.branchId, "upload/v1/media", {
      method: "POST",
      headers: { "content-type": "application/octet-stream", "content-length": String(size) },
      body: upload,
    });
    expect(response.status).toBe(200);
    const downloaded = new Uint8Array(await response.arrayBuffer());
    expect(downloaded.byteLength).toBe(size);
    expect(await sha256Hex(downloaded)).toBe(await sha256Hex(generatedBytes(size)));
    const [sent] = await upstream.requests();
    expect(sent?.bodyBytes).toBe(size);
    expect(sent?.bodySha256).toBe(await sha256Hex(upload));
  });

  it("starts sending the request body upstream before the caller finished it", async () => {
    const branch = await connectBranch();
    const upstream = new Upstream();
    const { readable, writable } = new TransformStream<Uint8Array, Uint8Array>();
    const writer = writable.getWriter();
    const first = generatedBytes(256 * 1024);
    void writer.write(first);
    const pending = proxy(upstream, branch.branchId, "upload/v1/media", {
      method: "POST",
      headers: { "content-type": "application/octet-stream" },
      body: readable,
    });
    // The first part reaches the upstream while the caller still holds the rest.
    await vi.waitFor(
      async () => {
        expect((await upstream.received()).bytesReceived).toBeGreaterThan(0);
      },
      { timeout: 10_000, interval: 50 },
    );
    const rest = generatedBytes(256 * 1024, 1);
    await writer.write(rest);
    await writer.close();
    const response = await pending;
    expect(response.status).toBe(200);
    expect((await json<Echo>(response)).bodyBytes).toBe(512 * 1024);
  });

  it("returns the response's first bytes before the upstream sent the rest", async () => {
    const branch = await connectBranch();
    const upstream = new Upstream();
    const size = 1024 * 1024;
    await upstream.script({ responses: [{ status: 200, bodyBytes: size, hold: true }] });
    const response = await proxy(upstream, branch.branchId, "v1/accounts");
    expect(response.status).toBe(200);
    const reader = response.body!.getReader();
    const firstChunk = await reader.read();
    expect(firstChunk.done).toBe(false);
    expect(firstChunk.value!.byteLength).toBeGreaterThan(0);
    await upstream.release();
    let total = firstChunk.value!.byteLength;
    for (let chunk = await reader.read(); !chunk.done; chunk = await reader.read()) total += chunk.value.byteLength;
    expect(total).toBe(size);
  });
});

describe("refusals", () => {
  it("unknown branch: 404; branch never connected: 409; nothing sent", async () => {
    const upstream = new Upstream();
    await expectProblem(await proxy(upstream, uniqueId("no-such-branch"), "v1/accounts"), 404, "not_found");
    const registered = await registerBranch();
    const problem = await expectProblem(
      await proxy(upstream, registered.branchId, "v1/accounts"),
      409,
      "not_connected",
    );
    expect((problem as Record<string, unknown>).login_hint).toBe(
      `/token-management/clients/${registered.clientId}/login-url`,
    );
    expect(await upstream.requests()).toHaveLength(0);
  });

  it("branch needing a new consent: 409 reauthorization_required", async () => {
    const branch = await connectBranch();
    const upstream = new Upstream();
    await sql("update tokens set status = 'needs_reauth', is_valid = false where client_id = $1", [branch.clientId]);
    await expectProblem(
      await proxy(upstream, branch.branchId, "v1/accounts", { envOverrides: { TOKEN_CACHE_MAX_AGE_SECONDS: "0" } }),
      409,
      "reauthorization_required",
    );
    expect(await upstream.requests()).toHaveLength(0);
  });

  it("a body over PROXY_MAX_BODY_BYTES: 413, declared or streamed", async () => {
    const branch = await connectBranch();
    const upstream = new Upstream();
    const limit = { PROXY_MAX_BODY_BYTES: "100000" };
    const declared = await proxy(upstream, branch.branchId, "upload/v1/media", {
      method: "POST",
      envOverrides: limit,
      headers: { "content-length": "100001" },
      body: generatedBytes(100_001),
    });
    await expectProblem(declared, 413, "payload_too_large");
    expect(await upstream.requests()).toHaveLength(0);

    const streamed = await proxy(upstream, branch.branchId, "upload/v1/media", {
      method: "POST",
      envOverrides: limit,
      body: new Blob([generatedBytes(300_000)]).stream(),
    });
    await expectProblem(streamed, 413, "payload_too_large");
    // The upstream saw a broken upload, never a complete shorter one.
    expect(await upstream.requests()).toHaveLength(0);
    // Exactly at the limit is fine.
    const atLimit = await proxy(upstream, branch.branchId, "upload/v1/media", {
      method: "POST",
      envOverrides: limit,
      headers: { "content-length": "100000" },
      body: generatedBytes(100_000),
    });
    expect(atLimit.status).toBe(200);
    expect((await json<Echo>(atLimit)).bodyBytes).toBe(100_000);
  });

  it("an upstream slower than PROXY_TIMEOUT_MS: 504; unreachable: 502", async () => {
    const branch = await connectBranch();
    const upstream = new Upstream();
    await upstream.script({ responses: [{ status: 200, delayMs: 3_000 }] });
    const started = Date.now();
    const slow = await proxy(upstream, branch.branchId, "v1/accounts", { envOverrides: { PROXY_TIMEOUT_MS: "300" } });
    await expectProblem(slow, 504, "upstream_timeout");
    expect(Date.now() - started).toBeLessThan(2_500);

    // Nothing listens on the discard port.
    const unreachable = await proxy(upstream, branch.branchId, "v1/accounts", {
      envOverrides: { PROXY_BASE_URLS: "http://127.0.0.1:9" },
    });
    await expectProblem(unreachable, 502, "upstream_unreachable");
  });

  it("logs one line for a refused call too, with its status and code", async () => {
    const upstream = new Upstream();
    const log = vi.spyOn(console, "log");
    const branchId = uniqueId("no-such-branch");
    await expectProblem(await proxy(upstream, branchId, "v1/accounts"), 404);
    const lines = proxyLines(log);
    expect(lines).toHaveLength(1);
    expect(lines[0]).toMatchObject({
      branch: branchId,
      status: 404,
      code: "not_found",
      refreshed: false,
      retried: false,
    });
  });
});

describe("metrics", () => {
  it("writes one proxy data point per call when METRICS is bound", async () => {
    const branch = await connectBranch();
    const upstream = new Upstream();
    await upstream.script({ responses: [{ status: 200 }, { status: 503 }] });
    const { points, dataset } = recordingDataset();
    for (const expected of [200, 503]) {
      const response = await proxy(upstream, branch.branchId, "v1/accounts", { overrides: { METRICS: dataset } });
      expect(response.status).toBe(expected);
      await response.arrayBuffer();
    }
    const app = `app:${(await appRowOf(branch.clientId))?.id}`;
    expect(points.map((p) => p.blobs)).toEqual([
      ["proxy", "ok", "", app, "request"],
      ["proxy", "failed", "server_error", app, "request"],
    ]);
    expect(points.map((p) => p.doubles?.[1])).toEqual([1, 1]);
  });
});

describe("documentation", () => {
  it("describes the proxy route in the OpenAPI document", async () => {
    const doc = await json<{ paths: Record<string, Record<string, unknown>> }>(await call("/openapi.json"));
    const route = doc.paths["/token-management/proxy/{branch_id}/{path}"];
    expect(Object.keys(route ?? {}).sort()).toEqual(["delete", "get", "patch", "post", "put"]);
  });
});
