/**
 * Pieces for scripts that run the real Worker on its own local stack, all on 127.0.0.1 and offline
 * (`npm run bench`, `npm run test:faults`):
 *
 *   - the local database (dev/neon-local, PGlite in memory) in a child process of its own;
 *   - the Worker bundled by `wrangler deploy --dry-run --outdir` and run in workerd through Miniflare;
 *   - branches connected through the real consent flow against dev/oauth-server.
 *
 * startBackends starts the database (migrated) and the authorization server with fresh API keys;
 * each script then starts its Workers and decides what to measure.
 */
import { type ChildProcess, execFile, execFileSync, spawn } from "node:child_process";
import { randomBytes } from "node:crypto";
import { mkdtempSync, readdirSync, readFileSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { basename, delimiter, dirname, isAbsolute, join, relative, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { promisify } from "node:util";
import { convertV4MiniflareOptions, Miniflare, type WorkerdStructuredLog } from "miniflare";
import { copyDocsAssets } from "../scripts/docs-assets.ts";
import { applyMigrations } from "../scripts/migrate.ts";
import { type OAuthServer, startOAuthServer } from "./oauth-server/server.ts";

/** The repository root. */
export const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), "..");
/** The Worker's routes live under this path (wrangler.toml's route). */
export const BASE_PATH = "/token-management";
/** wrangler.toml's compatibility_date, for the Miniflare instances. */
export const COMPATIBILITY_DATE = /compatibility_date\s*=\s*"([^"]+)"/.exec(
  readFileSync(join(ROOT, "wrangler.toml"), "utf8"),
)![1]!;

/**
 * The caller's environment less wrangler's own settings (`CLOUDFLARE_*`, `WRANGLER_*`): in a user's
 * shell those could pick another environment of wrangler.toml, change the build, or
 * (CLOUDFLARE_INCLUDE_PROCESS_ENV) turn the whole shell environment into the Worker's bindings.
 * Benchmarks and tests run what they measure with the settings they choose, not the user's.
 */
export function withoutWranglerSettings(env: NodeJS.ProcessEnv = process.env): NodeJS.ProcessEnv {
  const kept = Object.entries(env).filter(([name]) => !/^(CLOUDFLARE|WRANGLER)_/i.test(name));
  // worker-configuration.d.ts declares the Worker's bindings on ProcessEnv; a shell has none of them.
  return Object.fromEntries(kept) as NodeJS.ProcessEnv;
}

/** Environment for child tools: this Node first on PATH, no wrangler telemetry or Cloudflare fetches. */
export const toolEnv: NodeJS.ProcessEnv = {
  ...withoutWranglerSettings(),
  PATH: [dirname(process.execPath), process.env.PATH ?? ""].join(delimiter),
  WRANGLER_SEND_METRICS: "false",
  CLOUDFLARE_CF_FETCH_ENABLED: "false",
};

const execFileAsync = promisify(execFile);

// ---------------------------------------------------------------------------------------------
// The local database in a child process.

export interface LocalDatabase {
  /** neon-local's origin (also serves /stats and /admin/fail). */
  url: string;
  /** The HTTP SQL endpoint, for NEON_LOCAL_FETCH_ENDPOINT. */
  sqlEndpoint: string;
  /** The connection string the Worker and the migrations use. */
  connectionString: string;
  child: ChildProcess;
}

/** Starts dev/neon-local (PGlite in memory, any free port) in a child process; resolves once it listens. */
export async function startDatabase(): Promise<LocalDatabase> {
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

/** Stops the database process: SIGTERM, then SIGKILL if it is still there after `graceMs`. */
export async function stopDatabase(db: LocalDatabase, graceMs = 3_000): Promise<void> {
  if (db.child.exitCode !== null) return;
  const exited = new Promise((r) => db.child.once("exit", r));
  db.child.kill("SIGTERM");
  await Promise.race([exited, new Promise((r) => setTimeout(r, graceMs))]);
  if (db.child.exitCode === null) db.child.kill("SIGKILL");
}

/** Runs one statement through neon-local's HTTP endpoint; rows as arrays of raw text. */
export async function sql(db: LocalDatabase, query: string, params: unknown[] = []): Promise<(string | null)[][]> {
  const response = await fetch(db.sqlEndpoint, {
    method: "POST",
    headers: {
      "Neon-Connection-String": db.connectionString,
      "Neon-Array-Mode": "true",
      "Neon-Raw-Text-Output": "true",
    },
    body: JSON.stringify({ query, params }),
  });
  if (!response.ok) throw new Error(`SQL failed: ${await response.text()}`);
  return ((await response.json()) as { rows: (string | null)[][] }).rows;
}

// ---------------------------------------------------------------------------------------------
// The Worker: bundled by wrangler, run in workerd through Miniflare.

export interface WorkerBundle {
  /** The output directory (the modules root). */
  dir: string;
  /** The entry script's file name in `dir`. */
  main: string;
  /** wrangler's output (it reports the upload size). */
  stdout: string;
}

/**
 * Bundles a Worker with `wrangler deploy --dry-run --outdir`: the project's Worker, or the one
 * `configPath` describes.
 */
export async function bundleWorker(outdir: string, configPath?: string): Promise<WorkerBundle> {
  copyDocsAssets(); // wrangler.toml's [assets] directory must exist
  const args = ["deploy", "--dry-run", "--outdir", outdir, ...(configPath ? ["--config", configPath] : [])];
  const { stdout } = await execFileAsync(join(ROOT, "node_modules/.bin/wrangler"), args, {
    cwd: ROOT,
    env: toolEnv,
    maxBuffer: 16 * 1024 * 1024,
  });
  const names = readdirSync(outdir);
  const main = names.find((name) => name === "index.js") ?? names.find((name) => /\.m?js$/.test(name));
  if (!main) throw new Error(`no script in ${outdir}`);
  return { dir: outdir, main, stdout };
}

/**
 * The benches' floor Worker (bench/floor-worker.ts): writes its wrangler config into `dir` and
 * returns the path, for bundleWorker.
 */
export function floorWorkerConfig(dir: string): string {
  const path = join(dir, "floor.wrangler.json");
  writeFileSync(
    path,
    JSON.stringify({
      name: "bench-floor",
      main: join(ROOT, "bench/floor-worker.ts"),
      compatibility_date: COMPATIBILITY_DATE,
    }),
  );
  return path;
}

/**
 * The bindings every local run gives the Worker: the local database, fresh random keys, and the
 * OAuth endpoints at the local authorization server (plain HTTP allowed). Add the rest per run.
 */
export function localBindings(
  db: LocalDatabase,
  oauth: OAuthServer,
  keys: { adminKey: string; serviceKey: string },
): Record<string, string> {
  return {
    TOKEN_MANAGEMENT_DATABASE_URL: db.connectionString,
    NEON_LOCAL_FETCH_ENDPOINT: db.sqlEndpoint,
    TOKEN_ENCRYPTION_KEY: randomBytes(32).toString("base64"),
    ADMIN_API_KEY: keys.adminKey,
    SERVICE_API_KEY: keys.serviceKey,
    OAUTH_ISSUER: oauth.issuer,
    OAUTH_AUTHORIZATION_URL: `${oauth.url}/authorize`,
    OAUTH_TOKEN_URL: `${oauth.url}/token`,
    OAUTH_REVOCATION_URL: `${oauth.url}/revoke`,
    OAUTH_ALLOW_INSECURE_HTTP: "true",
  };
}

/** What a bench runs its Workers against (startBackends). */
export interface Backends {
  db: LocalDatabase;
  oauth: OAuthServer;
  adminKey: string;
  serviceKey: string;
  /** localBindings for these: add the run's own settings to them. */
  bindings: Record<string, string>;
  /** Stops the authorization server and the database (never throws). */
  stop(): Promise<void>;
}

/** The local database (migrated), the authorization server on a free port, and fresh API keys. */
export async function startBackends(): Promise<Backends> {
  const db = await startDatabase();
  let oauth: OAuthServer;
  try {
    await applyMigrations(db.connectionString, db.sqlEndpoint);
    oauth = await startOAuthServer({ port: 0 });
  } catch (error) {
    await stopDatabase(db);
    throw error;
  }
  const keys = { adminKey: randomApiKey(), serviceKey: randomApiKey() };
  return {
    db,
    oauth,
    ...keys,
    bindings: localBindings(db, oauth, keys),
    stop: async () => {
      await oauth.close().catch(() => undefined);
      await stopDatabase(db, 5000);
    },
  };
}

/** A random API key (32 bytes, base64url), as the Worker's ADMIN_API_KEY / SERVICE_API_KEY. */
export function randomApiKey(): string {
  return randomBytes(32).toString("base64url");
}

export interface RunningWorker {
  mf: Miniflare;
  /** The origin the Worker answers on. */
  url: string;
}

/** Runs a bundle in workerd through Miniflare on 127.0.0.1 (any free port); resolves once it is ready. */
export async function startWorker(options: {
  name: string;
  bundle: WorkerBundle;
  bindings: Record<string, string>;
  onLog?: (entry: WorkerdStructuredLog) => void;
  /** More Miniflare worker options, e.g. queue producers and consumers. */
  workerOptions?: Record<string, unknown>;
}): Promise<RunningWorker> {
  const { name, bundle, bindings, onLog, workerOptions } = options;
  const mf = new Miniflare(
    convertV4MiniflareOptions({
      host: "127.0.0.1",
      port: 0,
      workers: [
        {
          name,
          modules: true,
          modulesRoot: bundle.dir,
          scriptPath: join(bundle.dir, bundle.main),
          compatibilityDate: COMPATIBILITY_DATE,
          bindings,
          ...workerOptions,
        },
      ],
      ...(onLog ? { handleStructuredLogs: onLog } : {}),
    }),
  );
  try {
    return { mf, url: (await mf.ready).origin };
  } catch (error) {
    await mf.dispose().catch(() => undefined);
    throw error;
  }
}

// ---------------------------------------------------------------------------------------------
// Branches connected through the real flow: provider registration, POST /clients, login link,
// provider /authorize (auto-approve), callback.

export interface BranchClient {
  client_id: string;
  client_secret: string;
  branch_id: string;
  workspace_email: string;
  workspace_name: string;
}

/** Registers an OAuth client at the local authorization server (its admin API). */
export async function registerAtProvider(
  oauth: Pick<OAuthServer, "url">,
  client: { clientId: string; clientSecret: string; redirectUri: string },
): Promise<void> {
  const response = await fetch(`${oauth.url}/admin/clients`, {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({
      client_id: client.clientId,
      client_secret: client.clientSecret,
      redirect_uris: [client.redirectUri],
    }),
  });
  if (response.status !== 201) throw new Error(`provider registration: ${response.status} ${await response.text()}`);
}

/** Connects one branch through the real consent flow; resolves to its branch_id once the callback stored a token. */
export async function connectBranch(
  worker: string,
  oauth: OAuthServer,
  adminKey: string,
  client: BranchClient,
): Promise<string> {
  const body = { ...client, redirect_uri: `${worker}${BASE_PATH}/auth/callback` };
  await registerAtProvider(oauth, {
    clientId: body.client_id,
    clientSecret: body.client_secret,
    redirectUri: body.redirect_uri,
  });
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

// ---------------------------------------------------------------------------------------------
// Benchmarks: their knobs, the smoke mode and their results files.

/**
 * BENCH_SMOKE=1 (`.ci/run`): every bench runs end to end at tiny sizes and durations, in seconds, so
 * none can break unnoticed. Its figures mean nothing: its results go to a temporary directory
 * (BENCH_RESULTS_DIR when set), never over the repository's results files.
 */
export const BENCH_SMOKE = process.env.BENCH_SMOKE === "1";

/** A bench's numeric knob: the variable `name` when set, else the full run's value (or the smoke run's). */
export function benchKnob(name: string, full: number, smoke: number): number {
  const value = process.env[name];
  return value !== undefined && value !== "" ? Number(value) : BENCH_SMOKE ? smoke : full;
}

let smokeResultsDir: string | undefined;

/** Where a bench writes `file` (a path in the repository, or an absolute one), or under BENCH_SMOKE=1 a temporary file. */
export function resultsPath(file: string): string {
  if (!BENCH_SMOKE) return isAbsolute(file) ? file : join(ROOT, file);
  smokeResultsDir ??= process.env.BENCH_RESULTS_DIR || mkdtempSync(join(tmpdir(), "tm-bench-smoke-"));
  return join(smokeResultsDir, basename(file));
}

/**
 * Writes a bench's results as JSON in the repository's format (biome's), so that `npm run lint`
 * stays clean after `npm run bench`. A smoke run's file, outside the repository, is written as is
 * (biome formats only the files its configuration includes, and exits 1 on any other).
 */
export function writeResults(path: string, report: unknown): void {
  writeFileSync(path, `${JSON.stringify(report, null, 2)}\n`);
  if (relative(ROOT, path).startsWith("..")) return;
  execFileSync(join(ROOT, "node_modules/.bin/biome"), ["format", "--write", path], { stdio: "ignore" });
}
