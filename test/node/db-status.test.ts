import { execFile } from "node:child_process";
import { readFileSync } from "node:fs";
import { createServer } from "node:net";
import { join } from "node:path";
import { promisify } from "node:util";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { ROOT, withoutWranglerSettings } from "../../dev/local-stack.ts";
import { type NeonLocal, startNeonLocal } from "../../dev/neon-local/server.ts";
import { applyMigrations, MIGRATIONS_FOLDER } from "../../scripts/migrate.ts";

const execFileAsync = promisify(execFile);
const TAGS = (
  JSON.parse(readFileSync(join(MIGRATIONS_FOLDER, "meta/_journal.json"), "utf8")) as { entries: { tag: string }[] }
).entries.map((entry) => entry.tag);
const LAST_TAG = TAGS.at(-1)!;

/** Runs db:status (what `npm run db:status` runs) against the database given in the environment. */
async function dbStatus(env: { TOKEN_MANAGEMENT_DATABASE_URL: string; NEON_LOCAL_FETCH_ENDPOINT: string }) {
  try {
    const { stdout, stderr } = await execFileAsync(process.execPath, ["--import", "tsx", "scripts/db-status.ts"], {
      cwd: ROOT,
      env: { ...withoutWranglerSettings(), ...env },
    });
    return { code: 0, stdout, stderr };
  } catch (error) {
    const failed = error as { code: number; stdout: string; stderr: string };
    return { code: failed.code, stdout: failed.stdout, stderr: failed.stderr };
  }
}

/** The line db:status prints for a migration. */
const lineOf = (stdout: string, tag: string) => stdout.split("\n").find((line) => line.startsWith(`${tag} `)) ?? "";

async function sql(db: NeonLocal, query: string): Promise<void> {
  const response = await fetch(db.sqlEndpoint, {
    method: "POST",
    headers: { "Neon-Connection-String": db.connectionString },
    body: JSON.stringify({ query, params: [] }),
  });
  if (!response.ok) throw new Error(`${query}: ${response.status} ${await response.text()}`);
}

/** A port nothing listens on (taken, then released). */
async function closedPort(): Promise<number> {
  const server = createServer();
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  const { port } = server.address() as { port: number };
  await new Promise((resolve) => server.close(resolve));
  return port;
}

describe("npm run db:status", () => {
  let db: NeonLocal;
  let env: { TOKEN_MANAGEMENT_DATABASE_URL: string; NEON_LOCAL_FETCH_ENDPOINT: string };

  beforeAll(async () => {
    db = await startNeonLocal({ backend: { kind: "pglite" } });
    env = { TOKEN_MANAGEMENT_DATABASE_URL: db.connectionString, NEON_LOCAL_FETCH_ENDPOINT: db.sqlEndpoint };
  });
  afterAll(() => db?.close());

  it("lists every migration as pending on an empty database and exits 1", async () => {
    const result = await dbStatus(env);
    expect(result.code).toBe(1);
    for (const tag of TAGS) expect(lineOf(result.stdout, tag)).toMatch(/\spending$/);
    expect(result.stdout).toContain(`${TAGS.length} pending`);
  });

  it("lists every migration with the time it was applied once migrated, and exits 0", async () => {
    const before = Date.now();
    await applyMigrations(db.connectionString, db.sqlEndpoint);
    const result = await dbStatus(env);
    expect(result.code).toBe(0);
    expect(result.stderr).toBe("");
    for (const tag of TAGS) {
      const appliedAt = /\sapplied (\S+)$/.exec(lineOf(result.stdout, tag))?.[1];
      expect(appliedAt, `${tag} in:\n${result.stdout}`).toBeDefined();
      expect(Date.parse(appliedAt!)).toBeGreaterThanOrEqual(before - 1_000);
      expect(Date.parse(appliedAt!)).toBeLessThanOrEqual(Date.now() + 1_000);
    }
    expect(result.stdout).toContain("up to date");
  });

  it("names the one migration a database is missing and exits 1", async () => {
    // The database as it was before the last migration was recorded (what drizzle reads to decide).
    await sql(
      db,
      `delete from "drizzle"."__drizzle_migrations" where created_at = (select max(created_at) from "drizzle"."__drizzle_migrations")`,
    );
    const result = await dbStatus(env);
    expect(result.code).toBe(1);
    expect(lineOf(result.stdout, LAST_TAG)).toMatch(/\spending$/);
    for (const tag of TAGS.slice(0, -1)) expect(lineOf(result.stdout, tag)).toMatch(/\sapplied \S+$/);
    expect(result.stdout).toContain("1 pending");
  });

  it("says in one line that it cannot reach a database that is not there, and exits 2", async () => {
    const port = await closedPort();
    const result = await dbStatus({
      TOKEN_MANAGEMENT_DATABASE_URL: `postgresql://local:s3cret-password@127.0.0.1:${port}/main`,
      NEON_LOCAL_FETCH_ENDPOINT: `http://127.0.0.1:${port}/sql`,
    });
    expect(result.code).toBe(2);
    expect(result.stdout).toBe("");
    const lines = result.stderr.trim().split("\n");
    expect(lines).toHaveLength(1);
    expect(lines[0]).toMatch(
      new RegExp(`^db:status: cannot read the database at .*127\\.0\\.0\\.1:${port}.*ECONNREFUSED`),
    );
    expect(result.stderr).not.toContain("s3cret-password");
  });
});
