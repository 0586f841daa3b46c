// Upgrade keeps every connection: a database holding the previous release's data (migrations up to
// 0005, rows written the way that release wrote them) is migrated to apps, grants and branches, and
// every connected branch is served the same token afterwards, with no re-consent and no refresh.
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { neon, neonConfig } from "@neondatabase/serverless";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { type NeonLocal, startNeonLocal } from "../../dev/neon-local/server.ts";
import { applyMigrations } from "../../scripts/migrate.ts";
import { createDb } from "../../src/db/client.ts";
import { type Keyring, loadKeyring, open, seal } from "../../src/lib/crypto.ts";
import { findForRead } from "../../src/services/tokens.ts";
import { migrationsCopy } from "./rollback-safety.ts";

const KEY = Buffer.alloc(32, 7).toString("base64");
// The driver talks to the local database program at the connection string's host and port.
neonConfig.fetchEndpoint = (host, port) => `http://${host}:${port}/sql`;
const LAST_BEFORE_APPS = "0005_security_events";

let scratch: string;
let database: NeonLocal;
let keyring: Keyring;
let sql: ReturnType<typeof neon>;

beforeAll(async () => {
  scratch = await mkdtemp(join(tmpdir(), "upgrade-"));
  database = await startNeonLocal({ backend: { kind: "pglite" } });
  keyring = await loadKeyring(KEY, [], { acceptV1: false });
  await applyMigrations(
    database.connectionString,
    undefined,
    migrationsCopy(join(scratch, "previous"), { upTo: LAST_BEFORE_APPS }),
  );
  sql = neon(database.connectionString);
}, 120_000);

afterAll(async () => {
  await database?.close();
  await rm(scratch, { recursive: true, force: true });
});

/** A client and its tokens as the previous release wrote them: one OAuth client per branch. */
async function previousReleaseBranch(id: number, tokens: { at: string; rt: string; valid: boolean }[]) {
  const secret = await seal(keyring, `secret-${id}`, { column: "clients.client_secret", clientId: id });
  await sql.query(
    `insert into clients (id, client_id, client_secret, redirect_uri, branch_id, workspace_email, workspace_name)
     values ($1, $2, $3, 'https://example.com/cb', $4, 'ops@example.com', $5)`,
    [id, `oc-${id}`, secret, `branch-${id}`, `Workspace ${id}`],
  );
  for (const token of tokens) {
    await sql.query(
      `insert into tokens (client_id, access_token, refresh_token, expires_at, is_valid, status, lifetime_seconds)
       values ($1, $2, $3, now() + interval '50 minutes', $4, $5, 3600)`,
      [
        id,
        await seal(keyring, token.at, { column: "tokens.access_token", clientId: id }),
        await seal(keyring, token.rt, { column: "tokens.refresh_token", clientId: id }),
        token.valid,
        token.valid ? "active" : "needs_reauth",
      ],
    );
  }
}

describe("upgrading to apps, grants and branches", () => {
  it("serves every connected branch the same token after the migration, and opens every secret", async () => {
    await previousReleaseBranch(1, [
      { at: "at-old-1", rt: "rt-old-1", valid: false },
      { at: "at-1", rt: "rt-1", valid: true },
    ]);
    await previousReleaseBranch(2, [{ at: "at-2", rt: "rt-2", valid: true }]);
    await previousReleaseBranch(3, []);
    await sql.query("select setval('clients_id_seq', 3)");

    await applyMigrations(database.connectionString, undefined, migrationsCopy(join(scratch, "all")));
    const db = createDb({ databaseUrl: database.connectionString, localFetchEndpoint: database.sqlEndpoint });
    neonConfig.fetchEndpoint = (host, port) => `http://${host}:${port}/sql`;

    for (const [branchId, expected] of [
      ["branch-1", "at-1"],
      ["branch-2", "at-2"],
    ] as const) {
      const { client, token } = await findForRead(db, { branchId });
      expect(client?.isActive).toBe(true);
      expect(token?.status).toBe("active");
      expect(token?.isValid).toBe(true);
      expect(
        await open(keyring, token!.accessToken, { column: "tokens.access_token", clientId: token!.clientId }),
      ).toBe(expected);
    }
    // Never connected stays never connected.
    expect((await findForRead(db, { branchId: "branch-3" })).token).toBeNull();

    // Each client became an app with the same id; its sealed secret opens there unchanged.
    const apps = (await sql.query("select id, client_id, client_secret, profile from apps order by id")) as {
      id: number;
      client_id: string;
      client_secret: string;
      profile: string;
    }[];
    expect(apps.map((app) => [app.id, app.client_id, app.profile])).toEqual([
      [1, "oc-1", "google"],
      [2, "oc-2", "google"],
      [3, "oc-3", "google"],
    ]);
    for (const app of apps) {
      expect(await open(keyring, app.client_secret, { column: "clients.client_secret", clientId: app.id })).toBe(
        `secret-${app.id}`,
      );
    }
    // New apps take ids after every existing client's: a fresh app's sealed secret never shares a binding.
    const [next] = (await sql.query("select nextval(pg_get_serial_sequence('apps', 'id'))::int as id")) as {
      id: number;
    }[];
    expect(next!.id).toBeGreaterThan(3);
    // The grants belong to their client's app.
    expect(await sql.query("select count(*)::int as n from tokens where app_id is null")).toEqual([{ n: 0 }]);
  });
});
