// The local database program, driven by the real driver (`neon()` and drizzle's neon-http) over a
// real socket, on PGlite always and on PostgreSQL when TEST_DATABASE_URL is set.
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { type NeonQueryFunction, neon, neonConfig } from "@neondatabase/serverless";
import { sql as dsql, eq } from "drizzle-orm";
import { drizzle, type NeonHttpDatabase } from "drizzle-orm/neon-http";
import { bigint, boolean, customType, integer, jsonb, numeric, pgSchema, text, timestamp } from "drizzle-orm/pg-core";
import { afterAll, beforeAll, beforeEach, describe, expect, it } from "vitest";
import { type BackendOptions, type NeonLocal, startNeonLocal } from "../../dev/neon-local/server.ts";

// Route by the connection string's host and port: each server's connectionString names itself.
neonConfig.fetchEndpoint = (host, port) => `http://${host}:${port}/sql`;

const ERROR_KEYS = [
  "message",
  "code",
  "detail",
  "hint",
  "position",
  "internalPosition",
  "internalQuery",
  "severity",
  "where",
  "table",
  "column",
  "schema",
  "dataType",
  "constraint",
  "file",
  "line",
  "routine",
].sort();

const TEST_DATABASE_URL = process.env.TEST_DATABASE_URL;
if (!TEST_DATABASE_URL) console.log("neon-local: skipping the PostgreSQL backend: TEST_DATABASE_URL is not set");

const backends: { name: string; backend: () => BackendOptions; enabled: boolean }[] = [
  { name: "pglite (memory)", backend: () => ({ kind: "pglite" }), enabled: true },
  {
    name: "postgres",
    backend: () => ({ kind: "postgres", url: TEST_DATABASE_URL ?? "" }),
    enabled: !!TEST_DATABASE_URL,
  },
];

const bytea = customType<{ data: Uint8Array; driverData: Uint8Array }>({ dataType: () => "bytea" });

/** Posts raw JSON to /sql as the driver would, for what the driver hides (status, exact body). */
async function postSql(local: NeonLocal, body: string, headers: Record<string, string> = {}) {
  return fetch(local.sqlEndpoint, {
    method: "POST",
    body,
    headers: {
      "Neon-Connection-String": local.connectionString,
      "Neon-Array-Mode": "true",
      "Neon-Raw-Text-Output": "true",
      ...headers,
    },
  });
}

async function rejection(promise: Promise<unknown>): Promise<Record<string, unknown> & Error> {
  try {
    await promise;
  } catch (error) {
    return error as Record<string, unknown> & Error;
  }
  throw new Error("expected a rejection");
}

describe.each(backends)("neon-local on $name", ({ backend, enabled }) => {
  describe.skipIf(!enabled)("protocol", () => {
    // Each run gets its own schema, so a shared PostgreSQL is left as it was found.
    const schemaName = `neon_local_test_${process.pid}_${Date.now()}`;
    const schema = pgSchema(schemaName);
    const accounts = schema.table("accounts", {
      id: integer("id").primaryKey(),
      email: text("email").notNull().unique(),
      balance: bigint("balance", { mode: "bigint" }),
      rate: numeric("rate"),
      active: boolean("active"),
      createdAt: timestamp("created_at", { withTimezone: true }),
      profile: jsonb("profile"),
      secret: bytea("secret"),
      tags: text("tags").array(),
      scores: integer("scores").array(),
    });

    let local: NeonLocal;
    let sql: NeonQueryFunction<false, false>;
    let db: NeonHttpDatabase;

    beforeAll(async () => {
      local = await startNeonLocal({ backend: backend() });
      sql = neon(local.connectionString);
      db = drizzle({ client: sql });
      await sql.query(`CREATE SCHEMA ${schemaName}`);
      await sql.query(`
        CREATE TABLE ${schemaName}.accounts (
          id integer PRIMARY KEY, email text NOT NULL CONSTRAINT accounts_email_unique UNIQUE,
          balance bigint, rate numeric, active boolean, created_at timestamptz, profile jsonb,
          secret bytea, tags text[], scores integer[])`);
    });
    afterAll(async () => {
      if (!local) return;
      await sql.query(`DROP SCHEMA IF EXISTS ${schemaName} CASCADE`).catch(() => undefined);
      await local.close();
    });
    beforeEach(async () => {
      await sql.query(`TRUNCATE ${schemaName}.accounts`);
    });

    it("answers health, CORS preflight and refuses other methods on /sql", async () => {
      const health = await fetch(`${local.url}/health`);
      expect(health.status).toBe(200);
      expect(await health.json()).toEqual({ ok: true });
      const preflight = await fetch(local.sqlEndpoint, { method: "OPTIONS" });
      expect(preflight.status).toBe(204);
      expect(preflight.headers.get("access-control-allow-origin")).toBe("*");
      expect(preflight.headers.get("access-control-allow-headers")).toMatch(/Neon-Connection-String/);
      expect((await fetch(local.sqlEndpoint)).status).toBe(405);
    });

    it("round-trips every common type exactly through neon()", async () => {
      const created = new Date("2024-02-29T23:59:58.123Z");
      const tricky = `quote " backslash \\ comma , brace { } unicode é 😀 newline\n`;
      await sql.query(
        `INSERT INTO ${schemaName}.accounts VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10), (2,'null@x',NULL,NULL,NULL,NULL,NULL,NULL,NULL,NULL)`,
        [
          1,
          tricky,
          9007199254740993n,
          "12345678901234567890.000000000000000001",
          false,
          created,
          { nested: { a: [1, "two", null], b: true }, 'k"ey': "v" },
          new Uint8Array([0, 1, 127, 128, 255]),
          ['a"b', null, "c,d", "", "NULL"],
          [1, -2, 2147483647],
        ],
      );
      const rows = await sql.query(`SELECT * FROM ${schemaName}.accounts ORDER BY id`);
      expect(rows[0]).toMatchObject({
        id: 1,
        email: tricky,
        balance: "9007199254740993",
        rate: "12345678901234567890.000000000000000001",
        active: false,
        // drizzle-orm/neon-http, once constructed, globally sets the driver's date/time parsers to
        // pass-through (it parses them itself), so neon() hands back PostgreSQL's text here.
        created_at: "2024-02-29 23:59:58.123+00",
        profile: { nested: { a: [1, "two", null], b: true }, 'k"ey': "v" },
        tags: ['a"b', null, "c,d", "", "NULL"],
        scores: [1, -2, 2147483647],
      });
      expect([...(rows[0]!.secret as Uint8Array)]).toEqual([0, 1, 127, 128, 255]);
      expect(rows[1]).toEqual({
        id: 2,
        email: "null@x",
        balance: null,
        rate: null,
        active: null,
        created_at: null,
        profile: null,
        secret: null,
        tags: null,
        scores: null,
      });
    });

    it("sends PostgreSQL's text output with real type OIDs, in a UTC ISO session", async () => {
      const response = await postSql(
        local,
        JSON.stringify({
          query:
            "SELECT $1::timestamptz AS t, true AS b, '{1,2}'::int[] AS a, '\\x0102'::bytea AS x, NULL::text AS n, current_setting('DateStyle') AS ds",
          params: ["2024-01-01T00:00:00.000Z"],
        }),
      );
      expect(response.status).toBe(200);
      expect(response.headers.get("content-type")).toMatch(/^application\/json/);
      const body = (await response.json()) as {
        fields: { name: string; dataTypeID: number }[];
        rows: unknown[][];
      } & Record<string, unknown>;
      expect(body.fields.map((f) => [f.name, f.dataTypeID])).toEqual([
        ["t", 1184],
        ["b", 16],
        ["a", 1007],
        ["x", 17],
        ["n", 25],
        ["ds", 25],
      ]);
      expect(body.rows).toEqual([["2024-01-01 00:00:00+00", "t", "{1,2}", "\\x0102", null, "ISO, MDY"]]);
      expect(body).toMatchObject({ command: "SELECT", rowCount: 1, rowAsArray: true });
      for (const field of body.fields)
        expect(Object.keys(field).sort()).toEqual([
          "columnID",
          "dataTypeID",
          "dataTypeModifier",
          "dataTypeSize",
          "format",
          "name",
          "tableID",
        ]);
    });

    it("reports the command word and row count, with fullResults", async () => {
      const full = neon(local.connectionString, { fullResults: true });
      const inserted = await full.query(
        `INSERT INTO ${schemaName}.accounts (id, email) VALUES (1,'a'),(2,'b'),(3,'c')`,
      );
      expect(inserted).toMatchObject({ command: "INSERT", rowCount: 3, fields: [] });
      const updated = await full.query(`UPDATE ${schemaName}.accounts SET active = true WHERE id > $1`, [1]);
      expect(updated).toMatchObject({ command: "UPDATE", rowCount: 2 });
      const created = await full.query(`CREATE TEMP TABLE IF NOT EXISTS scratch (x int)`);
      expect(created).toMatchObject({ command: "CREATE", rowCount: null });
    });

    it("round-trips through drizzle neon-http: insert returning, select, update", async () => {
      const createdAt = new Date("2030-01-02T03:04:05.678Z");
      const [row] = await db
        .insert(accounts)
        .values({
          id: 7,
          email: "d@x",
          balance: -(2n ** 62n),
          rate: "0.10",
          active: true,
          createdAt,
          profile: { scopes: ["read", "write"] },
          secret: new Uint8Array([222, 173, 190, 239]),
          tags: ["x", "y z"],
          scores: [3, 4],
        })
        .returning();
      expect(row).toMatchObject({
        id: 7,
        email: "d@x",
        balance: -(2n ** 62n),
        rate: "0.10",
        active: true,
        createdAt,
        profile: { scopes: ["read", "write"] },
        tags: ["x", "y z"],
        scores: [3, 4],
      });
      expect([...(row?.secret ?? [])]).toEqual([222, 173, 190, 239]);

      const updated = await db
        .update(accounts)
        .set({ active: false })
        .where(eq(accounts.id, 7))
        .returning({ active: accounts.active });
      expect(updated).toEqual([{ active: false }]);
      const selected = await db
        .select({ createdAt: accounts.createdAt, n: dsql<number>`count(*) over ()`.mapWith(Number) })
        .from(accounts);
      expect(selected).toEqual([{ createdAt, n: 1 }]);
    });

    it("turns a unique violation into a driver error with code 23505 and the constraint", async () => {
      await db.insert(accounts).values({ id: 1, email: "dup@x" });
      const error = await rejection(db.insert(accounts).values({ id: 2, email: "dup@x" }));
      const cause = (error.cause ?? error) as Record<string, unknown>;
      expect(cause).toMatchObject({
        code: "23505",
        constraint: "accounts_email_unique",
        table: "accounts",
        schema: schemaName,
        severity: "ERROR",
      });
      expect(cause.detail).toMatch(/dup@x/);
    });

    it("rolls a failing drizzle batch back entirely and commits a good one", async () => {
      await db.batch([
        db.insert(accounts).values({ id: 1, email: "one@x" }),
        db.insert(accounts).values({ id: 2, email: "two@x" }),
      ]);
      const error = await rejection(
        db.batch([
          db.insert(accounts).values({ id: 3, email: "three@x" }),
          db.update(accounts).set({ active: true }).where(eq(accounts.id, 1)),
          db.insert(accounts).values({ id: 4, email: "one@x" }),
        ]),
      );
      expect(((error.cause ?? error) as Record<string, unknown>).code).toBe("23505");
      const rows = await db.select({ id: accounts.id, active: accounts.active }).from(accounts).orderBy(accounts.id);
      expect(rows).toEqual([
        { id: 1, active: null },
        { id: 2, active: null },
      ]);
    });

    it("honours the batch isolation, read-only and deferrable headers", async () => {
      const [level, readOnly, deferrable] = await sql.transaction(
        [sql`SHOW transaction_isolation`, sql`SHOW transaction_read_only`, sql`SHOW transaction_deferrable`],
        { isolationLevel: "Serializable", readOnly: true, deferrable: true },
      );
      expect([level, readOnly, deferrable]).toEqual([
        [{ transaction_isolation: "serializable" }],
        [{ transaction_read_only: "on" }],
        [{ transaction_deferrable: "on" }],
      ]);
      const [plain] = await sql.transaction([sql`SHOW transaction_isolation`]);
      expect(plain).toEqual([{ transaction_isolation: "read committed" }]);
      const error = await rejection(
        sql.transaction([sql`INSERT INTO ${sql.unsafe(schemaName)}.accounts (id, email) VALUES (1, 'ro')`], {
          readOnly: true,
        }),
      );
      expect(error.code).toBe("25006");
      const bad = await postSql(local, JSON.stringify({ queries: [{ query: "SELECT 1" }] }), {
        "Neon-Batch-Isolation-Level": "Chaos",
      });
      expect(bad.status).toBe(400);
      expect(await bad.json()).toMatchObject({ code: "", severity: "" });
    });

    it("refuses two statements in one query, as Neon does", async () => {
      const error = await rejection(
        sql.query(`INSERT INTO ${schemaName}.accounts (id, email) VALUES (1, 'a'); SELECT 1`),
      );
      expect(error.code).toBe("42601");
      expect(await sql.query(`SELECT count(*)::int AS n FROM ${schemaName}.accounts`)).toEqual([{ n: 0 }]);
      await expect(sql.query("SELECT 1; SELECT 2")).rejects.toMatchObject({ code: "42601" });
    });

    it("answers a PostgreSQL error with 400 and exactly the documented keys", async () => {
      const response = await postSql(local, JSON.stringify({ query: "SELECT nope FROM nowhere", params: [] }));
      expect(response.status).toBe(400);
      const body = (await response.json()) as Record<string, unknown>;
      expect(Object.keys(body).sort()).toEqual(ERROR_KEYS);
      expect(body).toMatchObject({
        code: "42P01",
        severity: "ERROR",
        position: "18",
        hint: null,
        detail: null,
        constraint: null,
      });
      expect(body.message).toMatch(/nowhere/);
      const error = await rejection(sql.query("SELECT nope FROM nowhere"));
      expect(error).toMatchObject({ code: "42P01", position: "18" });
    });

    it("answers an unparseable body or a missing connection string with 400, code and severity empty", async () => {
      for (const [body, headers] of [
        ["{not json", {}],
        [JSON.stringify({ query: 42 }), {}],
        [JSON.stringify({ query: "SELECT 1" }), { "Neon-Connection-String": "not a url" }],
      ] as const) {
        const response = await postSql(local, body, headers);
        expect(response.status).toBe(400);
        const parsed = (await response.json()) as Record<string, unknown>;
        expect(Object.keys(parsed).sort()).toEqual(ERROR_KEYS);
        expect(parsed).toMatchObject({ code: "", severity: "", detail: null });
      }
      const noHeader = await fetch(local.sqlEndpoint, { method: "POST", body: JSON.stringify({ query: "SELECT 1" }) });
      expect(noHeader.status).toBe(400);
      // Any Content-Type (the driver sends none) and a missing params are fine.
      const ok = await postSql(local, JSON.stringify({ query: "SELECT 1 AS one" }), { "Content-Type": "text/plain" });
      expect(await ok.json()).toMatchObject({ rows: [["1"]] });
    });

    it("answers 413 to a body over the limit, through the driver too", async () => {
      const huge = "x".repeat(10 * 1024 * 1024 + 1);
      const error = await rejection(sql.query("SELECT length($1) AS n", [huge]));
      expect(error.message).toMatch(/HTTP status 413/);
      // Just under the limit still works.
      const fits = "y".repeat(1024 * 1024);
      expect(await sql.query("SELECT length($1)::int AS n", [fits])).toEqual([{ n: fits.length }]);
    });

    it("counts round trips, queries and batches", async () => {
      local.resetStats();
      await sql`SELECT 1`;
      await sql.query("SELECT 2");
      await db.batch([db.select().from(accounts), db.select().from(accounts), db.select().from(accounts)]);
      await rejection(sql.query("SELECT broken("));
      expect(local.stats()).toEqual({ requests: 4, queries: 6, batches: 1 });
      expect(await (await fetch(`${local.url}/stats`)).json()).toEqual({ requests: 4, queries: 6, batches: 1 });
      const reset = await fetch(`${local.url}/stats/reset`, { method: "POST" });
      expect(reset.status).toBe(200);
      expect(local.stats()).toEqual({ requests: 0, queries: 0, batches: 0 });
    });

    it("counts round trips per connection-string user, so concurrent clients can count their own", async () => {
      local.resetStats();
      const url = new URL(local.connectionString);
      url.username = "counted_user";
      const mine = neon(url.toString());
      await mine`SELECT 1`;
      await mine.query("SELECT 2");
      await sql`SELECT 3`;
      const byUser = async (user: string) => (await fetch(`${local.url}/stats?user=${user}`)).json();
      expect(await byUser("counted_user")).toEqual({ requests: 2, queries: 2, batches: 0 });
      expect(await byUser("nobody")).toEqual({ requests: 0, queries: 0, batches: 0 });
      expect(local.stats().requests).toBe(3);
      await fetch(`${local.url}/stats/reset`, { method: "POST" });
      expect(await byUser("counted_user")).toEqual({ requests: 0, queries: 0, batches: 0 });
    });

    it("waits the injected latency before answering each query, and refuses a bad one", async () => {
      const setLatency = (body: unknown) =>
        fetch(`${local.url}/admin/latency`, { method: "POST", body: JSON.stringify(body) });
      expect((await setLatency({ ms: -1 })).status).toBe(400);
      expect((await setLatency({ ms: "80" })).status).toBe(400);
      expect((await setLatency({ ms: 150 })).status).toBe(200);
      try {
        const started = performance.now();
        expect(await sql`SELECT 1 AS n`).toEqual([{ n: 1 }]);
        expect(performance.now() - started).toBeGreaterThanOrEqual(145);
      } finally {
        expect((await setLatency({ ms: 0 })).status).toBe(200);
      }
    });

    it("fails only the statements that match every string of a scoped fault", async () => {
      const fail = (body: unknown) => fetch(`${local.url}/admin/fail`, { method: "POST", body: JSON.stringify(body) });
      expect((await fail({ mode: "down", match: ["SELECT $1::text", "doomed"] })).status).toBe(200);
      try {
        const error = await rejection(sql.query("SELECT $1::text AS v", ["doomed-value"]));
        expect(error.message).toMatch(/^Server error \(HTTP status 503\)/);
        // Same SQL, other parameter; other SQL, same parameter: both run.
        expect(await sql.query("SELECT $1::text AS v", ["fine"])).toEqual([{ v: "fine" }]);
        expect(await sql.query("SELECT upper($1) AS v", ["doomed"])).toEqual([{ v: "DOOMED" }]);
        // A batch fails as a whole when one of its statements matches.
        const batch = await rejection(
          db.batch([db.select().from(accounts), db.execute(dsql`SELECT ${"doomed"}::text`)]),
        );
        expect(String((batch.cause as Error | undefined)?.message ?? batch.message)).toMatch(/HTTP status 503/);
      } finally {
        await fail({ mode: "ok" });
      }
      expect(await sql.query("SELECT $1::text AS v", ["doomed"])).toEqual([{ v: "doomed" }]);
      // "=v": a parameter equal to v, not one containing it (id 57 is not id 157).
      expect((await fail({ mode: "down", match: ["SELECT $1::int", "=57"] })).status).toBe(200);
      try {
        expect(await sql.query("SELECT $1::int AS v", [157])).toEqual([{ v: 157 }]);
        const error = await rejection(sql.query("SELECT $1::int AS v", [57]));
        expect(error.message).toMatch(/HTTP status 503/);
      } finally {
        await fail({ mode: "ok" });
      }
      expect((await fail({ mode: "down", match: [] })).status).toBe(400);
      expect((await fail({ mode: "down", match: [1] })).status).toBe(400);
      expect((await fail({ mode: "down", match: ["="] })).status).toBe(400);
      expect((await fail({ mode: "ok", id: "1" })).status).toBe(400);
      expect((await fail({ mode: "down", id: 1 })).status).toBe(400);
    });

    it("clears one scoped fault by its id, leaving another client's in place", async () => {
      const fail = (body: unknown) => fetch(`${local.url}/admin/fail`, { method: "POST", body: JSON.stringify(body) });
      const mine = (await (await fail({ mode: "down", match: ["=mine"] })).json()) as { id: number };
      const theirs = (await (await fail({ mode: "down", match: ["=theirs"] })).json()) as { id: number };
      expect(mine.id).not.toBe(theirs.id);
      try {
        expect((await fail({ mode: "ok", id: mine.id })).status).toBe(200);
        expect(await sql.query("SELECT $1::text AS v", ["mine"])).toEqual([{ v: "mine" }]);
        expect((await rejection(sql.query("SELECT $1::text AS v", ["theirs"]))).message).toMatch(/HTTP status 503/);
      } finally {
        await fail({ mode: "ok" });
      }
      expect(await sql.query("SELECT $1::text AS v", ["theirs"])).toEqual([{ v: "theirs" }]);
      expect((await fail({ mode: "ok", match: ["x"] })).status).toBe(400);
    });

    it("plays dead in 'down' mode and recovers", async () => {
      const down = await fetch(`${local.url}/admin/fail`, { method: "POST", body: JSON.stringify({ mode: "down" }) });
      expect(down.status).toBe(200);
      try {
        const error = await rejection(sql`SELECT 1`);
        expect(error.message).toMatch(/^Server error \(HTTP status 503\)/);
        const wrapped = await rejection(db.select().from(accounts));
        expect(String((wrapped.cause as Error | undefined)?.message)).toMatch(/^Server error \(HTTP status 503\)/);
      } finally {
        await fetch(`${local.url}/admin/fail`, { method: "POST", body: JSON.stringify({ mode: "ok" }) });
      }
      expect(await sql`SELECT 1 AS one`).toEqual([{ one: 1 }]);
      const bad = await fetch(`${local.url}/admin/fail`, {
        method: "POST",
        body: JSON.stringify({ mode: "sideways" }),
      });
      expect(bad.status).toBe(400);
    });

    it("runs concurrent requests and batches without mixing them up", async () => {
      const work = Array.from({ length: 20 }, (_, i) =>
        i % 2 === 0
          ? sql.query("SELECT $1::int * 2 AS n, pg_sleep(0.001)::text AS s", [i]).then((rows) => rows[0]?.n)
          : db
              .batch([
                db.insert(accounts).values({ id: i, email: `c${i}@x` }),
                db.select({ id: accounts.id }).from(accounts).where(eq(accounts.id, i)),
              ])
              .then(([, rows]) => (rows[0]?.id ?? -1) * 2),
      );
      expect(await Promise.all(work)).toEqual(Array.from({ length: 20 }, (_, i) => i * 2));
      expect(await sql.query(`SELECT count(*)::int AS n FROM ${schemaName}.accounts`)).toEqual([{ n: 10 }]);
    });
  });
});

describe("neon-local PGlite data directory", () => {
  let dir: string;
  let first: NeonLocal;
  // Creating a data directory runs PostgreSQL's initdb in WebAssembly: 3 s on a quiet machine, over
  // 25 s on a loaded one, which the test's own 30 s budget did not always cover. It is set-up, like
  // the in-memory server's start above, so it runs in the hook (60 s); the test itself only writes,
  // closes and reopens (a reopen is some 3 s even under load).
  beforeAll(async () => {
    dir = await mkdtemp(join(tmpdir(), "neon-local-test-"));
    first = await startNeonLocal({ backend: { kind: "pglite", dataDir: dir } });
  });
  afterAll(async () => {
    await first?.close();
    await rm(dir, { recursive: true, force: true });
  });

  it("keeps its data across a close and a restart", async () => {
    // One directory, one owner: a second open is refused while the first is up.
    await expect(startNeonLocal({ backend: { kind: "pglite", dataDir: dir } })).rejects.toThrow(/already open/);
    const firstSql = neon(first.connectionString);
    await firstSql.query("CREATE TABLE kept (id int PRIMARY KEY, note text)");
    await firstSql.transaction([
      firstSql`INSERT INTO kept VALUES (1, 'survives')`,
      firstSql`INSERT INTO kept VALUES (2, ${"restart"})`,
    ]);
    await first.close();
    await first.close(); // idempotent
    await expect(fetch(`${first.url}/health`)).rejects.toThrow();

    const second = await startNeonLocal({ backend: { kind: "pglite", dataDir: dir } });
    try {
      const secondSql = neon(second.connectionString);
      expect(await secondSql.query("SELECT * FROM kept ORDER BY id")).toEqual([
        { id: 1, note: "survives" },
        { id: 2, note: "restart" },
      ]);
    } finally {
      await second.close();
    }
  });
});
