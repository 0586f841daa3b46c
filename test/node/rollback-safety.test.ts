// Migrations are safe to roll back: after every migration, the previous release (drizzle/release.json)
// still reads and writes its schema on a database holding its data. The check itself must fail on a
// migration that drops, renames or rewrites what that release uses: proved below with migrations
// made for the purpose, each on a scratch database.
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { neonConfig } from "@neondatabase/serverless";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { type NeonLocal, startNeonLocal } from "../../dev/neon-local/server.ts";
import { applyMigrations } from "../../scripts/migrate.ts";
import { checkRollbackSafety, migrationsCopy, readRelease, snapshotOf, tagsAfter } from "./rollback-safety.ts";

const release = readRelease();
// Route by the connection string's host and port, so the scratch databases can be checked at once.
neonConfig.fetchEndpoint = (host, port) => `http://${host}:${port}/sql`;

let scratch: string;
beforeAll(async () => {
  scratch = await mkdtemp(join(tmpdir(), "rollback-safety-"));
});
afterAll(() => rm(scratch, { recursive: true, force: true }));

/** The check on a new database: drizzle/ as it is, plus `extra` migrations after it. */
async function check(name: string, extra: Record<string, string> = {}): Promise<string[]> {
  const db: NeonLocal = await startNeonLocal({ backend: { kind: "pglite" } });
  try {
    const previous = migrationsCopy(join(scratch, name, "previous"), { upTo: release.previous });
    const all = migrationsCopy(join(scratch, name, "all"), { extra });
    return await checkRollbackSafety(
      { url: db.connectionString },
      release,
      () => applyMigrations(db.connectionString, undefined, previous),
      () => applyMigrations(db.connectionString, undefined, all),
    );
  } finally {
    await db.close();
  }
}

describe("rollback safety of the migrations", () => {
  it(`the previous release (${release.previous}) still reads and writes after every migration since`, async () => {
    const problems = await check("real");
    expect(problems, `after ${tagsAfter(release.previous).join(", ") || "no newer migration"}`).toEqual([]);
  });

  it("release.json names a migration of drizzle/ whose snapshot has tables", () => {
    expect(Object.keys(snapshotOf(release.previous).tables).length).toBeGreaterThan(0);
  });
});

describe("the rollback-safety check", () => {
  // One scratch database for all the breaking changes (each database costs seconds): each change
  // must show up as its own problem, and nothing else may.
  it("fails on each migration that breaks the previous release, naming what broke", async () => {
    const problems = await check("breaking", {
      drop_column: `ALTER TABLE "tokens" DROP COLUMN "scope";`,
      rename_column: `ALTER TABLE "tokens" RENAME COLUMN "last_error" TO "failure_reason";`,
      rename_table: `ALTER TABLE "events" RENAME TO "branch_events";`,
      retype: `ALTER TABLE "tokens" ALTER COLUMN "failure_count" SET DATA TYPE text;`,
      // A NOT NULL column without a default: the previous release's inserts do not name it.
      not_null: `ALTER TABLE "clients" ADD COLUMN "region" text NOT NULL DEFAULT 'eu';--> statement-breakpoint
ALTER TABLE "clients" ALTER COLUMN "region" DROP DEFAULT;`,
      drop_unique: `ALTER TABLE "tokens" DROP CONSTRAINT "tokens_state_nonce_unique";`,
      rewrite: `ALTER TABLE "clients" ALTER COLUMN "client_secret" DROP NOT NULL;--> statement-breakpoint
UPDATE "clients" SET "client_secret" = NULL;`,
    });
    // The previous release's inserts: into clients for want of "region"; into tokens and events for
    // the dropped and renamed columns and the renamed table (each insert reports its first error).
    const inserts = problems.filter((p) => / the previous release's insert /.test(p));
    expect(inserts).toHaveLength(3);
    const insertInto = (table: string) => inserts.find((p) => p.startsWith(`${table}: `));
    expect(insertInto("clients")).toMatch(/^clients: the previous release's insert \(columns .*\) fails: .*"region"/);
    expect(insertInto("tokens")).toMatch(/^tokens: the previous release's insert \(columns .*\) fails: column "scope"/);
    expect(insertInto("events")).toMatch(
      /^events: the previous release's insert \(columns .*\) fails: relation "events"/,
    );
    expect(problems.filter((p) => !inserts.includes(p)).sort()).toEqual(
      [
        "tokens.scope: column is gone (dropped or renamed)",
        "tokens.last_error: column is gone (dropped or renamed)",
        "events: table is gone (dropped or renamed), and the previous release reads it",
        "tokens.failure_count: type changed from integer to text",
        // The previous release's select names the columns that are gone.
        'tokens: the previous release\'s select fails: column "scope" does not exist',
        "tokens: unique tokens_state_nonce_unique on (state_nonce) is gone; the previous release relies on it (list it in drizzle/release.json unique_drops_allowed, with the reason, if it does not)",
        "clients.client_secret: the previous release's value changed from clients.client_secret#1 to null",
      ].sort(),
    );
  });

  it("passes what keeps old reads and writes working: new nullable columns and tables, dropped NOT NULL, foreign keys and plain indexes", async () => {
    const problems = await check("expand", {
      expand: `CREATE TABLE "widgets" ("id" serial PRIMARY KEY NOT NULL, "name" text NOT NULL);--> statement-breakpoint
ALTER TABLE "clients" ADD COLUMN "widget_id" integer REFERENCES "widgets"("id");--> statement-breakpoint
ALTER TABLE "tokens" ADD COLUMN "widget_subject" text;--> statement-breakpoint
ALTER TABLE "tokens" ADD COLUMN "widget_count" integer DEFAULT 0 NOT NULL;--> statement-breakpoint
ALTER TABLE "clients" ALTER COLUMN "workspace_email" DROP NOT NULL;--> statement-breakpoint
ALTER TABLE "events" ADD CONSTRAINT "events_widget_fk" FOREIGN KEY ("client_id") REFERENCES "clients"("id") NOT VALID;--> statement-breakpoint
ALTER TABLE "events" DROP CONSTRAINT "events_widget_fk";--> statement-breakpoint
DROP INDEX IF EXISTS "events_type_id_idx";`,
    });
    expect(problems).toEqual([]);
  });
});
