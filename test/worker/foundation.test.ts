import { createExecutionContext, createScheduledController, waitOnExecutionContext } from "cloudflare:test";
import { describe, expect, it, vi } from "vitest";
import worker from "../../src/index";
import { call, expectProblem, json, testEnv } from "./helpers";

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

describe("environment validation", () => {
  it("names a missing binding in a 500 problem", async () => {
    const response = await call("/health", { envOverrides: { TOKEN_ENCRYPTION_KEY: undefined } });
    const body = await expectProblem(response, 500, "configuration_error");
    expect(body.detail).toContain("TOKEN_ENCRYPTION_KEY");
  });

  it("names a malformed binding without echoing its value", async () => {
    const badKey = "bm90LTMyLWJ5dGVz-secret-looking-value";
    const response = await call("/health", { envOverrides: { TOKEN_ENCRYPTION_KEY: badKey, ADMIN_API_KEY: "short" } });
    const body = await expectProblem(response, 500, "configuration_error");
    expect(body.detail).toContain("TOKEN_ENCRYPTION_KEY");
    expect(body.detail).toContain("ADMIN_API_KEY");
    expect(JSON.stringify(body)).not.toContain(badKey);
    expect(JSON.stringify(body)).not.toContain("short");
  });

  it("rejects a non-postgres database URL", async () => {
    const response = await call("/health", { envOverrides: { TOKEN_MANAGEMENT_DATABASE_URL: "mysql://x@y/z" } });
    expect((await expectProblem(response, 500)).detail).toContain("TOKEN_MANAGEMENT_DATABASE_URL");
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
        "/token-management/auth/callback",
        "/token-management/clients",
        "/token-management/clients/{id}",
        "/token-management/clients/{id}/login-url",
        "/token-management/events",
        "/token-management/events/{id}/redeliver",
        "/token-management/health",
        "/token-management/oauth/login/{client_id}",
        "/token-management/tokens/refresh",
        "/token-management/tokens/{branch_id}",
      ].sort(),
    );
  });

  it("renders a docs page", async () => {
    const response = await call("/docs");
    expect(response.status).toBe(200);
    expect(response.headers.get("content-type")).toContain("text/html");
    expect(await response.text()).toContain("/token-management/openapi.json");
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
