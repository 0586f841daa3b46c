/**
 * Cross-Account Protection end to end on the local stack: the Worker (bundled, in workerd), the local
 * database and the local authorization server, whose Google profile is the RISC transmitter and the
 * stand-in of Google's RISC management API (dev/oauth-server/risc.ts).
 *
 * - `npm run risc:register|status|verify` (scripts/risc.ts) against the stand-in, authenticated with a
 *   service account key it issued: the stream points at the Worker's receiver with every event type in
 *   its namespace, and risc:verify returns once the Worker recorded the verification event.
 * - The account page's "Remove access" pushes a signed tokens-revoked SET that the Worker accepts.
 */
import { execFile } from "node:child_process";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { promisify } from "node:util";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import {
  bundleWorker,
  connectBranch,
  type LocalDatabase,
  localBindings,
  ROOT,
  type RunningWorker,
  randomApiKey,
  sql,
  startDatabase,
  startWorker,
  stopDatabase,
  withoutWranglerSettings,
} from "../../dev/local-stack.ts";
import { accountSubject } from "../../dev/oauth-server/risc.ts";
import { type OAuthServer, startOAuthServer } from "../../dev/oauth-server/server.ts";
import { applyMigrations } from "../../scripts/migrate.ts";
import { EXIT_ERROR, EXIT_NOT_VERIFIED, EXIT_OK, main } from "../../scripts/risc.ts";

const execFileAsync = promisify(execFile);
const OAUTH_EVENT = "https://schemas.openid.net/secevent/oauth/event-type/";
const RISC_EVENT = "https://schemas.openid.net/secevent/risc/event-type/";

let dir: string;
let db: LocalDatabase;
let oauth: OAuthServer;
let worker: RunningWorker;
let adminKey: string;
let keyFile: string;
let scriptEnv: Record<string, string>;

async function createServiceAccount(): Promise<Record<string, string>> {
  const response = await fetch(`${oauth.url}/admin/risc/service-accounts`, { method: "POST" });
  expect(response.status).toBe(201);
  return (await response.json()) as Record<string, string>;
}

/** Runs the script's main() in this process, capturing what it prints. */
async function run(command: string, env: Record<string, string> = scriptEnv) {
  const out: string[] = [];
  const err: string[] = [];
  const log = console.log;
  const error = console.error;
  console.log = (line: string) => out.push(line);
  console.error = (line: string) => err.push(line);
  try {
    const code = await main([command], env);
    return { code, stdout: out.join("\n"), stderr: err.join("\n") };
  } finally {
    console.log = log;
    console.error = error;
  }
}

async function stream(): Promise<{ delivery: { url?: string }; events_requested: string[] }> {
  const { code, stdout } = await run("status");
  expect(code).toBe(EXIT_OK);
  return JSON.parse(stdout);
}

beforeAll(async () => {
  dir = mkdtempSync(join(tmpdir(), "risc-test-"));
  db = await startDatabase();
  await applyMigrations(db.connectionString, db.sqlEndpoint);
  oauth = await startOAuthServer({ profile: "google" });
  adminKey = randomApiKey();
  const bundle = await bundleWorker(join(dir, "bundle"));
  worker = await startWorker({
    name: "token-management",
    bundle,
    bindings: {
      ...localBindings(db, oauth, { adminKey, serviceKey: randomApiKey() }),
      RISC_CONFIGURATION_URL: `${oauth.url}/.well-known/risc-configuration`,
      PUBLIC_BASE_URL: "",
    },
    onLog: () => {},
  });
  keyFile = join(dir, "service-account.json");
  writeFileSync(keyFile, JSON.stringify(await createServiceAccount()));
  scriptEnv = {
    DEV_VARS_FILE: join(dir, "none.dev.vars"),
    RISC_SERVICE_ACCOUNT_KEY_FILE: keyFile,
    RISC_API_URL: oauth.url,
    PUBLIC_BASE_URL: `${worker.url}/token-management`,
    ADMIN_API_KEY: adminKey,
    RISC_VERIFY_TIMEOUT_SECONDS: "20",
  };
  // Google addresses a verification event to the project's client ids: one app here.
  await connectBranch(worker.url, oauth, adminKey, {
    client_id: "risc-verify-app",
    client_secret: "risc-verify-app-secret",
    branch_id: "risc-verify-branch",
    workspace_email: "ops@example.com",
    workspace_name: "RISC verify",
  });
}, 180_000);

afterAll(async () => {
  await worker?.mf.dispose();
  await oauth?.close();
  if (db) await stopDatabase(db);
  rmSync(dir, { recursive: true, force: true });
});

describe("npm run risc:register, risc:status, risc:verify", () => {
  it("register points the stream at the receiver with every event type in its namespace", async () => {
    const { code, stdout } = await run("register");
    expect(code, stdout).toBe(EXIT_OK);
    const registered = await stream();
    expect(registered.delivery.url).toBe(`${worker.url}/token-management/risc`);
    expect(registered.events_requested.sort()).toEqual(
      [
        `${OAUTH_EVENT}tokens-revoked`,
        `${OAUTH_EVENT}token-revoked`,
        `${RISC_EVENT}sessions-revoked`,
        `${RISC_EVENT}account-disabled`,
        `${RISC_EVENT}account-enabled`,
        `${RISC_EVENT}account-credential-change-required`,
        `${RISC_EVENT}verification`,
      ].sort(),
    );
  });

  it("verify returns once the receiver recorded the verification event with its state", async () => {
    await run("register");
    const { code, stdout } = await run("verify");
    expect(code, stdout).toBe(EXIT_OK);
    const state = /state (verify-[0-9a-f]+)/.exec(stdout)?.[1];
    expect(state).toBeDefined();
    const rows = await sql(db, "select event_types from security_events where verification_state = $1", [state]);
    expect(rows).toEqual([[`${RISC_EVENT}verification`]]);
  });

  it("verify exits 1 when the event never arrives (the stream points elsewhere)", async () => {
    const { code } = await run("register", {
      ...scriptEnv,
      RISC_RECEIVER_URL: "http://127.0.0.1:9/token-management/risc",
    });
    expect(code).toBe(EXIT_OK);
    try {
      const result = await run("verify", { ...scriptEnv, RISC_VERIFY_TIMEOUT_SECONDS: "2" });
      expect(result.code).toBe(EXIT_NOT_VERIFIED);
      expect(result.stdout).toMatch(/no verification event .* arrived within 2 s/);
    } finally {
      await run("register");
    }
  });

  it("a key the API does not know, or a missing key file, is one line and exit 2", async () => {
    const stranger = await createServiceAccount();
    const forged = join(dir, "forged.json");
    // Another account's private key under this account's key id: the signature does not verify.
    const own = JSON.parse(JSON.stringify(await createServiceAccount())) as Record<string, string>;
    writeFileSync(forged, JSON.stringify({ ...own, private_key: stranger.private_key }));
    for (const env of [
      { ...scriptEnv, RISC_SERVICE_ACCOUNT_KEY_FILE: forged },
      { ...scriptEnv, RISC_SERVICE_ACCOUNT_KEY_FILE: join(dir, "missing.json") },
      { ...scriptEnv, RISC_SERVICE_ACCOUNT_KEY_FILE: "" },
    ]) {
      const result = await run("status", env);
      expect(result.code).toBe(EXIT_ERROR);
      expect(result.stderr.split("\n")).toHaveLength(1);
      expect(result.stderr).toMatch(/^risc:status: /);
    }
  });

  it("the stand-in refuses tokens-revoked in the RISC namespace, as Google does", async () => {
    const { selfSignedJwt } = await import("../../scripts/risc.ts");
    const key = JSON.parse(JSON.stringify(await createServiceAccount()));
    const response = await fetch(`${oauth.url}/v1beta/stream:update`, {
      method: "POST",
      headers: { authorization: `Bearer ${await selfSignedJwt(key)}`, "content-type": "application/json" },
      body: JSON.stringify({
        delivery: {
          delivery_method: "https://schemas.openid.net/secevent/risc/delivery-method/push",
          url: "https://x.example/risc",
        },
        events_requested: [`${RISC_EVENT}tokens-revoked`],
      }),
    });
    expect(response.status).toBe(400);
    expect(await response.text()).toContain("Unknown event types");
  });

  it("npm run risc:status works as a command", async () => {
    const { stdout } = await execFileAsync("npm", ["run", "--silent", "risc:status"], {
      cwd: ROOT,
      env: { ...withoutWranglerSettings(), ...scriptEnv },
    });
    expect(JSON.parse(stdout)).toMatchObject({ delivery: { url: `${worker.url}/token-management/risc` } });
  });
});

describe("the local transmitter's account page", () => {
  it('"Remove access" revokes at the provider and pushes a tokens-revoked event the Worker accepts', async () => {
    await run("register");
    const branchId = await connectBranch(worker.url, oauth, adminKey, {
      client_id: "risc-remove-access",
      client_secret: "risc-remove-access-secret",
      branch_id: "risc-branch",
      workspace_email: "ops@example.com",
      workspace_name: "RISC",
    });
    expect(branchId).toBe("risc-branch");
    const page = await (await fetch(`${oauth.url}/account?account=user@example.com`)).text();
    expect(page).toContain("risc-remove-access");
    expect(page).toContain("Remove access");

    const removed = await fetch(`${oauth.url}/account/remove`, {
      method: "POST",
      headers: { "content-type": "application/x-www-form-urlencoded" },
      body: new URLSearchParams({ account: "user@example.com", client_id: "risc-remove-access" }),
    });
    expect(await removed.text()).toContain("accepted the tokens-revoked event (202)");
    const stats = (await (await fetch(`${oauth.url}/admin/clients/risc-remove-access/stats`)).json()) as {
      activeRefreshTokens: number;
    };
    expect(stats.activeRefreshTokens).toBe(0);

    const { deliveries } = (await (await fetch(`${oauth.url}/admin/risc/deliveries`)).json()) as {
      deliveries: { jti: string; eventType: string; status: number }[];
    };
    const delivery = deliveries.find((d) => d.eventType === `${OAUTH_EVENT}tokens-revoked`);
    expect(delivery?.status).toBe(202);
    const rows = await sql(db, "select audience, event_types from security_events where jti = $1", [delivery!.jti]);
    expect(rows).toEqual([["risc-remove-access", `${OAUTH_EVENT}tokens-revoked`]]);
    expect(accountSubject("user@example.com")).toMatch(/^\d{21}$/);
  });
});
