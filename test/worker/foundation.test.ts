import { createExecutionContext, createScheduledController, waitOnExecutionContext } from "cloudflare:test";
import { describe, expect, it, vi } from "vitest";
import { parseEnv } from "../../src/env";
import worker from "../../src/index";
import { TEST_ADMIN_KEY, TEST_SERVICE_KEY } from "./bindings";
import { type CallOptions, call, expectProblem, json, testEnv } from "./helpers";

describe("health", () => {
  it("answers 200 when the database answers", async () => {
    const response = await call("/health");
    expect(response.status).toBe(200);
    expect(await json(response)).toEqual({ success: true, status: "ok", database: "reachable" });
  });

  it("answers 503 problem+json when the database is unreachable", async () => {
    // Port 9 (discard) on loopback has no listener: the driver's fetch fails.
    const response = await call("/health", { envOverrides: { NEON_LOCAL_FETCH_ENDPOINT: "http://127.0.0.1:9/sql" } });
    const body = await expectProblem(response, 503, "database_unavailable");
    expect(response.headers.get("retry-after")).toBe("5");
    expect(JSON.stringify(body)).not.toContain("local:local");
  });
});

/** Calls the Worker and collects what it logged as errors (one JSON object per line). */
async function callLogged(path: string, options: CallOptions): Promise<{ response: Response; errorLog: string }> {
  const spy = vi.spyOn(console, "error").mockImplementation(() => undefined);
  try {
    const response = await call(path, options);
    return { response, errorLog: spy.mock.calls.map((args) => String(args[0])).join("\n") };
  } finally {
    spy.mockRestore();
  }
}

/** The generic 500 an anonymous caller of a misconfigured Worker gets: nothing about the bindings. */
async function expectGeneric500(response: Response): Promise<void> {
  const body = await expectProblem(response, 500, "internal_error");
  expect(body.detail).toBe("An unexpected error occurred.");
  expect(JSON.stringify(body)).not.toMatch(/misconfigured|_KEY|_URL|OAUTH_|TOKEN_|NEON_/);
}

describe("environment validation", () => {
  const noEncryptionKey = { TOKEN_ENCRYPTION_KEY: undefined };

  it("tells an anonymous caller nothing about a broken configuration; the names go to the log", async () => {
    for (const [path, key] of [
      ["/health", null],
      ["/clients", null],
      ["/clients", "a-wrong-key-000000000000"],
      ["/oauth/login/1?expires=1&signature=x", null],
      ["/auth/callback?code=x&state=y", null],
    ] as const) {
      const { response, errorLog } = await callLogged(path, { key, envOverrides: noEncryptionKey });
      await expectGeneric500(response);
      expect(response.headers.get("cache-control")).toBe("no-store");
      expect(errorLog).toContain("TOKEN_ENCRYPTION_KEY");
    }
  });

  it("names a missing binding to a caller holding an admin or a service key", async () => {
    for (const key of ["admin", "service"] as const) {
      const response = await call("/health", { key, envOverrides: noEncryptionKey });
      const body = await expectProblem(response, 500, "configuration_error");
      expect(body.detail).toContain("TOKEN_ENCRYPTION_KEY");
    }
  });

  it("names a malformed binding without echoing its value; a malformed key list authenticates nobody", async () => {
    const badKey = "bm90LTMyLWJ5dGVz-secret-looking-value";
    const envOverrides = { TOKEN_ENCRYPTION_KEY: badKey, ADMIN_API_KEY: "short" };
    const response = await call("/health", { key: "service", envOverrides });
    const body = await expectProblem(response, 500, "configuration_error");
    expect(body.detail).toContain("TOKEN_ENCRYPTION_KEY");
    expect(body.detail).toContain("ADMIN_API_KEY");
    expect(JSON.stringify(body)).not.toContain(badKey);
    expect(JSON.stringify(body)).not.toContain("short");
    // "short" is not a valid admin key, so presenting it shows nothing; nor does the old admin key.
    await expectGeneric500(await call("/health", { key: "short", envOverrides }));
    await expectGeneric500(await call("/health", { key: "admin", envOverrides }));
  });

  it("rejects a non-postgres database URL", async () => {
    const envOverrides = { TOKEN_MANAGEMENT_DATABASE_URL: "mysql://x@y/z" };
    const response = await call("/health", { key: "admin", envOverrides });
    expect((await expectProblem(response, 500, "configuration_error")).detail).toContain(
      "TOKEN_MANAGEMENT_DATABASE_URL",
    );
    await expectGeneric500(await call("/health", { envOverrides }));
  });

  it("refuses one key configured as both an admin and a service key, without echoing it", async () => {
    const envOverrides = { SERVICE_API_KEY: `${TEST_SERVICE_KEY},${TEST_ADMIN_KEY}` };
    const response = await call("/clients", { key: "service", envOverrides });
    const body = await expectProblem(response, 500, "configuration_error");
    expect(body.detail).toMatch(/SERVICE_API_KEY: repeats a key of ADMIN_API_KEY/);
    expect(JSON.stringify(body)).not.toContain(TEST_ADMIN_KEY);
    // The shared key does not reach an admin route, nor does anyone else learn why.
    await expectGeneric500(await call("/clients", { key: "a-wrong-key-000000000000", envOverrides }));
    expect(() => parseEnv({ ...testEnv, ADMIN_API_KEY: TEST_SERVICE_KEY })).toThrow(/SERVICE_API_KEY/);
  });

  it("refuses an http:// provider URL unless OAUTH_ALLOW_INSECURE_HTTP is on", async () => {
    const envOverrides = { OAUTH_ALLOW_INSECURE_HTTP: "false" };
    // The tests' provider is the local server on http://127.0.0.1.
    const body = await expectProblem(await call("/health", { key: "admin", envOverrides }), 500, "configuration_error");
    for (const name of [
      "OAUTH_AUTHORIZATION_URL",
      "OAUTH_TOKEN_URL",
      "OAUTH_REVOCATION_URL",
      "RISC_CONFIGURATION_URL",
      "BUSINESS_PROFILE_API_BASE_URLS",
    ]) {
      expect(body.detail).toContain(`${name}: must be https`);
    }
    expect(body.detail).not.toContain(testEnv.OAUTH_SERVER_URL);
    // https URLs need no flag; an empty revocation URL (no revocation) is not a URL to check.
    const https = {
      ...testEnv,
      OAUTH_ALLOW_INSECURE_HTTP: "false",
      OAUTH_ISSUER: "https://issuer.example",
      OAUTH_AUTHORIZATION_URL: "https://issuer.example/authorize",
      OAUTH_TOKEN_URL: "https://issuer.example/token",
      OAUTH_REVOCATION_URL: "",
      RISC_CONFIGURATION_URL: "https://issuer.example/.well-known/risc-configuration",
      BUSINESS_PROFILE_API_BASE_URLS: "",
    };
    expect(parseEnv(https).OAUTH_TOKEN_URL).toBe("https://issuer.example/token");
    // The console's Business Profile API: Google's two hosts unless configured; two URLs or nothing.
    expect(parseEnv(https).BUSINESS_PROFILE_API_BASE_URLS).toEqual({
      accounts: "https://mybusinessaccountmanagement.googleapis.com",
      locations: "https://mybusinessbusinessinformation.googleapis.com",
    });
    expect(() => parseEnv({ ...https, BUSINESS_PROFILE_API_BASE_URLS: "https://bp.example" })).toThrow(
      /BUSINESS_PROFILE_API_BASE_URLS: must be two URLs/,
    );
    expect(() => parseEnv({ ...https, OAUTH_ISSUER: "http://issuer.example" })).toThrow(/OAUTH_ISSUER: must be https/);
    // With the flag (local development and these tests), http is accepted.
    expect(parseEnv({ ...testEnv, OAUTH_ALLOW_INSECURE_HTTP: "true" }).OAUTH_TOKEN_URL).toMatch(/^http:/);
  });

  it("accepts NEON_LOCAL_FETCH_ENDPOINT only on a loopback host", async () => {
    for (const endpoint of [
      "http://127.0.0.1:4444/sql",
      "http://127.255.3.9/sql",
      "http://localhost:4444/sql",
      "http://[::1]:4444/sql",
    ]) {
      expect(parseEnv({ ...testEnv, NEON_LOCAL_FETCH_ENDPOINT: endpoint }).NEON_LOCAL_FETCH_ENDPOINT).toBe(endpoint);
    }
    for (const endpoint of [
      "http://10.0.0.5:4444/sql",
      "https://sql.example.com/sql",
      "http://127.0.0.1.example.com/sql",
      "http://localhost.example.com/sql",
      "http://[::2]:4444/sql",
      "http://0.0.0.0:4444/sql",
    ]) {
      expect(() => parseEnv({ ...testEnv, NEON_LOCAL_FETCH_ENDPOINT: endpoint }), endpoint).toThrow(
        /NEON_LOCAL_FETCH_ENDPOINT: must point at a loopback host/,
      );
    }
    // Through the Worker: a stray production binding stops the service instead of redirecting SQL.
    const envOverrides = { NEON_LOCAL_FETCH_ENDPOINT: "https://sql.example.com/sql" };
    const body = await expectProblem(await call("/health", { key: "admin", envOverrides }), 500, "configuration_error");
    expect(body.detail).toContain("NEON_LOCAL_FETCH_ENDPOINT");
  });
});

describe("errors", () => {
  it("answers unknown routes with a 404 problem", async () => {
    const response = await call("/nope");
    const body = await expectProblem(response, 404, "not_found");
    expect(body.detail).toContain("/token-management/nope");
    expect(response.headers.get("cache-control")).toBe("no-store");
  });

  it("answers paths outside the base path with a 404 problem", async () => {
    await expectProblem(await call("http://token-manager.test/elsewhere"), 404, "not_found");
  });
});

describe("OpenAPI", () => {
  it("describes the routes", async () => {
    const response = await call("/openapi.json");
    expect(response.status).toBe(200);
    const doc = await json<{ openapi: string; paths: Record<string, unknown> }>(response);
    expect(doc.openapi).toBe("3.1.0");
    expect(Object.keys(doc.paths).sort()).toEqual(
      [
        "/token-management/apps",
        "/token-management/apps/{id}",
        "/token-management/auth/callback",
        "/token-management/clients",
        "/token-management/clients/{id}",
        "/token-management/clients/{id}/grant",
        "/token-management/clients/{id}/login-url",
        "/token-management/clients/{id}/login-links/revoke",
        "/token-management/events",
        "/token-management/events/{id}/redeliver",
        "/token-management/grants",
        "/token-management/grants/{id}",
        "/token-management/health",
        "/token-management/oauth/login/{client_id}",
        "/token-management/proxy/{branch_id}/{path}",
        "/token-management/risc",
        "/token-management/risc/verifications/{state}",
        "/token-management/tokens/refresh",
        "/token-management/tokens/{branch_id}",
      ].sort(),
    );
  });
});

describe("scheduled handler", () => {
  it("logs one failure line and rejects when the database is down", async () => {
    const log = vi.spyOn(console, "error");
    const controller = createScheduledController({ scheduledTime: Date.UTC(1999, 0, 1), cron: "*/5 * * * *" });
    const downEnv = { ...testEnv, NEON_LOCAL_FETCH_ENDPOINT: "http://127.0.0.1:9/sql" };
    await expect(worker.scheduled(controller, downEnv)).rejects.toThrow();
    const lines = log.mock.calls
      .map((args) => String(args[0]))
      .filter((line) => line.includes("scheduled_refresh_failed"));
    log.mockRestore();
    expect(lines).toHaveLength(1);
    expect(lines[0]).not.toContain("local:local");
  });

  it("runs the refresh job and logs one summary line", async () => {
    const log = vi.spyOn(console, "log");
    const controller = createScheduledController({ scheduledTime: Date.UTC(1999, 0, 1), cron: "*/5 * * * *" });
    const ctx = createExecutionContext();
    await worker.scheduled(controller, testEnv);
    await waitOnExecutionContext(ctx);
    const lines = log.mock.calls.map((args) => String(args[0])).filter((line) => line.includes("scheduled_refresh"));
    expect(lines).toHaveLength(1);
    expect(JSON.parse(lines[0]!)).toMatchObject({ event: "scheduled_refresh", due: 0 });
    log.mockRestore();
  });
});
