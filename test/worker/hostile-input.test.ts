import fc from "fast-check";
import { beforeAll, describe, expect, it } from "vitest";
import { TEST_ADMIN_KEY, TEST_ENCRYPTION_KEY, TEST_SERVICE_KEY } from "./bindings";
import { BASE, call, testEnv } from "./helpers";
import { newClientBody, postJson } from "./oauth-helpers";

/**
 * Property-based hostile input over every route: generated bodies, path segments, query strings,
 * methods and sizes. Whatever comes in, the Worker never answers 5xx; every 4xx is problem+json
 * (or, for the two browser endpoints without `Accept: application/json`, an HTML page) with a
 * useful message, no stack trace and no secret; bodies over 64 KiB get 413.
 */

const RUNS = 60;
const MAX_BODY_BYTES = 64 * 1024;
const SECRETS = [
  TEST_ADMIN_KEY,
  TEST_SERVICE_KEY,
  "test-admin-key-0000000000000002",
  TEST_ENCRYPTION_KEY,
  testEnv.TOKEN_MANAGEMENT_DATABASE_URL as string,
];
/** A V8 stack frame, or an error class name followed by its message, as printed by `String(error)`. */
const STACK_FRAME = /^\s*at .+(:\d+:\d+\)?|\(native\)|<anonymous>)\s*$/m;
const ERROR_PREFIX = /\b(TypeError|RangeError|SyntaxError|ReferenceError|NeonDbError|DrizzleQueryError|Error):/;

type Key = "admin" | "service" | "garbage" | null;
const KEYS: Record<Exclude<Key, null>, string> = {
  admin: TEST_ADMIN_KEY,
  service: TEST_SERVICE_KEY,
  garbage: "not-a-key-but-long-enough-00000",
};

interface Sent {
  method: string;
  path: string;
  key?: Key;
  headers?: Record<string, string>;
  body?: string | ReadableStream<Uint8Array>;
  /** The two browser endpoints answer HTML unless the caller accepts only JSON. */
  browser?: boolean;
}

interface Outcome {
  status: number;
  contentType: string;
  text: string;
}

/** Sends one request and checks the properties every answer must have. Returns it for more checks. */
async function send(request: Sent): Promise<Outcome> {
  const headers = new Headers(request.headers);
  if (request.key) headers.set("Authorization", `Bearer ${KEYS[request.key]}`);
  const url = `${BASE}${request.path}`;
  const response = await call(url, {
    method: request.method,
    headers,
    ...(request.body === undefined ? {} : { body: request.body }),
    // A stream body needs half-duplex; harmless for strings.
    ...({ duplex: "half" } as object),
  });
  const outcome: Outcome = {
    status: response.status,
    contentType: response.headers.get("content-type") ?? "",
    text: await response.text(),
  };
  const where = `${request.method} ${url.slice(0, 300)} -> ${outcome.status} ${outcome.contentType} ${outcome.text.slice(0, 500)}`;
  expect(outcome.status, where).toBeLessThan(500);
  for (const secret of SECRETS) expect(outcome.text.includes(secret), `secret leaked: ${where}`).toBe(false);
  expect(STACK_FRAME.test(outcome.text), `stack frame: ${where}`).toBe(false);
  if (outcome.status < 400 || request.method === "HEAD") return outcome;

  const accept = headers.get("accept") ?? "";
  const wantsJson = accept.includes("application/json") && !accept.includes("text/html");
  if (request.browser && !wantsJson) {
    expect(outcome.contentType, where).toMatch(/^text\/html/);
    expect(outcome.text, where).toMatch(/<p>[^<]{10,}<\/p>/);
    return outcome;
  }
  expect(outcome.contentType, where).toMatch(/^application\/problem\+json/);
  const problem = JSON.parse(outcome.text) as Record<string, unknown>;
  expect(problem, where).toMatchObject({ success: false, status: outcome.status });
  for (const field of ["detail", "message", "title", "code"] as const) {
    expect(typeof problem[field], `${field}: ${where}`).toBe("string");
    expect((problem[field] as string).trim().length, `${field}: ${where}`).toBeGreaterThan(2);
  }
  expect(ERROR_PREFIX.test(problem.detail as string), `error text in detail: ${where}`).toBe(false);
  return outcome;
}

// ---------- arbitraries ----------

/** Any string: ASCII, full unicode (astral, combining, RTL), control characters and NUL. */
const anyString = fc.oneof(
  fc.string(),
  fc.string({ unit: "grapheme" }),
  fc.string({ unit: "binary" }),
  fc.constantFrom(
    "",
    " ",
    "\u0000",
    "a\u0000b",
    "\u202e\u0301",
    "😀",
    "\ud800",
    "\udfff x",
    "%",
    "%ZZ",
    "../..",
    "null",
  ),
);
const hugeString = fc
  .integer({ min: 1_000, max: 20_000 })
  .chain((n) => fc.constantFrom("a", "é", "😀", "\u0000").map((c) => c.repeat(n)));
const hostileString = fc.oneof({ weight: 4, arbitrary: anyString }, { weight: 1, arbitrary: hugeString });
/** A value of the wrong type (or the right type with a hostile value). */
const hostileValue = fc.oneof(
  hostileString,
  fc.constantFrom(null, true, false, 0, -1, 1.5, 1e308, -0, 2 ** 31, 2 ** 53 + 1, [], {}, [null], { $ne: 1 }),
  fc.integer(),
  fc.double(),
  fc.jsonValue({ maxDepth: 3 }),
);

/** Lone surrogates cannot be percent-encoded: make them well-formed first. */
const LONE_SURROGATE = /[\ud800-\udbff](?![\udc00-\udfff])|(?<![\ud800-\udbff])[\udc00-\udfff]/g;
const encode = (value: string) => encodeURIComponent(value.replace(LONE_SURROGATE, "\ufffd"));

/** A path segment: any string encoded, a long one, or raw malformed escapes. */
const hostileSegment = fc.oneof(
  { weight: 5, arbitrary: anyString.filter((s) => s.length > 0).map(encode) },
  { weight: 1, arbitrary: fc.integer({ min: 200, max: 8_000 }).map((n) => "b".repeat(n)) },
  {
    weight: 2,
    arbitrary: fc.constantFrom(
      "%",
      "%E0%A4%A",
      "%C0%80",
      "%00",
      "%FF%FE",
      "..",
      "%2e%2e",
      "%2F",
      "0",
      "-1",
      "1.5",
      "1e3",
      "0x10",
      "99999999999999999999",
      "Infinity",
      "NaN",
      "%20",
    ),
  },
  { weight: 1, arbitrary: fc.integer().map(String) },
);

/** A query string from generated keys and values, some of them the route's own names. */
function hostileQuery(names: string[]) {
  const key = fc.oneof(fc.constantFrom(...names), anyString);
  const value = fc.oneof(hostileString, fc.integer().map(String), fc.constantFrom("true", "false", "", "1", "0"));
  return fc
    .array(fc.tuple(key, value), { maxLength: 6 })
    .map((pairs) => pairs.map(([k, v]) => `${encode(k)}=${encode(v)}`).join("&"));
}

/** JSON text that does not parse: valid JSON cut short, or plain junk. */
const malformedJson = fc.oneof(
  fc
    .jsonValue()
    .map((v) => JSON.stringify(v) ?? "")
    .filter((t) => t.length > 1)
    .map((t) => t.slice(0, -1)),
  fc.constantFrom(
    "{",
    "{'a':1}",
    '{"a":}',
    "[1,]",
    "undefined",
    "NaN",
    '{"client_id": 1',
    "\u0000",
    "",
    " ",
    "\ufeff{}",
  ),
  fc.string().filter((s) => {
    try {
      JSON.parse(s);
      return false;
    } catch {
      return true;
    }
  }),
);

/** A valid body with fields replaced by hostile values, dropped, or extra fields added. */
function mutatedBody(base: Record<string, unknown>) {
  const fields = Object.keys(base);
  return fc
    .record({
      replace: fc.dictionary(fc.constantFrom(...fields), hostileValue, { maxKeys: 3 }),
      drop: fc.subarray(fields, { maxLength: Math.min(2, fields.length) }),
      extra: fc.dictionary(anyString, hostileValue, { maxKeys: 2 }),
    })
    .map(({ replace, drop, extra }) => {
      const body: Record<string, unknown> = { ...base, ...replace };
      for (const field of drop) delete body[field];
      return { ...extra, ...body };
    });
}

/** Any body text: generated JSON, JSON of the route's shape made hostile, or malformed JSON. */
function hostileBody(base: Record<string, unknown>) {
  return fc.oneof(
    fc.jsonValue().map((v) => JSON.stringify(v)),
    fc.anything().map((v) => JSON.stringify(v) ?? "null"),
    mutatedBody(base).map((v) => JSON.stringify(v)),
    malformedJson,
  );
}

const contentType = fc.constantFrom(
  "application/json",
  "application/json; charset=utf-8",
  "APPLICATION/JSON",
  "text/plain",
  "application/x-www-form-urlencoded",
  "multipart/form-data; boundary=x",
  undefined,
);
const key = fc.constantFrom<Key>("admin", "admin", "admin", "service", "garbage", null);
const accept = fc.constantFrom("application/json", "text/html,application/xhtml+xml", "*/*", undefined);

const withHeaders = (type: string | undefined, acceptHeader?: string) => ({
  ...(type ? { "content-type": type } : {}),
  ...(acceptHeader ? { accept: acceptHeader } : {}),
});

/** No generated id may name a client another test file owns: those ids become unknown ones. */
const FOREIGN_SAFE_ID = 2_147_483_000;
function safeIdSegment(segment: string): string {
  let decoded: string;
  try {
    decoded = decodeURIComponent(segment);
  } catch {
    return segment;
  }
  const n = Number(decoded);
  return decoded.trim() !== "" && Number.isFinite(n) && n > 0 ? String(FOREIGN_SAFE_ID) : segment;
}

function safeRefreshBody(text: string): string {
  try {
    const value = JSON.parse(text) as unknown;
    if (value && typeof value === "object" && "client_id" in value && typeof value.client_id === "number") {
      return JSON.stringify({ ...value, client_id: FOREIGN_SAFE_ID });
    }
  } catch {
    // malformed: sent as is
  }
  return text;
}

// ---------- the properties ----------

let ownClientId: number;

beforeAll(async () => {
  const response = await postJson("/clients", newClientBody());
  expect(response.status).toBe(201);
  ownClientId = ((await response.json()) as { client_id: number }).client_id;
});

describe("hostile bodies", () => {
  it("POST /clients", async () => {
    await fc.assert(
      fc.asyncProperty(hostileBody(newClientBody()), contentType, key, async (body, type, who) => {
        await send({ method: "POST", path: "/clients", key: who, headers: withHeaders(type), body });
      }),
      { numRuns: RUNS * 2 },
    );
  });

  it("PATCH /clients/{id} (the test's own client)", async () => {
    const base = {
      client_secret: "a-new-secret-value",
      redirect_uri: "https://example.com/cb",
      workspace_email: "a@example.com",
      workspace_name: "Renamed",
      scopes: "openid",
      is_active: true,
    };
    await fc.assert(
      fc.asyncProperty(hostileBody(base), contentType, key, async (body, type, who) => {
        await send({ method: "PATCH", path: `/clients/${ownClientId}`, key: who, headers: withHeaders(type), body });
      }),
      { numRuns: RUNS * 2 },
    );
  });

  it("POST /tokens/refresh", async () => {
    await fc.assert(
      fc.asyncProperty(
        fc.oneof(hostileBody({ client_id: 1 }), hostileBody({ branch_id: "branch-x" })),
        contentType,
        key,
        async (body, type, who) => {
          await send({
            method: "POST",
            path: "/tokens/refresh",
            key: who,
            headers: withHeaders(type),
            body: safeRefreshBody(body),
          });
        },
      ),
      { numRuns: RUNS * 2 },
    );
  });

  it("validation failures name the field and say what is wrong", async () => {
    const outcome = await send({
      method: "POST",
      path: "/clients",
      key: "admin",
      headers: withHeaders("application/json"),
      body: JSON.stringify({ ...newClientBody(), workspace_email: 42, extra: null }),
    });
    expect(outcome.status).toBe(422);
    const problem = JSON.parse(outcome.text) as { errors: { field: string; message: string }[] };
    expect(problem.errors.map((e) => e.field)).toEqual(expect.arrayContaining(["workspace_email"]));
    const malformed = await send({
      method: "POST",
      path: "/clients",
      key: "admin",
      headers: withHeaders("application/json"),
      body: '{"client_id": ',
    });
    expect(malformed.status).toBe(400);
  });
});

describe("text the database cannot store", () => {
  it("a NUL character in a body or a path is a 422, not a 500", async () => {
    for (const field of ["branch_id", "client_id", "workspace_name", "scopes"]) {
      const outcome = await send({
        method: "POST",
        path: "/clients",
        key: "admin",
        headers: withHeaders("application/json"),
        body: JSON.stringify({ ...newClientBody(), [field]: "nul\u0000inside" }),
      });
      expect(outcome.status, field).toBe(422);
      expect(JSON.parse(outcome.text).detail).toContain("NUL");
    }
    const patched = await send({
      method: "PATCH",
      path: `/clients/${ownClientId}`,
      key: "admin",
      headers: withHeaders("application/json"),
      body: JSON.stringify({ workspace_name: "\u0000" }),
    });
    expect(patched.status).toBe(422);
    for (const method of ["GET", "DELETE"]) {
      expect((await send({ method, path: "/tokens/a%00b", key: "admin" })).status).toBe(422);
    }
    const refresh = await send({
      method: "POST",
      path: "/tokens/refresh",
      key: "admin",
      headers: withHeaders("application/json"),
      body: JSON.stringify({ branch_id: "\u0000" }),
    });
    expect(refresh.status).toBe(422);
  });
});

describe("browser endpoints", () => {
  it("answer invalid parameters with a page to browsers and problem+json to API clients", async () => {
    for (const path of ["/oauth/login/abc", "/oauth/login/0", "/auth/callback?state=a&state=b"]) {
      const page = await send({ method: "GET", path, headers: withHeaders(undefined, "text/html"), browser: true });
      expect(page.status, path).toBe(422);
      expect(page.contentType).toMatch(/^text\/html/);
      const api = await send({
        method: "GET",
        path,
        headers: withHeaders(undefined, "application/json"),
        browser: true,
      });
      expect(api.status, path).toBe(422);
      expect(api.contentType).toMatch(/^application\/problem\+json/);
    }
  });
});

describe("hostile path segments", () => {
  it("GET /clients/{id} and /clients/{id}/login-url", async () => {
    await fc.assert(
      fc.asyncProperty(hostileSegment, key, fc.boolean(), async (segment, who, loginUrl) => {
        await send({ method: "GET", path: `/clients/${segment}${loginUrl ? "/login-url" : ""}`, key: who });
      }),
      { numRuns: RUNS * 2 },
    );
  });

  it("PATCH and DELETE /clients/{id} (never another test's client)", async () => {
    await fc.assert(
      fc.asyncProperty(
        hostileSegment,
        key,
        fc.constantFrom("PATCH", "DELETE"),
        hostileBody({ workspace_name: "x" }),
        async (segment, who, method, body) => {
          await send({
            method,
            path: `/clients/${safeIdSegment(segment)}`,
            key: who,
            headers: withHeaders("application/json"),
            ...(method === "PATCH" ? { body } : {}),
          });
        },
      ),
      { numRuns: RUNS },
    );
  });

  it("GET and DELETE /tokens/{branch_id}", async () => {
    await fc.assert(
      fc.asyncProperty(hostileSegment, key, fc.constantFrom("GET", "DELETE"), async (segment, who, method) => {
        const outcome = await send({ method, path: `/tokens/${segment}`, key: who });
        // No generated branch is connected: never a token.
        expect(outcome.status).toBeGreaterThanOrEqual(400);
      }),
      { numRuns: RUNS * 2 },
    );
  });

  it("GET /oauth/login/{client_id} with hostile ids and link parameters, as a browser and as an API client", async () => {
    await fc.assert(
      fc.asyncProperty(
        fc.oneof(hostileSegment, fc.constant(String(ownClientId))),
        hostileQuery(["expires", "signature"]),
        accept,
        fc.constantFrom<Key>(null, null, "admin", "service", "garbage"),
        async (segment, query, acceptHeader, who) => {
          const path = `/oauth/login/${segment}${query ? `?${query}` : ""}`;
          await send({
            method: "GET",
            path,
            key: who,
            headers: withHeaders(undefined, acceptHeader),
            // "..", "%2e%2e" and the like resolve to another path: the browser route only when still there.
            browser: /^\/token-management\/oauth\/login\/[^/]+$/.test(new URL(`${BASE}${path}`).pathname),
          });
        },
      ),
      { numRuns: RUNS * 2 },
    );
  });
});

describe("hostile query strings", () => {
  it("GET /clients", async () => {
    await fc.assert(
      fc.asyncProperty(hostileQuery(["is_active", "limit", "cursor"]), key, async (query, who) => {
        await send({ method: "GET", path: `/clients?${query}`, key: who });
      }),
      { numRuns: RUNS * 2 },
    );
  });

  it("GET /auth/callback, with and without a binding cookie", async () => {
    await fc.assert(
      fc.asyncProperty(
        hostileQuery(["state", "code", "error", "error_description", "iss"]),
        accept,
        fc.option(fc.oneof(anyString.map(encode), fc.constant("A".repeat(43))), { nil: undefined }),
        async (query, acceptHeader, cookie) => {
          const outcome = await send({
            method: "GET",
            path: `/auth/callback?${query}`,
            headers: {
              ...withHeaders(undefined, acceptHeader),
              ...(cookie === undefined ? {} : { cookie: `tm_oauth_binding=${cookie}` }),
            },
            browser: true,
          });
          // No generated state was sealed here: never a connection (400, or 422 for an oversize field).
          expect([400, 422]).toContain(outcome.status);
        },
      ),
      { numRuns: RUNS * 2 },
    );
  });
});

describe("unknown paths and wrong methods", () => {
  const known = [
    "/clients",
    `/clients/1`,
    "/clients/1/login-url",
    "/oauth/login/1",
    "/auth/callback",
    "/tokens/refresh",
    "/tokens/branch-x",
    "/health",
  ];

  it("answers 404/405 problem+json, never 5xx", async () => {
    await fc.assert(
      fc.asyncProperty(
        fc.oneof(
          fc.constantFrom(...known),
          fc.array(hostileSegment, { minLength: 1, maxLength: 4 }).map((s) => `/${s.join("/")}`),
          fc.constantFrom(...known).chain((p) => hostileSegment.map((s) => `${p}/${s}`)),
        ),
        fc.constantFrom("PUT", "POST", "PATCH", "DELETE", "OPTIONS", "HEAD", "PROPFIND"),
        key,
        async (path, method, who) => {
          // Only wrong methods on the known paths (and on DELETE never an id another test owns).
          if (method === "DELETE" && /^\/(clients|tokens)\//.test(path)) return;
          if (method === "PATCH" && path.startsWith("/clients/")) return;
          if (method === "POST" && (path === "/clients" || path === "/tokens/refresh")) return;
          await send({
            method,
            path,
            key: who,
            headers: withHeaders("application/json"),
            ...(["POST", "PUT", "PATCH"].includes(method) ? { body: "{}" } : {}),
          });
        },
      ),
      { numRuns: RUNS * 2 },
    );
  });

  it("paths outside the service answer problem+json too", async () => {
    for (const path of [
      "http://token-manager.test/",
      "http://token-manager.test/token-managementx",
      "http://token-manager.test/%",
    ]) {
      const response = await call(path);
      expect(response.status).toBe(404);
      expect(response.headers.get("content-type")).toMatch(/^application\/problem\+json/);
    }
  });
});

describe("oversize bodies", () => {
  const routes = [
    { method: "POST", path: "/clients" },
    { method: "PATCH", path: "/clients/FOREIGN" },
    { method: "POST", path: "/tokens/refresh" },
    { method: "POST", path: "/no/such/route" },
    { method: "PUT", path: "/tokens/branch-x" },
    { method: "DELETE", path: "/tokens/branch-x" },
  ];

  it("bodies over 64 KiB get 413, with or without Content-Length, with or without a key", async () => {
    await fc.assert(
      fc.asyncProperty(
        fc.constantFrom(...routes),
        fc.integer({ min: MAX_BODY_BYTES + 1, max: 4 * MAX_BODY_BYTES }),
        fc.constantFrom("a", "é", "😀", " "),
        fc.boolean(),
        key,
        contentType,
        async (route, size, unit, streamed, who, type) => {
          const text = JSON.stringify({
            workspace_name: unit.repeat(Math.ceil(size / new TextEncoder().encode(unit).length)),
          });
          const bytes = new TextEncoder().encode(text);
          const body = streamed
            ? new ReadableStream<Uint8Array>({
                start(controller) {
                  for (let i = 0; i < bytes.length; i += 16_384) controller.enqueue(bytes.slice(i, i + 16_384));
                  controller.close();
                },
              })
            : text;
          const outcome = await send({
            method: route.method,
            path: route.path.replace("FOREIGN", String(FOREIGN_SAFE_ID)),
            key: who,
            headers: withHeaders(type),
            body,
          });
          expect(outcome.status, `${route.method} ${route.path} ${bytes.length} bytes`).toBe(413);
        },
      ),
      { numRuns: 40 },
    );
  });

  it("a body of exactly 64 KiB is read (and then judged on its content)", async () => {
    const filler = "x".repeat(MAX_BODY_BYTES - JSON.stringify({ workspace_name: "" }).length);
    const outcome = await send({
      method: "PATCH",
      path: `/clients/${ownClientId}`,
      key: "admin",
      headers: withHeaders("application/json"),
      body: JSON.stringify({ workspace_name: filler }),
    });
    expect(outcome.status).toBe(422);
  });
});
