/**
 * `npm run bench:console` (also run by `npm run bench`): the console's branch list at 10,000 branches.
 *
 *   1. Seeds BENCH_CONSOLE_BRANCHES (10,000) branches straight into the local database in bulk
 *      INSERTs (never thousands of HTTP calls), with client secrets and tokens sealed by the Worker's
 *      own key and binding (src/lib/crypto.ts), spread over every status, some deactivated and some
 *      with an older token row, as a long-running deployment has them.
 *   2. Calls `listBranches` (src/services/branch-list.ts) directly, over the same driver and local
 *      database: the first page, a status-filtered page, a search and a later page (cursor); p50/p99
 *      and SQL round trips per call; EXPLAIN ANALYZE of the first page's statement.
 *   3. When the console is there (GET /console/sign-in answers 200), the same pages through the
 *      Worker in workerd, signed in with a session cookie, against the floor (bench/floor-worker.ts
 *      `/floor`: one indexed SELECT through the same driver): p50/p99 at one connection and SQL round
 *      trips per page (neon-local's /stats).
 *
 * Knobs: BENCH_CONSOLE_BRANCHES (10000), BENCH_CONSOLE_SAMPLES (direct calls per query, 60),
 * BENCH_CONSOLE_DURATION_MS (per page measurement through the Worker, 3000), BENCH_CONSOLE_LIMIT (50),
 * BENCH_CONSOLE_DATABASE_URL (unset: PGlite; else a throwaway PostgreSQL database behind neon-local,
 * whose public schema the bench drops and recreates).
 */
import { mkdtempSync, rmSync } from "node:fs";
import { cpus, loadavg, tmpdir } from "node:os";
import { join } from "node:path";
import { pathToFileURL } from "node:url";
import { neon, neonConfig } from "@neondatabase/serverless";
import { eq } from "drizzle-orm";
import { drizzle } from "drizzle-orm/neon-http";
import * as stack from "../dev/local-stack.ts";
import { startNeonLocal } from "../dev/neon-local/server.ts";
import { type OAuthServer, startOAuthServer } from "../dev/oauth-server/server.ts";
import { applyMigrations } from "../scripts/migrate.ts";
import * as schema from "../src/db/schema.ts";
import { loadKeyring, seal } from "../src/lib/crypto.ts";
import { BRANCH_STATUSES, type BranchListQuery, type BranchStatus, listBranches } from "../src/services/branch-list.ts";
import { ADOPT_LEGACY_ROWS } from "./legacy-rows.ts";
import { type LoadResult, load } from "./load.ts";

const POSTGRES_URL = process.env.BENCH_CONSOLE_DATABASE_URL;
const RESULTS = stack.resultsPath(POSTGRES_URL ? "bench/console-results-postgres.json" : "bench/console-results.json");
const BRANCHES = stack.benchKnob("BENCH_CONSOLE_BRANCHES", 10_000, 200);
const SAMPLES = stack.benchKnob("BENCH_CONSOLE_SAMPLES", 60, 3);
const DURATION_MS = stack.benchKnob("BENCH_CONSOLE_DURATION_MS", 3000, 150);
const LIMIT = stack.benchKnob("BENCH_CONSOLE_LIMIT", 50, 50);
/** Rows per INSERT statement while seeding (well under neon-local's 10 MB body limit). */
const SEED_CHUNK_ROWS = 1_000;
/** Sequential requests whose SQL round trips are counted per page. */
const ROUND_TRIP_SAMPLES = 20;
const WARMUP_MS = 500;

const log = (message: string) => console.log(`[bench:console] ${message}`);
const round = (value: number, digits = 2) => Math.round(value * 10 ** digits) / 10 ** digits;
const percentile = (values: number[], p: number) => {
  const sorted = [...values].sort((a, b) => a - b);
  return sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))]!;
};

// ---------------------------------------------------------------------------------------------
// The database: PGlite in a child process (as `npm run bench`), or a PostgreSQL server.

async function openDatabase(): Promise<{ db: stack.LocalDatabase; backend: string; stop(): Promise<void> }> {
  if (!POSTGRES_URL) {
    const db = await stack.startDatabase();
    return { db, backend: "PGlite (memory), own process", stop: () => stack.stopDatabase(db, 5000) };
  }
  const server = await startNeonLocal({ backend: { kind: "postgres", url: POSTGRES_URL } });
  // In process: the database work happens in the PostgreSQL server. No child to stop.
  const db = { url: server.url, sqlEndpoint: server.sqlEndpoint, connectionString: server.connectionString };
  const local = db as stack.LocalDatabase;
  for (const statement of [
    "drop schema if exists drizzle cascade",
    "drop schema public cascade",
    "create schema public",
  ]) {
    await stack.sql(local, statement);
  }
  return { db: local, backend: server.description, stop: () => server.close() };
}

// ---------------------------------------------------------------------------------------------
// Seeding.

/**
 * Which status branch `i` is seeded in: per 100 branches 4 needs_reauth, 2 credentials_rejected,
 * 4 degraded, 3 revoked, 10 never connected, 77 connected; every 50th branch is deactivated and
 * every 5th has an older, superseded token row.
 */
export function seededStatus(i: number): BranchStatus {
  const slot = i % 100;
  if (slot < 4) return "needs_reauth";
  if (slot < 6) return "credentials_rejected";
  if (slot < 10) return "degraded";
  if (slot < 13) return "revoked";
  if (slot < 23) return "never_connected";
  return "connected";
}

/** Branch ids sort apart from their seeding order, as real ones do. */
const branchIdOf = (i: number) => `branch-${((i * 7919) % BRANCHES).toString().padStart(5, "0")}-${i}`;

export async function seed(db: stack.LocalDatabase, encryptionKey: string, now: Date): Promise<Record<string, number>> {
  const keyring = await loadKeyring(encryptionKey);
  const expected: Record<string, number> = { total: BRANCHES, inactive: 0 };
  for (const status of BRANCH_STATUSES) expected[status] = 0;
  let tokenId = 0;
  const iso = (offsetSeconds: number) => new Date(now.getTime() + offsetSeconds * 1000).toISOString();
  for (let start = 0; start < BRANCHES; start += SEED_CHUNK_ROWS) {
    const clientRows: Record<string, unknown>[] = [];
    const tokenRows: Record<string, unknown>[] = [];
    for (let i = start; i < Math.min(BRANCHES, start + SEED_CHUNK_ROWS); i++) {
      const id = i + 1;
      const status = seededStatus(i);
      const inactive = i % 50 === 49;
      expected[status]!++;
      if (inactive) expected.inactive!++;
      clientRows.push({
        id,
        client_id: `bench-oauth-client-${i}`,
        client_secret: await seal(keyring, `bench-secret-${i}`, { column: "clients.client_secret", clientId: id }),
        redirect_uri: "http://127.0.0.1/token-management/auth/callback",
        branch_id: branchIdOf(i),
        workspace_email: `ops-${i}@workspace-${i % 997}.example.com`,
        workspace_name: `Workspace ${i % 997} ${["North", "South", "East", "West"][i % 4]}`,
        is_active: !inactive,
        credentials_rejected_at: status === "credentials_rejected" ? iso(-600) : null,
      });
      if (status === "never_connected") continue;
      const sealedToken = async (kind: "access" | "refresh") =>
        seal(keyring, `bench-${kind}-${i}-${tokenId}`, { column: `tokens.${kind}_token`, clientId: id });
      if (i % 5 === 0) {
        tokenId++;
        tokenRows.push({
          id: tokenId,
          client_id: id,
          access_token: await sealedToken("access"),
          refresh_token: await sealedToken("refresh"),
          expires_at: iso(-86_400),
          is_valid: false,
          status: "active",
          last_refreshed_at: iso(-90_000),
          failure_count: 0,
          last_error: null,
          next_attempt_at: null,
        });
      }
      tokenId++;
      const dead = status === "needs_reauth" || status === "revoked";
      tokenRows.push({
        id: tokenId,
        client_id: id,
        access_token: await sealedToken("access"),
        refresh_token: await sealedToken("refresh"),
        expires_at: iso((i % 3600) - 300),
        is_valid: !dead,
        status: status === "needs_reauth" ? "needs_reauth" : status === "revoked" ? "revoked" : "active",
        last_refreshed_at: iso(-(i % 3000)),
        failure_count: status === "degraded" ? 3 + (i % 3) : 0,
        last_error:
          status === "degraded" ? "provider answered 503" : status === "needs_reauth" ? "invalid_grant" : null,
        next_attempt_at: status === "degraded" ? iso(120) : null,
        lifetime_seconds: 3600,
      });
    }
    await stack.sql(
      db,
      `insert into clients (id, client_id, client_secret, redirect_uri, branch_id, workspace_email, workspace_name, is_active, credentials_rejected_at)
       select id, client_id, client_secret, redirect_uri, branch_id, workspace_email, workspace_name, is_active, credentials_rejected_at
       from json_populate_recordset(null::clients, $1::json)`,
      [JSON.stringify(clientRows)],
    );
    await stack.sql(
      db,
      `insert into tokens (id, client_id, access_token, refresh_token, expires_at, is_valid, status, last_refreshed_at, failure_count, last_error, next_attempt_at, lifetime_seconds)
       select id, client_id, access_token, refresh_token, expires_at, is_valid, status, last_refreshed_at, failure_count, last_error, next_attempt_at, lifetime_seconds
       from json_populate_recordset(null::tokens, $1::json)`,
      [JSON.stringify(tokenRows)],
    );
  }
  await stack.sql(db, "select setval(pg_get_serial_sequence('clients', 'id'), (select max(id) from clients))");
  for (const statement of ADOPT_LEGACY_ROWS) await stack.sql(db, statement);
  await stack.sql(db, "select setval(pg_get_serial_sequence('tokens', 'id'), (select max(id) from tokens))");
  await stack.sql(db, "analyze clients");
  await stack.sql(db, "analyze tokens");
  return expected;
}

// ---------------------------------------------------------------------------------------------
// Measuring.

interface Sampled {
  p50Ms: number;
  p99Ms: number;
  meanMs: number;
  samples: number;
  sqlRoundTripsPerCall: number;
  rows: number;
  p50VsFloor?: number;
}

async function requestsOf(db: stack.LocalDatabase, user: string): Promise<number> {
  return ((await (await fetch(`${db.url}/stats?user=${user}`)).json()) as { requests: number }).requests;
}

/** The queries measured: the first page, a filtered one, a search, and a page further on. */
function queries(cursor: string | null): Record<string, BranchListQuery> {
  return {
    first: { limit: LIMIT },
    filtered: { status: "needs_reauth", active: true, limit: LIMIT },
    search: { search: "workspace 42 ", limit: LIMIT },
    ...(cursor ? { later: { cursor, limit: LIMIT } } : {}),
  };
}

function consolePath(name: string, cursor: string | null): string {
  switch (name) {
    case "first":
      return "/console";
    case "filtered":
      return "/console?status=needs_reauth&active=true";
    case "search":
      return `/console?q=${encodeURIComponent("workspace 42 ")}`;
    default:
      return `/console?cursor=${encodeURIComponent(cursor ?? "")}`;
  }
}

/** Signs in as the console's sign-in form does; resolves to the Cookie header value. */
async function signIn(worker: string, adminKey: string): Promise<string | null> {
  const form = await fetch(`${worker}${stack.BASE_PATH}/console/sign-in`);
  const html = await form.text();
  if (form.status !== 200) return null;
  const csrf = /name="csrf"[^>]*value="([^"]*)"|value="([^"]*)"[^>]*name="csrf"/.exec(html);
  const formCookies = (form.headers.getSetCookie?.() ?? []).map((c) => c.split(";")[0]).filter(Boolean);
  const body = new URLSearchParams({ api_key: adminKey });
  if (csrf) body.set("csrf", csrf[1] ?? csrf[2] ?? "");
  const answer = await fetch(`${worker}${stack.BASE_PATH}/console/sign-in`, {
    method: "POST",
    redirect: "manual",
    headers: {
      "content-type": "application/x-www-form-urlencoded",
      origin: worker,
      ...(formCookies.length ? { cookie: formCookies.join("; ") } : {}),
    },
    body,
  });
  await answer.text();
  const cookies = (answer.headers.getSetCookie?.() ?? []).map((c) => c.split(";")[0]).filter(Boolean);
  if (answer.status !== 303 || cookies.length === 0) {
    throw new Error(`console sign-in answered ${answer.status} without a session cookie`);
  }
  return [...formCookies, ...cookies].join("; ");
}

function figures(result: LoadResult) {
  return {
    rps: round(result.rps, 0),
    p50Ms: round(result.p50Ms, 2),
    p99Ms: round(result.p99Ms, 2),
    requests: result.requests,
    non2xx: result.non2xx,
  };
}

async function main(): Promise<void> {
  const startedAt = new Date();
  const scratch = mkdtempSync(join(tmpdir(), "tm-bench-console-"));
  let db: stack.LocalDatabase | undefined;
  let stopDatabase: (() => Promise<void>) | undefined;
  let backend = "";
  let oauth: OAuthServer | undefined;
  const miniflares: stack.RunningWorker[] = [];
  try {
    const floorConfig = stack.floorWorkerConfig(scratch);
    const [app, floor] = await Promise.all([
      stack.bundleWorker(join(scratch, "app")),
      stack.bundleWorker(join(scratch, "floor"), floorConfig),
    ]);
    ({ db, backend, stop: stopDatabase } = await openDatabase());
    await applyMigrations(db.connectionString, db.sqlEndpoint);
    oauth = await startOAuthServer({ port: 0 });
    const adminKey = stack.randomApiKey();
    const bindings = stack.localBindings(db, oauth, { adminKey, serviceKey: stack.randomApiKey() });

    const seedStarted = performance.now();
    const expected = await seed(db, bindings.TOKEN_ENCRYPTION_KEY!, new Date());
    const seedMs = performance.now() - seedStarted;
    log(`seeded ${BRANCHES} branches in ${(seedMs / 1000).toFixed(1)} s: ${JSON.stringify(expected)}`);

    // 2. listBranches directly, under a database user of its own so its round trips are counted.
    const user = "bench_console_direct";
    const url = new URL(db.connectionString);
    url.username = user;
    neonConfig.fetchEndpoint = db.sqlEndpoint;
    const statements: { query: string; params: unknown[] }[] = [];
    const direct = drizzle({
      client: neon(url.toString()),
      logger: { logQuery: (query, params) => statements.push({ query, params }) },
    });

    const first = await listBranches(direct, { limit: LIMIT });
    const counted = { ...first.counts } as Record<string, number>;
    if (
      JSON.stringify(counted) !==
      JSON.stringify({
        ...Object.fromEntries(BRANCH_STATUSES.map((s) => [s, expected[s]])),
        total: expected.total,
        inactive: expected.inactive,
      })
    ) {
      throw new Error(`counts ${JSON.stringify(counted)} differ from the seeded ${JSON.stringify(expected)}`);
    }
    const plan = await stack.sql(
      db,
      `explain (analyze, buffers) ${statements.at(-1)!.query}`,
      statements.at(-1)!.params,
    );
    const planText = plan.map(([line]) => line).join("\n");

    const cursor = first.nextCursor;
    const directFigures: Record<string, Sampled> = {};
    // The floor: one indexed SELECT of one client through the same driver and database.
    const floorBranch = branchIdOf(BRANCHES - 1);
    const floorCall = async () =>
      (
        await direct
          .select({ id: schema.clients.id })
          .from(schema.clients)
          .where(eq(schema.clients.branchId, floorBranch))
      ).length;
    /** The first branch of each query's page, which the console's page must show too. */
    const firstBranchOf: Record<string, string> = {};
    const calls: [string, () => Promise<number>][] = [
      ["floor", floorCall],
      ...Object.entries(queries(cursor)).map(([name, query]): [string, () => Promise<number>] => [
        name,
        async () => {
          const page = await listBranches(direct, query);
          firstBranchOf[name] = page.rows[0]?.branchId ?? "";
          return page.rows.length;
        },
      ]),
    ];
    for (const [name, call] of calls) {
      await call(); // warm-up
      const before = await requestsOf(db, user);
      const times: number[] = [];
      let rows = 0;
      for (let i = 0; i < SAMPLES; i++) {
        const started = performance.now();
        rows = await call();
        times.push(performance.now() - started);
      }
      const trips = (await requestsOf(db, user)) - before;
      directFigures[name] = {
        p50Ms: round(percentile(times, 50)),
        p99Ms: round(percentile(times, 99)),
        meanMs: round(times.reduce((s, t) => s + t, 0) / times.length),
        samples: SAMPLES,
        sqlRoundTripsPerCall: round(trips / SAMPLES, 2),
        rows,
        ...(name === "floor" ? {} : { p50VsFloor: round(percentile(times, 50) / directFigures.floor!.p50Ms, 1) }),
      };
      log(`listBranches ${name}: ${JSON.stringify(directFigures[name])}`);
    }

    // 3. Through the Worker, when the console is there.
    const [appWorker, floorWorker] = await Promise.all([
      stack.startWorker({ name: "token-management", bundle: app, bindings }),
      stack.startWorker({ name: "bench-floor", bundle: floor, bindings }),
    ]);
    miniflares.push(appWorker, floorWorker);
    const cookie = await signIn(appWorker.url, adminKey);
    let pages: Record<string, unknown> | null = null;
    if (cookie === null) {
      log("no console in this Worker (GET /console/sign-in is not 200): measured listBranches directly only");
    } else {
      pages = {};
      const floorUrl = `${floorWorker.url}/floor?branch=${branchIdOf(BRANCHES - 1)}`;
      const floorResult = await load({ url: floorUrl, connections: 1, durationMs: DURATION_MS, warmupMs: WARMUP_MS });
      pages.floor = figures(floorResult);
      for (const name of Object.keys(queries(cursor))) {
        const pageUrl = `${appWorker.url}${stack.BASE_PATH}${consolePath(name, cursor)}`;
        const check = await fetch(pageUrl, { headers: { cookie } });
        const html = await check.text();
        if (check.status !== 200 || !html.includes('id="branches"') || !html.includes(firstBranchOf[name]!)) {
          throw new Error(
            `${pageUrl} answered ${check.status}, not the branch list starting at ${firstBranchOf[name]}`,
          );
        }
        const result = await load({
          url: pageUrl,
          headers: { cookie },
          connections: 1,
          durationMs: DURATION_MS,
          warmupMs: WARMUP_MS,
        });
        await fetch(`${db.url}/stats/reset`, { method: "POST" });
        for (let i = 0; i < ROUND_TRIP_SAMPLES; i++) await (await fetch(pageUrl, { headers: { cookie } })).text();
        const trips = ((await (await fetch(`${db.url}/stats`)).json()) as { requests: number }).requests;
        pages[name] = {
          ...figures(result),
          p50VsFloor: round(result.p50Ms / floorResult.p50Ms, 2),
          sqlRoundTripsPerPage: round(trips / ROUND_TRIP_SAMPLES, 2),
          htmlBytes: html.length,
        };
        log(`GET ${consolePath(name, cursor).slice(0, 40)}: ${JSON.stringify(pages[name])}`);
      }
    }

    const report = {
      date: startedAt.toISOString(),
      machine: { cores: cpus().length, loadavgAtEnd: loadavg().map((v) => round(v, 2)), node: process.version },
      database: backend,
      branches: BRANCHES,
      seeded: expected,
      seedMs: round(seedMs, 0),
      pageLimit: LIMIT,
      listBranchesDirect: directFigures,
      consolePages: pages,
      firstPagePlan: planText,
    };
    stack.writeResults(RESULTS, report);
    console.log(planText);
    console.log(JSON.stringify({ ...report, firstPagePlan: undefined }, null, 2));
  } finally {
    for (const worker of miniflares) await worker.mf.dispose().catch(() => undefined);
    await oauth?.close().catch(() => undefined);
    await stopDatabase?.();
    rmSync(scratch, { recursive: true, force: true });
  }
}

if (import.meta.url === pathToFileURL(process.argv[1] ?? "").href)
  main().catch((error: unknown) => {
    console.error(`[bench:console] failed: ${error instanceof Error ? (error.stack ?? error.message) : String(error)}`);
    process.exit(1);
  });
