import { describe, expect, it } from "vitest";
import { call, json } from "./helpers";
import {
  connectBranch,
  newClientBody,
  postJson,
  registerBranch,
  registerProviderClient,
  runBrowserFlow,
} from "./oauth-helpers";

/**
 * Login links, authorization redirects and tokens are capabilities: no browser, proxy or CDN may
 * keep a copy. Every API response says `Cache-Control: no-store` (one middleware in src/app.ts).
 */

function expectNoStore(response: Response): void {
  expect(response.headers.get("cache-control")).toBe("no-store");
}

describe("Cache-Control: no-store", () => {
  it("POST /clients (its answer carries the first login link)", async () => {
    const body = newClientBody();
    await registerProviderClient(body.client_id, body.client_secret, [body.redirect_uri]);
    const response = await postJson("/clients", body);
    expect(response.status).toBe(201);
    expect((await json<{ login_url: string }>(response)).login_url).toContain("signature=");
    expectNoStore(response);
  });

  it("GET /clients/{id}/login-url", async () => {
    const branch = await registerBranch();
    const response = await call(`/clients/${branch.clientId}/login-url`, { key: "admin" });
    expect(response.status).toBe(200);
    expect((await json<{ login_url: string }>(response)).login_url).toContain("signature=");
    expectNoStore(response);
  });

  it("GET /oauth/login/{id} (the redirect carries the sealed state)", async () => {
    const branch = await registerBranch();
    const { start } = await runBrowserFlow(branch.loginUrl);
    expect(start.response.status).toBe(302);
    expect(start.authorizeUrl.searchParams.get("state")).toBeTruthy();
    expectNoStore(start.response);
  });

  it("GET /auth/callback, as JSON and as the HTML page", async () => {
    for (const accept of ["json", "html"] as const) {
      const branch = await registerBranch();
      const { callback } = await runBrowserFlow(branch.loginUrl, accept);
      expect(callback.status).toBe(200);
      expectNoStore(callback);
    }
  });

  it("GET /tokens/{branch_id}", async () => {
    const branch = await connectBranch();
    const response = await call(`/tokens/${branch.branchId}`, { key: "service" });
    expect(response.status).toBe(200);
    expect((await json<{ access_token: string }>(response)).access_token).toBeTruthy();
    expectNoStore(response);
  });

  it("POST /tokens/refresh", async () => {
    const branch = await connectBranch();
    const response = await postJson("/tokens/refresh", { branch_id: branch.branchId });
    expect(response.status).toBe(200);
    expectNoStore(response);
  });

  it("every other route too, and errors: client views, revocation, health, the API description", async () => {
    const branch = await connectBranch();
    const patch = { method: "PATCH", headers: { "content-type": "application/json" } } as const;
    const responses = [
      await call("/clients", { key: "admin" }),
      await call(`/clients/${branch.clientId}`, { key: "admin" }),
      await call(`/clients/${branch.clientId}`, { key: "admin", ...patch, body: '{"workspace_name":"Renamed"}' }),
      await call(`/tokens/${branch.branchId}`, { key: "admin", method: "DELETE" }),
      await call(`/clients/${branch.clientId}`, { key: "admin", method: "DELETE" }),
      await call("/health"),
      await call("/openapi.json"),
      await call("/clients"),
      await call("/nope"),
    ];
    expect(responses.map((r) => r.status)).toEqual([200, 200, 200, 200, 200, 200, 200, 401, 404]);
    for (const response of responses) expectNoStore(response);
  });
});
