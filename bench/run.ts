/**
 * `npm run bench`: uncached token reads against a floor, a 1,000-token cron refresh, and the bundle size.
 * See BENCHMARKS.md. Everything runs locally and offline:
 *
 *   - the local database (dev/neon-local, PGlite in memory) in a child process, so its CPU work
 *     does not share an event loop with the load generator; its /stats counts SQL round trips;
 *   - the local authorization server (dev/oauth-server) in this process, with a response delay;
 *   - the real Worker, bundled by `wrangler deploy --dry-run --outdir` and run in workerd through
 *     Miniflare, and the floor Worker (bench/floor-worker.ts) bundled and run the same way.
 *
 * Environment knobs: BENCH_DURATION_MS (per measurement, default 4000), BENCH_ROUNDS (default 5),
 * BENCH_CRON_TOKENS (1000), BENCH_CRON_ROUNDS (3), BENCH_PROVIDER_DELAY_MS (50); BENCH_SMOKE=1 shrinks all
 * of them to a seconds-long run whose results go to a temporary file (dev/local-stack.ts).
 */
import { randomBytes } from "node:crypto";
import { mkdtempSync, readdirSync, readFileSync, rmSync, statSync, writeFileSync } from "node:fs";
import { cpus, loadavg, tmpdir, totalmem } from "node:os";
import { join } from "node:path";
import { gzipSync } from "node:zlib";
import type { Miniflare } from "miniflare";
import * as stack from "../dev/local-stack.ts";
import type { OAuthServer } from "../dev/oauth-server/server.ts";
import { ASSETS_DIR } from "../scripts/docs-assets.ts";
import { cpuBreakdown } from "./cpu.ts";
import { type LoadResult, load } from "./load.ts";

const RESULTS = stack.resultsPath("bench/results.json");

const DURATION_MS = stack.benchKnob("BENCH_DURATION_MS", 4000, 200);
const ROUNDS = stack.benchKnob("BENCH_ROUNDS", 5, 1);
const CRON_TOKENS = stack.benchKnob("BENCH_CRON_TOKENS", 1000, 12);
const CRON_ROUNDS = stack.benchKnob("BENCH_CRON_ROUNDS", 3, 1);
const PROVIDER_DELAY_MS = stack.benchKnob("BENCH_PROVIDER_DELAY_MS", 50, 5);
/** Workers' simultaneous outbound connections per invocation (the cron's provider concurrency). */
const OUTBOUND_CONNECTIONS = 6;
const SEED_CONCURRENCY = 16;
/** Requests for the exact SQL round trips per read, and iterations of the CPU breakdown. */
const EXACT_TRIP_READS = stack.BENCH_SMOKE ? 10 : 200;
const CPU_ITERATIONS = stack.BENCH_SMOKE ? 50 : 2000;
const FIRST_WARMUP_MS = stack.BENCH_SMOKE ? 100 : 1000;
const WARMUP_MS = stack.BENCH_SMOKE ? 50 : 300;

const log = (message: string) => console.log(`[bench] ${message}`);
const median = (values: number[]) => {
  const sorted = [...values].sort((a, b) => a - b);
  const mid = Math.floor(sorted.length / 2);
  return sorted.length % 2 ? sorted[mid]! : (sorted[mid - 1]! + sorted[mid]!) / 2;
};
const round = (value: number, digits = 2) => Math.round(value * 10 ** digits) / 10 ** digits;

// ---------------------------------------------------------------------------------------------
// Building.

interface Bundle extends stack.WorkerBundle {
  files: { name: string; bytes: number; gzipBytes: number }[];
  jsBytes: number;
  jsGzipBytes: number;
  wranglerReport: string | null;
}

/** Bundles with wrangler (dev/local-stack.ts), then measures the output: sizes raw and gzipped. */
async function buildBundle(outdir: string, configPath?: string): Promise<Bundle> {
  const bundle = await stack.bundleWorker(outdir, configPath);
  const files = readdirSync(outdir)
    .filter((name) => statSync(join(outdir, name)).isFile())
    .map((name) => {
      const content = readFileSync(join(outdir, name));
      return { name, bytes: content.length, gzipBytes: gzipSync(content).length };
    });
  const js = files.filter((f) => /\.(m?js|wasm)$/.test(f.name));
  return {
    ...bundle,
    files,
    jsBytes: js.reduce((s, f) => s + f.bytes, 0),
    jsGzipBytes: js.reduce((s, f) => s + f.gzipBytes, 0),
    wranglerReport: /Total Upload:[^\n]*/.exec(bundle.stdout)?.[0]?.trim() ?? null,
  };
}

/** The Worker's static assets (wrangler.toml [assets]; bundleWorker copied them): not part of the script. */
function staticAssetSizes(): { bytes: number; gzipBytes: number } {
  const files = (readdirSync(ASSETS_DIR, { recursive: true }) as string[])
    .map((name) => join(ASSETS_DIR, name))
    .filter((path) => statSync(path).isFile())
    .map((path) => readFileSync(path));
  return {
    bytes: files.reduce((sum, content) => sum + content.length, 0),
    gzipBytes: files.reduce((sum, content) => sum + gzipSync(content).length, 0),
  };
}

// ---------------------------------------------------------------------------------------------
// The local database (dev/local-stack.ts): its counters.

async function dbStats(db: stack.LocalDatabase): Promise<{ requests: number; queries: number; batches: number }> {
  return (await fetch(`${db.url}/stats`)).json() as Promise<{ requests: number; queries: number; batches: number }>;
}

async function resetDbStats(db: stack.LocalDatabase): Promise<void> {
  await fetch(`${db.url}/stats/reset`, { method: "POST" });
}

// ---------------------------------------------------------------------------------------------
// The authorization server (in process).

async function asAdmin(oauth: OAuthServer, method: string, path: string, body?: unknown): Promise<unknown> {
  const response = await fetch(`${oauth.url}${path}`, {
    method,
    headers: { "content-type": "application/json" },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (!response.ok) throw new Error(`${method} ${path}: ${response.status} ${await response.text()}`);
  return response.json();
}

interface AsStats {
  tokenRequests: number;
  refreshGrants: number;
  failedRequests: number;
}

// ---------------------------------------------------------------------------------------------
// Seeding: branches connected through the real flow (dev/local-stack.ts connectBranch).

function benchClient(index: number, runId: string) {
  return {
    client_id: `bench-${runId}-${index}`,
    client_secret: `bench-secret-${runId}-${index}`,
    branch_id: `bench-branch-${index}`,
    workspace_email: "bench@example.com",
    workspace_name: "Bench",
  };
}

async function forEachBounded(count: number, concurrency: number, run: (i: number) => Promise<void>): Promise<void> {
  let next = 0;
  await Promise.all(
    Array.from({ length: concurrency }, async () => {
      while (next < count) await run(next++);
    }),
  );
}

// ---------------------------------------------------------------------------------------------

interface ReadFigures {
  rps: number;
  p50Ms: number;
  p99Ms: number;
  requests: number;
  rounds: LoadResult[];
}

function summarise(results: LoadResult[]): ReadFigures {
  return {
    rps: round(median(results.map((r) => r.rps)), 0),
    p50Ms: round(median(results.map((r) => r.p50Ms)), 3),
    p99Ms: round(median(results.map((r) => r.p99Ms)), 3),
    requests: results.reduce((s, r) => s + r.requests, 0),
    rounds: results.map((r) => ({
      ...r,
      rps: round(r.rps, 1),
      p50Ms: round(r.p50Ms, 3),
      p90Ms: round(r.p90Ms, 3),
      p99Ms: round(r.p99Ms, 3),
      meanMs: round(r.meanMs, 3),
      durationMs: round(r.durationMs, 0),
    })),
  };
}

async function main(): Promise<void> {
  const startedAt = new Date();
  const t0 = performance.now();
  const scratch = mkdtempSync(join(tmpdir(), "tm-bench-"));
  let backends: stack.Backends | undefined;
  const miniflares: Miniflare[] = [];
  const workerLogs: string[] = [];
  try {
    // 1. Bundles (item 3 too).
    log("bundling the Worker and the floor Worker with wrangler deploy --dry-run");
    const floorConfig = stack.floorWorkerConfig(scratch);
    const cpuConfig = join(scratch, "cpu.wrangler.json");
    writeFileSync(
      cpuConfig,
      JSON.stringify({
        name: "bench-cpu",
        main: join(stack.ROOT, "bench/cpu-worker.ts"),
        compatibility_date: stack.COMPATIBILITY_DATE,
      }),
    );
    const [app, floor, cpuBundle] = await Promise.all([
      buildBundle(join(scratch, "app")),
      buildBundle(join(scratch, "floor"), floorConfig),
      buildBundle(join(scratch, "cpu"), cpuConfig),
    ]);
    log(`bundle: ${app.jsBytes} B, gzip ${app.jsGzipBytes} B (${app.wranglerReport ?? "no wrangler report"})`);
    const assets = staticAssetSizes();
    log(`static assets (the docs renderer, not in the bundle): ${assets.bytes} B, gzip ${assets.gzipBytes} B`);

    // 2. Database and authorization server.
    backends = await stack.startBackends();
    const { db, oauth, adminKey, serviceKey } = backends;
    log(`neon-local ${db.url} (PGlite in memory, own process); oauth-server ${oauth.url}`);

    // 3. Workers.
    const bindings: Record<string, string> = {
      ...backends.bindings,
      OAUTH_SCOPES: "https://www.googleapis.com/auth/business.manage",
      OAUTH_CLIENT_AUTH_METHOD: "client_secret_post",
      OAUTH_TIMEOUT_MS: "10000",
      REFRESH_AHEAD_SECONDS: "300",
      CRON_REFRESH_WINDOW_SECONDS: "900",
      CRON_MAX_REFRESHES: String(CRON_TOKENS),
      // The database read path against its one-SELECT floor: the edge cache (on by default, and
      // not used by the cron) is measured by bench/cache.ts against a trivial floor.
      TOKEN_CACHE_MAX_AGE_SECONDS: "0",
    };
    const start = async (name: string, bundle: Bundle): Promise<stack.RunningWorker> => {
      const worker = await stack.startWorker({
        name,
        bundle,
        bindings,
        onLog(entry) {
          workerLogs.push(JSON.stringify(entry));
          if (workerLogs.length > 200) workerLogs.shift();
        },
      });
      miniflares.push(worker.mf);
      return worker;
    };
    const [appMf, floorMf, cpuMf] = await Promise.all([
      start("token-management", app),
      start("bench-floor", floor),
      start("bench-cpu", cpuBundle),
    ]);
    log(`workerd: app ${appMf.url}, floor ${floorMf.url}`);

    // 4. Seed: branches connected through the real flow.
    const runId = randomBytes(4).toString("hex");
    const seedStarted = performance.now();
    await forEachBounded(CRON_TOKENS, SEED_CONCURRENCY, async (i) => {
      await stack.connectBranch(appMf.url, oauth, adminKey, benchClient(i, runId));
    });
    const seedMs = performance.now() - seedStarted;
    log(`connected ${CRON_TOKENS} branches through the real flow in ${(seedMs / 1000).toFixed(1)} s`);

    // 5. Token reads vs the floor.
    const branch = "bench-branch-0";
    const auth = { authorization: `Bearer ${serviceKey}` };
    const targets = {
      app: `${appMf.url}${stack.BASE_PATH}/tokens/${branch}`,
      floor: `${floorMf.url}/floor?branch=${branch}`,
    } as const;
    type Target = keyof typeof targets;
    for (const [name, url] of Object.entries(targets)) {
      const response = await fetch(url, { headers: auth });
      const text = await response.text();
      if (response.status !== 200) throw new Error(`${name}: ${response.status} ${text}`);
    }
    const plan: { target: Target; connections: number }[] = [
      { target: "floor", connections: 1 },
      { target: "app", connections: 1 },
      { target: "floor", connections: 16 },
      { target: "app", connections: 16 },
    ];
    const results = new Map<string, LoadResult[]>();
    for (let r = 0; r < ROUNDS; r++) {
      // Alternate the order each round so drift on a noisy machine does not favour one side.
      const order = r % 2 === 0 ? plan : [...plan].reverse();
      for (const { target, connections } of order) {
        const result = await load({
          url: targets[target],
          headers: auth,
          connections,
          durationMs: DURATION_MS,
          warmupMs: r === 0 ? FIRST_WARMUP_MS : WARMUP_MS,
        });
        if (result.non2xx || result.errors) {
          throw new Error(`${target} c${connections}: ${result.non2xx} non-2xx, ${result.errors} errors`);
        }
        const key = `${target}/c${connections}`;
        results.set(key, [...(results.get(key) ?? []), result]);
        log(
          `round ${r + 1}/${ROUNDS} ${key.padEnd(18)} ${result.rps.toFixed(0).padStart(6)} req/s  p50 ${result.p50Ms.toFixed(3)} ms  p99 ${result.p99Ms.toFixed(3)} ms`,
        );
      }
    }
    // Exact round trips per read: a fixed number of requests, stats reset just before.
    const exactTrips: Record<string, number> = {};
    for (const target of ["app", "floor"] as const) {
      await resetDbStats(db);
      const n = EXACT_TRIP_READS;
      for (let i = 0; i < n; i++) {
        const response = await fetch(targets[target], { headers: auth });
        await response.arrayBuffer();
      }
      exactTrips[target] = (await dbStats(db)).requests / n;
    }

    const fig = (key: string) => summarise(results.get(key)!);
    const read = {
      c1: { app: fig("app/c1"), floor: fig("floor/c1") },
      c16: { app: fig("app/c16"), floor: fig("floor/c16") },
    };
    const ratio = (a: number, b: number) => round(a / b, 3);
    // Floor and app run back to back in each round: the ratio of each pair, then the median.
    const pairedRatio = (c: string) => {
      const apps = results.get(`app/${c}`)!;
      const floors = results.get(`floor/${c}`)!;
      const ratios = apps.map((a, i) => a.p50Ms / floors[i]!.p50Ms);
      return { median: round(median(ratios), 3), rounds: ratios.map((x) => round(x, 3)) };
    };
    const paired = { c1: pairedRatio("c1"), c16: pairedRatio("c16") };

    log("CPU breakdown (in workerd, database answer replayed) and database time per query");
    const cpu = await cpuBreakdown({
      cpuWorkerUrl: cpuMf.url,
      branchId: branch,
      serviceKey,
      iterations: CPU_ITERATIONS,
    });
    const us = cpu.cpuUs;
    const breakdown = {
      cpuUs: us,
      cpuStepsUs: {
        "createDb with the schema (drizzle relational config) vs plain drizzle": us["floor-schema"]! - us.floor!,
        "the service's read query (written once, one JSON-array column) + row mapping": us.query! - us["floor-schema"]!,
        "AES-GCM open of the access token (keyring cached)": us["query-decrypt"]! - us.query!,
        "parseEnv (cached) + API-key check (SHA-256 digests)": us["query-full"]! - us["query-decrypt"]!,
        "Hono / zod-openapi routing, middleware (requestId, createDb, keyring, provider), validation, JSON":
          us.app! - us["query-full"]!,
      },
      cpuAppOverFloorUs: us.app! - us.floor!,
      sqlMsP50: { floor: round(cpu.sqlMsP50.floor, 3), service: round(cpu.sqlMsP50.service, 3) },
      sqlExtraMs: round(cpu.sqlMsP50.service - cpu.sqlMsP50.floor, 3),
      iterations: cpu.iterations,
    };
    log(`CPU p50 µs: ${JSON.stringify(us)}; SQL p50 ms: ${JSON.stringify(breakdown.sqlMsP50)}`);

    // 6. Cron refresh.
    await asAdmin(oauth, "PUT", "/admin/behavior", { tokenDelayMs: PROVIDER_DELAY_MS });
    const worker = await appMf.mf.getWorker();
    const cronRuns: {
      wallMs: number;
      refreshed: number;
      sqlRoundTrips: number;
      sqlStatements: number;
      providerRequests: number;
      outcome: string;
    }[] = [];
    for (let r = 0; r < CRON_ROUNDS; r++) {
      await stack.sql(db, "update tokens set expires_at = now() + interval '60 seconds' where is_valid");
      const asBefore = (await asAdmin(oauth, "GET", "/admin/stats")) as AsStats;
      await resetDbStats(db);
      const started = performance.now();
      const result = await worker.scheduled({ scheduledTime: new Date() });
      const wallMs = performance.now() - started;
      const stats = await dbStats(db);
      const asAfter = (await asAdmin(oauth, "GET", "/admin/stats")) as AsStats;
      const [[refreshed]] = (await stack.sql(
        db,
        "select count(*) from tokens where is_valid and expires_at > now() + interval '1800 seconds'",
      )) as [[string]];
      cronRuns.push({
        wallMs,
        refreshed: Number(refreshed),
        sqlRoundTrips: stats.requests,
        sqlStatements: stats.queries,
        providerRequests: asAfter.tokenRequests - asBefore.tokenRequests,
        outcome: result.outcome,
      });
      log(
        `cron round ${r + 1}/${CRON_ROUNDS}: ${(wallMs / 1000).toFixed(2)} s, ${refreshed} refreshed, ${stats.requests} SQL round trips, ${asAfter.tokenRequests - asBefore.tokenRequests} provider requests (${result.outcome})`,
      );
      if (Number(refreshed) !== CRON_TOKENS || result.outcome !== "ok") {
        throw new Error(`cron run refreshed ${refreshed}/${CRON_TOKENS} (outcome ${result.outcome})`);
      }
    }
    const cronFloorMs = (CRON_TOKENS * PROVIDER_DELAY_MS) / OUTBOUND_CONNECTIONS;
    const cronWall = median(cronRuns.map((c) => c.wallMs));
    const cronTrips = median(cronRuns.map((c) => c.sqlRoundTrips));
    const cronProvider = median(cronRuns.map((c) => c.providerRequests));

    // 7. Report.
    const report = {
      date: startedAt.toISOString(),
      machine: {
        cores: cpus().length,
        cpu: cpus()[0]?.model ?? "unknown",
        memoryGiB: round(totalmem() / 2 ** 30, 1),
        loadavgAtEnd: loadavg().map((v) => round(v, 2)),
        node: process.version,
        platform: `${process.platform}-${process.arch}`,
        workerd: readJson(join(stack.ROOT, "node_modules/workerd/package.json")).version,
        miniflare: readJson(join(stack.ROOT, "node_modules/miniflare/package.json")).version,
        wrangler: readJson(join(stack.ROOT, "node_modules/wrangler/package.json")).version,
      },
      settings: {
        durationMsPerMeasurement: DURATION_MS,
        rounds: ROUNDS,
        statistic: "median of rounds; each round's p50/p99 over every request in it",
        loadGenerator: "bench/load.ts (closed loop, keep-alive, microsecond latencies)",
        database: "dev/neon-local on PGlite in memory, own process",
        compatibilityDate: stack.COMPATIBILITY_DATE,
      },
      tokenRead: {
        route: `GET ${stack.BASE_PATH}/tokens/{branch_id} (valid token, service key)`,
        floorRoute: "bench/floor-worker.ts /floor: neon() + drizzle SELECT id FROM clients WHERE branch_id = $1",
        c1: {
          ...read.c1,
          p50Ratio: paired.c1.median,
          p50RatioOfMedians: ratio(read.c1.app.p50Ms, read.c1.floor.p50Ms),
          p50RatioRounds: paired.c1.rounds,
        },
        c16: {
          ...read.c16,
          p50Ratio: paired.c16.median,
          p50RatioOfMedians: ratio(read.c16.app.p50Ms, read.c16.floor.p50Ms),
          p50RatioRounds: paired.c16.rounds,
        },
        sqlRoundTripsPerRead: exactTrips.app,
        sqlRoundTripsPerFloorRead: exactTrips.floor,
        targets: { sqlRoundTripsPerRead: 1, p50RatioMax: 1.25 },
        met: {
          oneRoundTrip: exactTrips.app === 1,
          p50WithinC1: paired.c1.median <= 1.25,
          p50WithinC16: paired.c16.median <= 1.25,
        },
        breakdown,
      },
      cronRefresh: {
        tokens: CRON_TOKENS,
        providerDelayMs: PROVIDER_DELAY_MS,
        floorMs: round(cronFloorMs, 0),
        floorFormula: `${CRON_TOKENS} × ${PROVIDER_DELAY_MS} ms / ${OUTBOUND_CONNECTIONS}`,
        wallMs: round(cronWall, 0),
        ratio: ratio(cronWall, cronFloorMs),
        invocations: 1,
        sqlRoundTrips: cronTrips,
        sqlRoundTripsPerToken: round(cronTrips / CRON_TOKENS, 4),
        providerRequestsPerInvocation: cronProvider,
        outboundRequestsPerInvocation: cronProvider + cronTrips,
        targets: { ratioMax: 1.5 },
        met: { withinFloor: cronWall <= 1.5 * cronFloorMs, batched: cronTrips < CRON_TOKENS / 10 },
        runs: cronRuns.map((c) => ({ ...c, wallMs: round(c.wallMs, 0) })),
        seeding: {
          branches: CRON_TOKENS,
          flow: "POST /clients, login link, provider /authorize, callback",
          ms: round(seedMs, 0),
        },
      },
      bundle: {
        command: "wrangler deploy --dry-run --outdir",
        scriptBytes: app.jsBytes,
        scriptGzipBytes: app.jsGzipBytes,
        wranglerReport: app.wranglerReport,
        files: app.files,
        floorScriptGzipBytes: floor.jsGzipBytes,
        staticAssets: assets,
      },
      benchWallSeconds: 0,
    };
    report.benchWallSeconds = round((performance.now() - t0) / 1000, 1);
    stack.writeResults(RESULTS, report);
    printTable(report);
    log(`wrote ${RESULTS} (${report.benchWallSeconds} s)`);
  } catch (error) {
    if (workerLogs.length) console.error(`[bench] last Worker output:\n${workerLogs.slice(-30).join("\n")}`);
    throw error;
  } finally {
    for (const mf of miniflares) await mf.dispose().catch(() => undefined);
    await backends?.stop();
    rmSync(scratch, { recursive: true, force: true });
  }
}

function readJson(path: string): { version: string } {
  return JSON.parse(readFileSync(path, "utf8")) as { version: string };
}

function printTable(report: {
  tokenRead: {
    c1: { app: ReadFigures; floor: ReadFigures; p50Ratio: number };
    c16: { app: ReadFigures; floor: ReadFigures; p50Ratio: number };
    sqlRoundTripsPerRead: number | undefined;
    sqlRoundTripsPerFloorRead: number | undefined;
    breakdown: {
      cpuStepsUs: Record<string, number>;
      cpuUs: Record<string, number>;
      sqlMsP50: { floor: number; service: number };
    };
  };
  cronRefresh: {
    wallMs: number;
    floorMs: number;
    ratio: number;
    sqlRoundTrips: number;
    sqlRoundTripsPerToken: number;
    providerRequestsPerInvocation: number;
    outboundRequestsPerInvocation: number;
    tokens: number;
    providerDelayMs: number;
  };
  bundle: { scriptBytes: number; scriptGzipBytes: number; staticAssets: { bytes: number; gzipBytes: number } };
  machine: { cores: number; node: string };
}): void {
  const t = report.tokenRead;
  const rows: [string, string, string][] = [];
  const row = (a: string, b: string, c = "") => rows.push([a, b, c]);
  for (const c of ["c1", "c16"] as const) {
    const { app, floor, p50Ratio } = t[c];
    const conc = c === "c1" ? 1 : 16;
    row(`token read c=${conc}: req/s`, `${app.rps}`, `floor ${floor.rps}`);
    row(
      `token read c=${conc}: p50`,
      `${app.p50Ms.toFixed(3)} ms`,
      `floor ${floor.p50Ms.toFixed(3)} ms → ${p50Ratio}× (target ≤ 1.25×)`,
    );
    row(`token read c=${conc}: p99`, `${app.p99Ms.toFixed(3)} ms`, `floor ${floor.p99Ms.toFixed(3)} ms`);
  }
  row("SQL round trips per read", `${t.sqlRoundTripsPerRead}`, `floor ${t.sqlRoundTripsPerFloorRead} (target 1)`);
  const b = t.breakdown;
  row("CPU per read (workerd, DB replayed): app", `${b.cpuUs.app} µs`, `floor ${b.cpuUs.floor} µs`);
  for (const [step, value] of Object.entries(b.cpuStepsUs)) row(`  + ${step}`, `${value} µs`);
  row(
    "database time per query (neon-local p50)",
    `${b.sqlMsP50.service.toFixed(3)} ms`,
    `floor's SQL ${b.sqlMsP50.floor.toFixed(3)} ms`,
  );
  const cr = report.cronRefresh;
  row(
    `cron: ${cr.tokens} due tokens, provider ${cr.providerDelayMs} ms`,
    `${(cr.wallMs / 1000).toFixed(2)} s`,
    `floor ${(cr.floorMs / 1000).toFixed(2)} s → ${cr.ratio}× (target ≤ 1.5×)`,
  );
  row("cron: SQL round trips", `${cr.sqlRoundTrips}`, `${cr.sqlRoundTripsPerToken} per refreshed token`);
  row(
    "cron: outbound requests / invocation",
    `${cr.outboundRequestsPerInvocation}`,
    `${cr.providerRequestsPerInvocation} provider + ${cr.sqlRoundTrips} SQL`,
  );
  row(
    "bundle (gzip)",
    `${(report.bundle.scriptGzipBytes / 1024).toFixed(1)} KiB`,
    `raw ${(report.bundle.scriptBytes / 1024).toFixed(1)} KiB`,
  );
  row(
    "static assets (gzip)",
    `${(report.bundle.staticAssets.gzipBytes / 1024).toFixed(1)} KiB`,
    `raw ${(report.bundle.staticAssets.bytes / 1024).toFixed(1)} KiB (docs renderer)`,
  );
  const w0 = Math.max(...rows.map((r) => r[0].length));
  const w1 = Math.max(...rows.map((r) => r[1].length));
  console.log(`\nnpm run bench — ${report.machine.cores} cores, Node ${report.machine.node}\n`);
  console.log(`${"metric".padEnd(w0)}  ${"value".padStart(w1)}  vs floor / target`);
  console.log(`${"-".repeat(w0)}  ${"-".repeat(w1)}  ${"-".repeat(40)}`);
  for (const [a, b, c] of rows) console.log(`${a.padEnd(w0)}  ${b.padStart(w1)}  ${c}`);
  console.log("");
}

main().catch((error: unknown) => {
  console.error(`[bench] failed: ${error instanceof Error ? (error.stack ?? error.message) : String(error)}`);
  process.exit(1);
});
