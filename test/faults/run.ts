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
 * Exit code 0 when every check holds, 1 otherwise.
 */
import { type ChildProcess, execFile, spawn } from "node:child_process";
import { randomBytes } from "node:crypto";
import { mkdtempSync, readdirSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { delimiter, dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { promisify } from "node:util";
import autocannon, { type AutocannonResult } from "autocannon";
import { convertV4MiniflareOptions, Miniflare } from "miniflare";
import { type OAuthServer, startOAuthServer } from "../../dev/oauth-server/server.ts";
import { applyMigrations } from "../../scripts/migrate.ts";

const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), "../..");
const BASE_PATH = "/token-management";
const COMPATIBILITY_DATE = /compatibility_date\s*=\s*"([^"]+)"/.exec(
  readFileSync(join(ROOT, "wrangler.toml"), "utf8"),
)![1]!;

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
const execFileAsync = promisify(execFile);
const toolEnv = {
  ...process.env,
  PATH: [dirname(process.execPath), process.env.PATH ?? ""].join(delimiter),
  WRANGLER_SEND_METRICS: "false",
  CLOUDFLARE_CF_FETCH_ENABLED: "false",
};

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

interface Database {
  url: string;
  sqlEndpoint: string;
  connectionString: string;
  child: ChildProcess;
}

async function startDatabase(): Promise<Database> {
  const child = spawn(process.execPath, ["--import", "tsx", "dev/neon-local/cli.ts", "--port", "0", "--memory"], {
    cwd: ROOT,
    env: toolEnv,
    stdio: ["ignore", "pipe", "inherit"],
  });
  const url = await new Promise<string>((resolveUrl, reject) => {
    let out = "";
    const timer = setTimeout(() => reject(new Error(`neon-local did not start: ${out}`)), 60_000);
    child.stdout!.on("data", (chunk: Buffer) => {
      out += chunk.toString();
      const match = /listening on (http:\/\/\S+)/.exec(out);
      if (match) {
        clearTimeout(timer);
        resolveUrl(match[1]!);
      }
    });
    child.once("exit", (code) => reject(new Error(`neon-local exited with ${code}: ${out}`)));
  });
  const port = new URL(url).port;
  return { url, sqlEndpoint: `${url}/sql`, connectionString: `postgresql://local:local@127.0.0.1:${port}/main`, child };
}

async function stopDatabase(db: Database): Promise<void> {
  if (db.child.exitCode !== null) return;
  const exited = new Promise((r) => db.child.once("exit", r));
  db.child.kill("SIGTERM");
  await Promise.race([exited, new Promise((r) => setTimeout(r, 3_000))]);
  if (db.child.exitCode === null) db.child.kill("SIGKILL");
}

async function setDatabase(db: Database, mode: "down" | "ok"): Promise<void> {
  const response = await fetch(`${db.url}/admin/fail`, { method: "POST", body: JSON.stringify({ mode }) });
  if (!response.ok) throw new Error(`neon-local /admin/fail ${mode}: ${response.status} ${await response.text()}`);
}

async function sql(db: Database, query: string): Promise<(string | null)[][]> {
  const response = await fetch(db.sqlEndpoint, {
    method: "POST",
    headers: {
      "Neon-Connection-String": db.connectionString,
      "Neon-Array-Mode": "true",
      "Neon-Raw-Text-Output": "true",
    },
    body: JSON.stringify({ query, params: [] }),
  });
  if (!response.ok) throw new Error(`SQL failed: ${await response.text()}`);
  return ((await response.json()) as { rows: (string | null)[][] }).rows;
}

/** Every row the Worker stores, summarised so that before/after can be compared exactly. */
async function snapshot(db: Database): Promise<Record<string, string>> {
  const [row] = await sql(
    db,
    `select (select count(*) from clients), (select count(*) from tokens),
            (select count(*) from tokens where is_valid and status = 'active'),
            (select md5(coalesce(string_agg(id || ':' || client_id || ':' || access_token || ':' || coalesce(refresh_token, ''), ',' order by id), '')) from tokens)`,
  );
  const [clients, tokens, active, digest] = row as string[];
  return { clients: clients!, tokens: tokens!, active: active!, digest: digest! };
}

async function bundleWorker(outdir: string): Promise<string> {
  await execFileAsync(join(ROOT, "node_modules/.bin/wrangler"), ["deploy", "--dry-run", "--outdir", outdir], {
    cwd: ROOT,
    env: toolEnv,
    maxBuffer: 16 * 1024 * 1024,
  });
  const main =
    readdirSync(outdir).find((name) => name === "index.js") ?? readdirSync(outdir).find((n) => n.endsWith(".js"));
  if (!main) throw new Error(`no script in ${outdir}`);
  return main;
}

// ---------------------------------------------------------------------------------------------
// Branches connected through the real flow: POST /clients, login link, provider, callback.

async function connectBranch(worker: string, oauth: OAuthServer, adminKey: string, index: number, runId: string) {
  const body = {
    client_id: `faults-${runId}-${index}`,
    client_secret: `faults-secret-${runId}-${index}`,
    redirect_uri: `${worker}${BASE_PATH}/auth/callback`,
    branch_id: `faults-branch-${runId}-${index}`,
    workspace_email: "faults@example.com",
    workspace_name: "Faults",
  };
  const registered = await fetch(`${oauth.url}/admin/clients`, {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({
      client_id: body.client_id,
      client_secret: body.client_secret,
      redirect_uris: [body.redirect_uri],
    }),
  });
  if (registered.status !== 201) throw new Error(`provider registration: ${await registered.text()}`);
  const created = await fetch(`${worker}${BASE_PATH}/clients`, {
    method: "POST",
    headers: { authorization: `Bearer ${adminKey}`, "content-type": "application/json" },
    body: JSON.stringify(body),
  });
  if (created.status !== 201) throw new Error(`POST /clients: ${created.status} ${await created.text()}`);
  const { login_url: loginUrl } = (await created.json()) as { login_url: string };
  const login = await fetch(loginUrl, { redirect: "manual" });
  await login.text();
  if (login.status !== 302) throw new Error(`login link: ${login.status}`);
  const cookie = (login.headers.get("set-cookie") ?? "").split(";")[0] ?? "";
  const authorize = await fetch(login.headers.get("location") ?? "", { redirect: "manual" });
  await authorize.text();
  const back = new URL(authorize.headers.get("location") ?? "");
  const callback = await fetch(`${worker}${BASE_PATH}/auth/callback${back.search}`, {
    headers: { accept: "application/json", cookie },
  });
  const text = await callback.text();
  if (callback.status !== 200) throw new Error(`callback: ${callback.status} ${text}`);
  return body.branch_id;
}

async function readTokens(worker: string, serviceKey: string, branches: string[]) {
  const tokens = new Map<string, string>();
  for (const branch of branches) {
    const response = await fetch(`${worker}${BASE_PATH}/tokens/${branch}`, {
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
      path: `${BASE_PATH}/tokens/${branch}`,
      ...(onResponse ? { onResponse } : {}),
    })),
  });
}

// ---------------------------------------------------------------------------------------------

async function main(): Promise<void> {
  const started = performance.now();
  const scratch = mkdtempSync(join(tmpdir(), "tm-faults-"));
  let db: Database | undefined;
  let oauth: OAuthServer | undefined;
  let mf: Miniflare | undefined;
  const workerLogs = { byEvent: new Map<string, number>() };

  const cleanup = async () => {
    await mf?.dispose().catch(() => undefined);
    await oauth?.close().catch(() => undefined);
    if (db) await stopDatabase(db);
    rmSync(scratch, { recursive: true, force: true });
  };
  const hardLimit = setTimeout(() => {
    log(`FAIL still running after ${HARD_LIMIT_MS / 1000} s: stopping`);
    db?.child.kill("SIGKILL");
    void mf?.dispose();
    process.exit(1);
  }, HARD_LIMIT_MS);
  hardLimit.unref();

  try {
    // 1. The stack.
    const [database, oauthServer, main] = await Promise.all([
      startDatabase(),
      startOAuthServer({ host: "127.0.0.1", port: 0 }),
      bundleWorker(join(scratch, "bundle")),
    ]);
    db = database;
    oauth = oauthServer;
    await applyMigrations(db.connectionString, db.sqlEndpoint);
    const adminKey = randomBytes(32).toString("base64url");
    const serviceKey = randomBytes(32).toString("base64url");
    mf = new Miniflare(
      convertV4MiniflareOptions({
        host: "127.0.0.1",
        port: 0,
        workers: [
          {
            name: "token-management",
            modules: true,
            modulesRoot: join(scratch, "bundle"),
            scriptPath: join(scratch, "bundle", main),
            compatibilityDate: COMPATIBILITY_DATE,
            bindings: {
              TOKEN_MANAGEMENT_DATABASE_URL: db.connectionString,
              NEON_LOCAL_FETCH_ENDPOINT: db.sqlEndpoint,
              TOKEN_ENCRYPTION_KEY: randomBytes(32).toString("base64"),
              ADMIN_API_KEY: adminKey,
              SERVICE_API_KEY: serviceKey,
              OAUTH_AUTHORIZATION_URL: `${oauth.url}/authorize`,
              OAUTH_TOKEN_URL: `${oauth.url}/token`,
              OAUTH_REVOCATION_URL: `${oauth.url}/revoke`,
              OAUTH_ALLOW_INSECURE_HTTP: "true",
              OAUTH_TIMEOUT_MS: "5000",
            },
          },
        ],
        handleStructuredLogs(entry: { level?: string; message?: string }) {
          const message = entry.message ?? "";
          const event = /"event":"([^"]+)"/.exec(message)?.[1] ?? entry.level ?? "log";
          const code = /"code":"([^"]+)"/.exec(message)?.[1];
          const key = code ? `${event}:${code}` : event;
          workerLogs.byEvent.set(key, (workerLogs.byEvent.get(key) ?? 0) + 1);
        },
      }),
    );
    const worker = (await mf.ready).origin;
    log(`neon-local ${db.url} (PGlite in memory), oauth-server ${oauth.url}, Worker ${worker}`);

    // 2. Branches.
    const runId = randomBytes(3).toString("hex");
    const branches: string[] = [];
    for (let i = 0; i < BRANCHES; i++) branches.push(await connectBranch(worker, oauth, adminKey, i, runId));
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
    const health = await fetch(`${worker}${BASE_PATH}/health`);
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
