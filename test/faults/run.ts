/**
 * `npm run test:faults`: load and a database outage against the real Worker on its own local stack.
 * Not part of `npm test` (about a minute and a half). Everything is local, on 127.0.0.1, and stops by itself.
 *
 *   - the local database (dev/neon-local, PGlite in memory) in a child process of its own;
 *   - the local authorization server (dev/oauth-server) in this process;
 *   - the Worker, bundled by `wrangler deploy --dry-run --outdir` and run in workerd through Miniflare.
 *
 * After connecting FAULTS_BRANCHES branches through the real consent flow:
 *   (a) FAULTS_LOAD_SECONDS (30) of autocannon on GET /tokens/{branch_id}, rotating over the branches,
 *       64 connections: zero non-2xx, zero errors;
 *   (b) a second load phase during which neon-local answers 503 to every query for ~5 s: every non-200
 *       is a 503 problem+json database_unavailable with Retry-After, the Worker keeps answering, 200s
 *       resume without a restart, and every client and token stored before is still there.
 * The Worker runs with the edge read cache off, so every read reaches the database.
 * Exit code 0 when every check holds, 1 otherwise.
 */
import { randomBytes } from "node:crypto";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import autocannon, { type AutocannonResult } from "autocannon";
import * as stack from "../../dev/local-stack.ts";
import { type OAuthServer, startOAuthServer } from "../../dev/oauth-server/server.ts";
import { applyMigrations } from "../../scripts/migrate.ts";

const CONNECTIONS = 64;
const BRANCHES = Number(process.env.FAULTS_BRANCHES ?? 16);
const LOAD_SECONDS = Number(process.env.FAULTS_LOAD_SECONDS ?? 30);
/** Phase (b): load for OUTAGE_LOAD_SECONDS; the database is down from DOWN_AT_MS for DOWN_FOR_MS. */
const OUTAGE_LOAD_SECONDS = 15;
const DOWN_AT_MS = 4_000;
const DOWN_FOR_MS = 5_000;
/** Answers that were in flight when the database went down or came back may land either way. */
const TRANSITION_GRACE_MS = 1_000;
/** The whole run is killed past this, whatever it is doing. */
const HARD_LIMIT_MS = 170_000;

const log = (message: string) => console.log(`[faults] ${message}`);
const failures: string[] = [];
function check(condition: boolean, message: string): void {
  if (condition) log(`ok   ${message}`);
  else {
    failures.push(message);
    log(`FAIL ${message}`);
  }
}

// ---------------------------------------------------------------------------------------------
// The stack.

async function setDatabase(db: stack.LocalDatabase, mode: "down" | "ok"): Promise<void> {
  const response = await fetch(`${db.url}/admin/fail`, { method: "POST", body: JSON.stringify({ mode }) });
  if (!response.ok) throw new Error(`neon-local /admin/fail ${mode}: ${response.status} ${await response.text()}`);
}

/** Every row the Worker stores, summarised so that before/after can be compared exactly. */
async function snapshot(db: stack.LocalDatabase): Promise<Record<string, string>> {
  const [row] = await stack.sql(
    db,
    `select (select count(*) from clients), (select count(*) from tokens),
            (select count(*) from tokens where is_valid and status = 'active'),
            (select md5(coalesce(string_agg(id || ':' || client_id || ':' || access_token || ':' || coalesce(refresh_token, ''), ',' order by id), '')) from tokens)`,
  );
  const [clients, tokens, active, digest] = row as string[];
  return { clients: clients!, tokens: tokens!, active: active!, digest: digest! };
}

// ---------------------------------------------------------------------------------------------
// Branches connected through the real flow: POST /clients, login link, provider, callback.

function faultsClient(index: number, runId: string) {
  return {
    client_id: `faults-${runId}-${index}`,
    client_secret: `faults-secret-${runId}-${index}`,
    branch_id: `faults-branch-${runId}-${index}`,
    workspace_email: "faults@example.com",
    workspace_name: "Faults",
  };
}

async function readTokens(worker: string, serviceKey: string, branches: string[]) {
  const tokens = new Map<string, string>();
  for (const branch of branches) {
    const response = await fetch(`${worker}${stack.BASE_PATH}/tokens/${branch}`, {
      headers: { authorization: `Bearer ${serviceKey}` },
    });
    const body = (await response.json()) as { access_token?: string };
    if (response.status !== 200 || !body.access_token) throw new Error(`GET /tokens/${branch}: ${response.status}`);
    tokens.set(branch, body.access_token);
  }
  return tokens;
}

// ---------------------------------------------------------------------------------------------
// Load.

interface Answer {
  at: number;
  status: number;
  contentType: string;
  retryAfter: string;
  code: string | undefined;
}

function runLoad(
  worker: string,
  serviceKey: string,
  branches: string[],
  seconds: number,
  record?: (answer: Answer) => void,
): Promise<AutocannonResult> {
  const onResponse = record
    ? (status: number, body: string, _context: unknown, headers: Record<string, string | string[]>) => {
        let code: string | undefined;
        if (status !== 200) {
          try {
            code = (JSON.parse(body) as { code?: string }).code;
          } catch {
            code = undefined;
          }
        }
        // Header names as received (case kept).
        const header = (name: string) =>
          String(Object.entries(headers).find(([key]) => key.toLowerCase() === name)?.[1] ?? "");
        record({
          at: Date.now(),
          status,
          contentType: header("content-type"),
          retryAfter: header("retry-after"),
          code,
        });
      }
    : undefined;
  return autocannon({
    url: worker,
    connections: CONNECTIONS,
    duration: seconds,
    headers: { authorization: `Bearer ${serviceKey}` },
    requests: branches.map((branch) => ({
      method: "GET",
      path: `${stack.BASE_PATH}/tokens/${branch}`,
      ...(onResponse ? { onResponse } : {}),
    })),
  });
}

// ---------------------------------------------------------------------------------------------

async function main(): Promise<void> {
  const started = performance.now();
  const scratch = mkdtempSync(join(tmpdir(), "tm-faults-"));
  let db: stack.LocalDatabase | undefined;
  let oauth: OAuthServer | undefined;
  let running: stack.RunningWorker | undefined;
  const workerLogs = { byEvent: new Map<string, number>() };

  const cleanup = async () => {
    await running?.mf.dispose().catch(() => undefined);
    await oauth?.close().catch(() => undefined);
    if (db) await stack.stopDatabase(db);
    rmSync(scratch, { recursive: true, force: true });
  };
  const hardLimit = setTimeout(() => {
    log(`FAIL still running after ${HARD_LIMIT_MS / 1000} s: stopping`);
    db?.child.kill("SIGKILL");
    void running?.mf.dispose();
    process.exit(1);
  }, HARD_LIMIT_MS);
  hardLimit.unref();

  try {
    // 1. The stack.
    const [database, oauthServer, bundle] = await Promise.all([
      stack.startDatabase(),
      startOAuthServer({ host: "127.0.0.1", port: 0 }),
      stack.bundleWorker(join(scratch, "bundle")),
    ]);
    db = database;
    oauth = oauthServer;
    await applyMigrations(db.connectionString, db.sqlEndpoint);
    const adminKey = stack.randomApiKey();
    const serviceKey = stack.randomApiKey();
    running = await stack.startWorker({
      name: "token-management",
      bundle,
      // The edge cache is off: these checks are about the database path (a cached token is served
      // through an outage; `npm run bench:cache` has that fault run).
      bindings: {
        ...stack.localBindings(db, oauth, { adminKey, serviceKey }),
        OAUTH_TIMEOUT_MS: "5000",
        TOKEN_CACHE_MAX_AGE_SECONDS: "0",
      },
      onLog(entry) {
        const message = entry.message ?? "";
        const event = /"event":"([^"]+)"/.exec(message)?.[1] ?? entry.level ?? "log";
        const code = /"code":"([^"]+)"/.exec(message)?.[1];
        const key = code ? `${event}:${code}` : event;
        workerLogs.byEvent.set(key, (workerLogs.byEvent.get(key) ?? 0) + 1);
      },
    });
    const worker = running.url;
    log(`neon-local ${db.url} (PGlite in memory), oauth-server ${oauth.url}, Worker ${worker}`);

    // 2. Branches.
    const runId = randomBytes(3).toString("hex");
    const branches: string[] = [];
    for (let i = 0; i < BRANCHES; i++)
      branches.push(await stack.connectBranch(worker, oauth, adminKey, faultsClient(i, runId)));
    const tokensBefore = await readTokens(worker, serviceKey, branches);
    const before = await snapshot(db);
    log(`connected ${branches.length} branches; stored: ${JSON.stringify(before)}`);

    // 3. (a) Load.
    log(
      `(a) ${LOAD_SECONDS} s of GET /tokens/{branch_id}, ${CONNECTIONS} connections, rotating over ${BRANCHES} branches`,
    );
    const a = await runLoad(worker, serviceKey, branches, LOAD_SECONDS);
    const figuresA = {
      requests: a.requests.total,
      rps: Math.round(a.requests.average),
      p50: a.latency.p50,
      p99: a.latency.p99,
      max: a.latency.max,
      non2xx: a.non2xx,
      errors: a.errors,
      timeouts: a.timeouts,
    };
    log(`(a) ${JSON.stringify(figuresA)}`);
    check(a.requests.total > 0, `(a) ${a.requests.total} requests served`);
    check(a.non2xx === 0, `(a) no non-2xx answer (${a.non2xx})`);
    check(a.errors === 0 && a.timeouts === 0, `(a) no connection error or timeout (${a.errors}, ${a.timeouts})`);

    // 4. (b) Load with the database down for a while.
    log(`(b) ${OUTAGE_LOAD_SECONDS} s of load; database down from ${DOWN_AT_MS} ms for ${DOWN_FOR_MS} ms`);
    const answers: Answer[] = [];
    const loadStarted = Date.now();
    let downAt = 0;
    let upAt = 0;
    const outage = (async () => {
      await new Promise((r) => setTimeout(r, DOWN_AT_MS));
      await setDatabase(db!, "down");
      downAt = Date.now();
      await new Promise((r) => setTimeout(r, DOWN_FOR_MS));
      await setDatabase(db!, "ok");
      upAt = Date.now();
    })();
    const b = await runLoad(worker, serviceKey, branches, OUTAGE_LOAD_SECONDS, (answer) => answers.push(answer));
    await outage;

    const non200 = answers.filter((x) => x.status !== 200);
    const malformed = non200.filter(
      (x) =>
        x.status !== 503 ||
        !x.contentType.startsWith("application/problem+json") ||
        x.code !== "database_unavailable" ||
        !(Number(x.retryAfter) > 0),
    );
    const beforeDown = answers.filter((x) => x.at < downAt);
    const during = answers.filter((x) => x.at > downAt + TRANSITION_GRACE_MS && x.at < upAt);
    const afterUp = answers.filter((x) => x.at > upAt + TRANSITION_GRACE_MS);
    const byStatus = (list: Answer[]) => {
      const counts: Record<number, number> = {};
      for (const x of list) counts[x.status] = (counts[x.status] ?? 0) + 1;
      return counts;
    };
    const firstOkAfterUp = answers.find((x) => x.at >= upAt && x.status === 200);
    const figuresB = {
      requests: b.requests.total,
      rps: Math.round(b.requests.average),
      p99: b.latency.p99,
      errors: b.errors,
      timeouts: b.timeouts,
      beforeDown: byStatus(beforeDown),
      down: byStatus(during),
      afterUp: byStatus(afterUp),
      firstOkAfterUpMs: firstOkAfterUp ? firstOkAfterUp.at - upAt : null,
      downWindowMs: [downAt - loadStarted, upAt - loadStarted],
    };
    log(`(b) ${JSON.stringify(figuresB)}`);
    check(answers.length === b.requests.total, `(b) every answer inspected (${answers.length})`);
    check(
      malformed.length === 0,
      `(b) every non-200 (${non200.length}) is 503 problem+json database_unavailable with Retry-After` +
        (malformed[0] ? `; first other: ${JSON.stringify(malformed[0])}` : ""),
    );
    check(b.errors === 0 && b.timeouts === 0, `(b) the Worker kept answering: no connection error or timeout`);
    check(beforeDown.length > 0 && beforeDown.every((x) => x.status === 200), "(b) all 200 before the outage");
    check(
      during.length > 0 && during.every((x) => x.status === 503),
      `(b) answers during the outage are 503 (${during.length})`,
    );
    check(
      afterUp.length > 0 && afterUp.every((x) => x.status === 200),
      `(b) 200s resume after the database returns, without a restart (${afterUp.length})`,
    );

    // 5. Nothing lost.
    const after = await snapshot(db);
    log(`stored after: ${JSON.stringify(after)}`);
    check(JSON.stringify(after) === JSON.stringify(before), "every client and token row is unchanged");
    const tokensAfter = await readTokens(worker, serviceKey, branches);
    check(
      branches.every((branch) => tokensAfter.get(branch) === tokensBefore.get(branch)),
      `every branch still serves its token (${branches.length})`,
    );
    const health = await fetch(`${worker}${stack.BASE_PATH}/health`);
    check(health.status === 200, "GET /health is 200 at the end");
    const events = Object.fromEntries(workerLogs.byEvent);
    log(`Worker log events: ${JSON.stringify(events)}`);
    check(
      Object.keys(events).every((key) => !key.includes("internal_error")),
      "no internal_error logged by the Worker",
    );

    console.log(
      [
        "",
        "Reliability report",
        `  (a) load: ${figuresA.requests} reads in ${LOAD_SECONDS} s, ${figuresA.rps} req/s, p50 ${figuresA.p50} ms, p99 ${figuresA.p99} ms, max ${figuresA.max} ms; non-2xx ${figuresA.non2xx}, errors ${figuresA.errors}`,
        `  (b) outage: ${figuresB.requests} reads; before ${JSON.stringify(figuresB.beforeDown)}, down ${JSON.stringify(figuresB.down)}, after ${JSON.stringify(figuresB.afterUp)}; first 200 ${figuresB.firstOkAfterUpMs} ms after recovery; errors ${figuresB.errors}`,
        `  data: ${before.clients} clients, ${before.tokens} tokens before and after (digest ${after.digest === before.digest ? "equal" : "DIFFERENT"})`,
        `  ${failures.length === 0 ? "all checks passed" : `${failures.length} check(s) failed`} in ${((performance.now() - started) / 1000).toFixed(1)} s`,
      ].join("\n"),
    );
  } catch (error) {
    failures.push(String(error));
    console.error("[faults] run failed:", error);
  } finally {
    await cleanup();
    clearTimeout(hardLimit);
  }
  process.exit(failures.length === 0 ? 0 : 1);
}

await main();
