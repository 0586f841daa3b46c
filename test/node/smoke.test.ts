// npm run smoke (the main workflow's check after a deployment) against the Worker on its local
// stack: the bundled Worker in workerd, the local database, a branch connected through the real
// consent flow against the local authorization server.
import { execFile } from "node:child_process";
import { randomBytes } from "node:crypto";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { promisify } from "node:util";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import * as stack from "../../dev/local-stack.ts";
import { type OAuthServer, startOAuthServer } from "../../dev/oauth-server/server.ts";
import { applyMigrations } from "../../scripts/migrate.ts";
import { smoke, smokeOnce } from "../../scripts/smoke.ts";

const execFileAsync = promisify(execFile);
const BRANCH = "smoke-branch";

let scratch: string;
let db: stack.LocalDatabase | undefined;
let oauth: OAuthServer | undefined;
let worker: stack.RunningWorker | undefined;
let baseUrl: string;
const serviceKey = stack.randomApiKey();

beforeAll(async () => {
  scratch = mkdtempSync(join(tmpdir(), "tm-smoke-"));
  const bundle = await stack.bundleWorker(join(scratch, "app"));
  db = await stack.startDatabase();
  await applyMigrations(db.connectionString, db.sqlEndpoint);
  oauth = await startOAuthServer({ port: 0 });
  const adminKey = stack.randomApiKey();
  worker = await stack.startWorker({
    name: "token-management",
    bundle,
    bindings: stack.localBindings(db, oauth, { adminKey, serviceKey }),
    onLog: () => {},
  });
  baseUrl = `${worker.url}${stack.BASE_PATH}`;
  await stack.connectBranch(worker.url, oauth, adminKey, {
    client_id: `smoke-${randomBytes(4).toString("hex")}`,
    client_secret: "smoke-secret",
    branch_id: BRANCH,
    workspace_email: "smoke@example.com",
    workspace_name: "Smoke",
  });
}, 120_000);

afterAll(async () => {
  await worker?.mf.dispose().catch(() => undefined);
  await oauth?.close().catch(() => undefined);
  if (db) await stack.stopDatabase(db);
  rmSync(scratch, { recursive: true, force: true });
});

describe("npm run smoke", () => {
  it("passes on a healthy deployment and prints neither the token nor the key", async () => {
    const { stdout } = await execFileAsync(process.execPath, ["scripts/smoke.ts"], {
      cwd: stack.ROOT,
      env: { ...stack.toolEnv, SMOKE_BASE_URL: baseUrl, SMOKE_BRANCH_ID: BRANCH, SMOKE_API_KEY: serviceKey },
    });
    expect(stdout).toMatch(/^health: 200, database reachable$/m);
    expect(stdout).toMatch(/^token read: 200, an access token, expires_in \d+ s/m);
    expect(stdout).toMatch(/smoke: passed$/m);
    expect(stdout).not.toContain(serviceKey);
    const read = await fetch(`${baseUrl}/tokens/${BRANCH}`, { headers: { authorization: `Bearer ${serviceKey}` } });
    const { access_token: token } = (await read.json()) as { access_token: string };
    expect(stdout).not.toContain(token);
  });

  it("fails on a key the Worker does not accept, naming the status", async () => {
    const result = await smokeOnce({ baseUrl, branchId: BRANCH, apiKey: stack.randomApiKey() });
    expect(result.ok).toBe(false);
    expect(result.lines[0]).toBe("health: 200, database reachable");
    expect(result.lines[1]).toMatch(/^token read: 401 /);
  });

  it("fails on a smoke branch that does not exist", async () => {
    const result = await smokeOnce({ baseUrl, branchId: "no-such-branch", apiKey: serviceKey });
    expect(result.ok).toBe(false);
    expect(result.lines[1]).toMatch(/^token read: 404 /);
  });

  it("retries until its deadline and then fails when nothing answers", async () => {
    const started = Date.now();
    const result = await smoke(
      { baseUrl: "http://127.0.0.1:9/token-management", branchId: BRANCH, apiKey: serviceKey },
      { deadlineMs: 300, intervalMs: 100 },
    );
    expect(result.ok).toBe(false);
    expect(result.lines[0]).toMatch(/^request failed: /);
    expect(Date.now() - started).toBeGreaterThanOrEqual(200);
  });

  it("exits 1 without its settings, naming them", async () => {
    const failed = await execFileAsync(process.execPath, ["scripts/smoke.ts"], { cwd: stack.ROOT, env: stack.toolEnv })
      .then(() => undefined)
      .catch((error: { code: number; stderr: string }) => error);
    expect(failed?.code).toBe(1);
    expect(failed?.stderr).toContain("set SMOKE_BASE_URL, SMOKE_BRANCH_ID, SMOKE_API_KEY");
  });
});
