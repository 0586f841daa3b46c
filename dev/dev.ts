/**
 * `npm run dev`: the whole local stack in one command, offline, no Cloudflare account.
 *
 * 1. writes .dev.vars from .dev.vars.example when missing (fresh random keys),
 * 2. stops what a previous run left behind (its pid file), and checks that every port it needs is free,
 * 3. starts the local database (dev/neon-local on PGlite in .data/pglite, or on the PostgreSQL server
 *    named by DATABASE_URL_FOR_DEV / NEON_LOCAL_DATABASE_URL) and applies the migrations through it,
 * 4. starts the built-in OAuth authorization server (dev/oauth-server) only when OAUTH_TOKEN_URL is its
 *    own default URL (LOCAL_OAUTH_URLS, as in .dev.vars.example); any other provider, on localhost or
 *    not, is used as configured and nothing is started on its port. The built-in server gets back the
 *    clients `npm run dev:seed` recorded (it keeps its state in memory),
 * 5. runs `wrangler dev` on 127.0.0.1:${PORT:-8787} with --test-scheduled, through dev/lifeline.ts.
 *
 * Environment: PORT (the Worker, 8787), NEON_LOCAL_PORT (the database, else the port of .dev.vars'
 * NEON_LOCAL_FETCH_ENDPOINT, 4444), OAUTH_SERVER_PORT (the built-in OAuth server, 4445); a changed port
 * is handed to the Worker with `wrangler dev --var`. DEV_VARS_FILE (.dev.vars) and DEV_DATA_DIR (.data)
 * move the configuration and the data.
 *
 * Stopping: Ctrl-C, SIGTERM or SIGHUP stop wrangler (its whole process group, workerd included), the
 * OAuth server and the database (PGlite closed cleanly so the data persists), within a few seconds.
 * Should this program or `npm run dev` itself be killed (SIGKILL, a crashed parent), the lifeline
 * stops wrangler as soon as this process is gone, and this process stops itself as soon as the npm
 * process that started it is gone. A group nothing could stop (everything killed at once) is stopped
 * at the next start, from the pid file. If wrangler exits on its own, the rest is shut down and this
 * exits with wrangler's code.
 */
import { type ChildProcess, execFileSync, spawn } from "node:child_process";
import { randomBytes } from "node:crypto";
import { existsSync, mkdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { createServer } from "node:net";
import { delimiter, dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { copyDocsAssets } from "../scripts/docs-assets.ts";
import { applyMigrations, readDevVars } from "../scripts/migrate.ts";
import { signalGroup, stopGroup } from "./lifeline.ts";
import { type BackendOptions, type NeonLocal, startNeonLocal } from "./neon-local/server.ts";
import { type OAuthServer, startOAuthServer } from "./oauth-server/server.ts";

const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), "..");
const DEV_VARS_EXAMPLE = join(ROOT, ".dev.vars.example");
const DEFAULT_WORKER_PORT = 8787;
const DEFAULT_DATABASE_PORT = 4444;
const DEFAULT_OAUTH_PORT = 4445;
/** How long the OAuth server, the database and the lifeline get to stop before this exits anyway. */
const SHUTDOWN_LIMIT_MS = 4_000;
/** How often the npm process that started this is looked for. */
const LAUNCHER_POLL_MS = 250;

const log = (message: string) => console.log(`[dev] ${message}`);

/** The built-in OAuth server's endpoints on a port: on its default port, the configuration that selects it. */
export function localOAuthUrls(port: number) {
  const origin = `http://127.0.0.1:${port}`;
  return {
    OAUTH_AUTHORIZATION_URL: `${origin}/authorize`,
    OAUTH_TOKEN_URL: `${origin}/token`,
    OAUTH_REVOCATION_URL: `${origin}/revoke`,
  };
}

/** The built-in OAuth server's RISC configuration document (its Cross-Account Protection transmitter). */
export function localRiscConfigurationUrl(port: number): string {
  return `http://127.0.0.1:${port}/.well-known/risc-configuration`;
}

/** The built-in OAuth server's Business Profile API (dev/oauth-server/business-profile.ts): the proxy's upstream. */
export function localApiBaseUrl(port: number): string {
  return `http://127.0.0.1:${port}`;
}

/** The built-in OAuth server's Business Profile API, as both of Google's hosts. */
export function localBusinessProfileUrls(port: number): string {
  return `http://127.0.0.1:${port},http://127.0.0.1:${port}`;
}

/** The Worker's RISC receiver, where the built-in transmitter pushes ("Remove access" on its account page). */
export function localRiscReceiverUrl(workerPort: number): string {
  return `http://127.0.0.1:${workerPort}/token-management/risc`;
}

/** Where `npm run dev` keeps its configuration and data (DEV_VARS_FILE, DEV_DATA_DIR). */
export function devPaths(env: NodeJS.ProcessEnv = process.env) {
  const dataDir = resolve(ROOT, env.DEV_DATA_DIR || ".data");
  return {
    varsFile: resolve(ROOT, env.DEV_VARS_FILE || ".dev.vars"),
    dataDir,
    pgliteDir: join(dataDir, "pglite"),
    /** Written by dev/seed.ts: clients to register again at the (in-memory) local authorization server. */
    seededClients: join(dataDir, "dev-oauth-clients.json"),
    /** wrangler's process group while it runs (see dev/lifeline.ts). */
    pidFile: join(dataDir, "dev-wrangler.pid"),
  };
}

/** The stack `npm run dev` runs for a configuration (.dev.vars) and environment. */
export interface DevStack {
  workerPort: number;
  databasePort: number;
  /** The built-in OAuth server's port; undefined when the configuration names another provider. */
  oauthServerPort: number | undefined;
  /** Bindings that differ from the configuration because a port was moved (`wrangler dev --var`). */
  overrides: Record<string, string>;
}

function portFromEnv(env: NodeJS.ProcessEnv, name: string): number | undefined {
  const text = env[name];
  if (!text) return undefined;
  const port = Number(text);
  if (!Number.isInteger(port) || port < 1 || port > 65535) throw new Error(`${name}=${text} is not a port number`);
  return port;
}

function portOf(url: string | undefined): number | undefined {
  if (!url) return undefined;
  const parsed = new URL(url);
  return parsed.port ? Number(parsed.port) : undefined;
}

export function devStack(vars: Record<string, string>, env: NodeJS.ProcessEnv = process.env): DevStack {
  const overrides: Record<string, string> = {};
  const configuredDatabasePort = portOf(vars.NEON_LOCAL_FETCH_ENDPOINT) ?? DEFAULT_DATABASE_PORT;
  const databasePort = portFromEnv(env, "NEON_LOCAL_PORT") ?? configuredDatabasePort;
  if (databasePort !== configuredDatabasePort || !vars.NEON_LOCAL_FETCH_ENDPOINT) {
    overrides.NEON_LOCAL_FETCH_ENDPOINT = `http://127.0.0.1:${databasePort}/sql`;
  }
  const builtIn = vars.OAUTH_TOKEN_URL === localOAuthUrls(DEFAULT_OAUTH_PORT).OAUTH_TOKEN_URL;
  const oauthServerPort = builtIn ? (portFromEnv(env, "OAUTH_SERVER_PORT") ?? DEFAULT_OAUTH_PORT) : undefined;
  if (oauthServerPort !== undefined && oauthServerPort !== DEFAULT_OAUTH_PORT) {
    Object.assign(overrides, localOAuthUrls(oauthServerPort));
  }
  // The built-in server is also the RISC transmitter: its configuration document is the Worker's,
  // unless .dev.vars names another transmitter.
  const localRisc = localRiscConfigurationUrl(oauthServerPort ?? DEFAULT_OAUTH_PORT);
  const configuredRisc = vars.RISC_CONFIGURATION_URL;
  if (
    oauthServerPort !== undefined &&
    (!configuredRisc || configuredRisc === localRiscConfigurationUrl(DEFAULT_OAUTH_PORT)) &&
    configuredRisc !== localRisc
  ) {
    overrides.RISC_CONFIGURATION_URL = localRisc;
  }
  // It also serves a small Business Profile API: the proxy's upstream (PROXY_BASE_URLS), unless
  // .dev.vars names another (an older .dev.vars without it would send the proxy to Google).
  const localApi = localApiBaseUrl(oauthServerPort ?? DEFAULT_OAUTH_PORT);
  const configuredApi = vars.PROXY_BASE_URLS;
  if (
    oauthServerPort !== undefined &&
    (!configuredApi || configuredApi === localApiBaseUrl(DEFAULT_OAUTH_PORT)) &&
    configuredApi !== localApi
  ) {
    overrides.PROXY_BASE_URLS = localApi;
  }
  // Its Business Profile API likewise (an older .dev.vars without the variable included).
  const localBusinessProfile = localBusinessProfileUrls(oauthServerPort ?? DEFAULT_OAUTH_PORT);
  const configuredBusinessProfile = vars.BUSINESS_PROFILE_API_BASE_URLS;
  if (
    oauthServerPort !== undefined &&
    (!configuredBusinessProfile || configuredBusinessProfile === localBusinessProfileUrls(DEFAULT_OAUTH_PORT)) &&
    configuredBusinessProfile !== localBusinessProfile
  ) {
    overrides.BUSINESS_PROFILE_API_BASE_URLS = localBusinessProfile;
  }
  return { workerPort: portFromEnv(env, "PORT") ?? DEFAULT_WORKER_PORT, databasePort, oauthServerPort, overrides };
}

/** .dev.vars.example with every `<random-base64-32>` and `<random-key>` replaced by a fresh value. */
export function fillDevVarsTemplate(template: string): string {
  return template
    .replaceAll("<random-base64-32>", () => randomBytes(32).toString("base64"))
    .replaceAll("<random-key>", () => randomBytes(32).toString("base64url"))
    .replaceAll("<random-whsec>", () => `whsec_${randomBytes(32).toString("base64")}`);
}

/** A startup problem the user can fix: printed as one line, no stack trace. */
class DevError extends Error {}

function ensureDevVars(path: string): Record<string, string> {
  if (!existsSync(path)) {
    writeFileSync(path, fillDevVarsTemplate(readFileSync(DEV_VARS_EXAMPLE, "utf8")), { mode: 0o600 });
    log(`wrote ${path} from .dev.vars.example with fresh random keys`);
  } else {
    log(`using ${path}`);
  }
  const vars = readDevVars(path);
  const placeholders = Object.entries(vars).filter(([, value]) => /^<random[^>]*>$/.test(value));
  if (placeholders.length > 0) {
    throw new DevError(
      `${path} still has placeholders (${placeholders.map(([k]) => k).join(", ")}): fill or delete it`,
    );
  }
  log(`ADMIN_API_KEY=${vars.ADMIN_API_KEY ?? "(unset)"}`);
  log(`SERVICE_API_KEY=${vars.SERVICE_API_KEY ?? "(unset)"}`);
  return vars;
}

// ---------------------------------------------------------------------------------------------
// Ports.

/** What listens on each port, and the variable that moves it. */
interface PortUse {
  port: number;
  what: string;
  variable: string;
}

function portInUse(use: PortUse): DevError {
  return new DevError(
    `port ${use.port} (${use.what}) is already in use by another program: stop it, or choose another port with ${use.variable}=<port> npm run dev`,
  );
}

/** Throws a one-line DevError when something else listens on the port (on 127.0.0.1). */
async function assertPortFree(use: PortUse): Promise<void> {
  const server = createServer();
  await new Promise<void>((resolveFree, reject) => {
    server.once("error", (error: NodeJS.ErrnoException) =>
      reject(error.code === "EADDRINUSE" ? portInUse(use) : new DevError(`port ${use.port}: ${error.message}`)),
    );
    server.listen({ port: use.port, host: "127.0.0.1", exclusive: true }, () => server.close(() => resolveFree()));
  });
}

/** A listen() that lost a race for its port becomes the same one line. */
function orPortInUse(use: PortUse) {
  return (error: unknown): never => {
    throw (error as NodeJS.ErrnoException).code === "EADDRINUSE" ? portInUse(use) : error;
  };
}

// ---------------------------------------------------------------------------------------------
// Processes: what a previous run left, and the npm process that started this one.

/** The command lines of a process group's members (ps works the same on Linux and macOS). */
function groupCommands(pgid: number): string[] {
  try {
    return execFileSync("ps", ["-eo", "pgid=,args="], { encoding: "utf8" })
      .split("\n")
      .map((line) => /^\s*(\d+)\s+(.*)$/.exec(line))
      .filter((match) => match !== null && Number(match[1]) === pgid)
      .map((match) => match![2]!);
  } catch {
    return [];
  }
}

/** Stops the wrangler group a previous run recorded, if it is still there (and is wrangler's). */
async function stopLeftovers(pidFile: string): Promise<void> {
  if (!existsSync(pidFile)) return;
  const pgid = Number(readFileSync(pidFile, "utf8").trim());
  if (Number.isInteger(pgid) && pgid > 1 && signalGroup(pgid, 0)) {
    if (groupCommands(pgid).some((command) => /wrangler|workerd/.test(command))) {
      await stopGroup(pgid);
      log(`stopped wrangler (process group ${pgid}) that a previous npm run dev left running`);
    }
  }
  rmSync(pidFile, { force: true });
}

function parentOf(pid: number): { ppid: number; command: string } | undefined {
  try {
    const line = execFileSync("ps", ["-o", "ppid=,args=", "-p", String(pid)], { encoding: "utf8" });
    const match = /^\s*(\d+)\s+(.*)$/.exec(line.trim());
    return match ? { ppid: Number(match[1]), command: match[2]! } : undefined;
  } catch {
    return undefined;
  }
}

/**
 * The processes between this one and the `npm` that started it, npm included (npm → sh → tsx → this):
 * npm does not pass SIGKILL on, and sh and tsx do not stop when their parent dies. Only the parent
 * when this was not started by npm.
 */
function launcherChain(): number[] {
  const chain: number[] = [];
  let pid = process.ppid;
  for (let depth = 0; depth < 6 && pid > 1; depth++) {
    chain.push(pid);
    const info = parentOf(pid);
    if (!info || /(^|\/)npm(-cli\.js)?(\s|$)|npm-cli\.js/.test(info.command)) return chain;
    pid = info.ppid;
  }
  return [process.ppid];
}

const isAlive = (pid: number) => {
  try {
    process.kill(pid, 0);
    return true;
  } catch (error) {
    return (error as NodeJS.ErrnoException).code === "EPERM";
  }
};

/** Calls `onGone` once any process of the launcher chain has exited. */
function watchLauncher(onGone: () => void): void {
  const chain = launcherChain();
  const timer = setInterval(() => {
    if (chain.some((pid) => !isAlive(pid))) {
      clearInterval(timer);
      onGone();
    }
  }, LAUNCHER_POLL_MS);
  timer.unref();
}

async function registerSeededClients(oauth: OAuthServer, seededClients: string): Promise<void> {
  if (!existsSync(seededClients)) return;
  const clients = JSON.parse(readFileSync(seededClients, "utf8")) as {
    client_id: string;
    client_secret: string;
    redirect_uris: string[];
  }[];
  for (const client of clients) {
    const response = await fetch(`${oauth.url}/admin/clients`, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify(client),
    });
    if (!response.ok) log(`could not re-register OAuth client ${client.client_id}: ${await response.text()}`);
  }
  if (clients.length > 0) log(`re-registered ${clients.length} seeded client(s) at the OAuth server`);
}

// ---------------------------------------------------------------------------------------------

async function main(): Promise<void> {
  process.chdir(ROOT);
  const paths = devPaths();

  let db: NeonLocal | undefined;
  let oauth: OAuthServer | undefined;
  let lifeline: ChildProcess | undefined;
  let lifelineExit: Promise<number> | undefined;
  let shuttingDown: Promise<never> | undefined;

  const shutdown = (code: number, reason: string): Promise<never> => {
    shuttingDown ??= (async () => {
      log(`${reason}: shutting down`);
      const force = setTimeout(() => {
        log("shutdown is taking too long, forcing exit");
        process.exit(code || 1);
      }, SHUTDOWN_LIMIT_MS);
      force.unref();
      // The lifeline stops wrangler's whole group (it also got a Ctrl-C itself); the rest at the same time.
      lifeline?.kill("SIGTERM");
      await Promise.all([
        lifelineExit,
        oauth?.close().catch((error: unknown) => log(`closing the OAuth server failed: ${String(error)}`)),
        db?.close().catch((error: unknown) => log(`closing the database failed: ${String(error)}`)),
      ]);
      log("stopped");
      process.exit(code);
    })();
    return shuttingDown;
  };
  // Ctrl-C reaches npm, tsx, the lifeline and us at once (and they relay it): later signals join the same shutdown.
  for (const signal of ["SIGINT", "SIGTERM", "SIGHUP"] as const) {
    process.on(signal, () => void shutdown(0, signal));
  }
  watchLauncher(() => void shutdown(1, "the npm process that started this is gone"));

  let stack: DevStack;
  let webhookUrl: string | undefined;
  try {
    mkdirSync(paths.dataDir, { recursive: true });
    const vars = ensureDevVars(paths.varsFile);
    webhookUrl = vars.WEBHOOK_URL;
    stack = devStack(vars);
    await stopLeftovers(paths.pidFile);

    const ports: Record<"worker" | "database" | "oauth", PortUse> = {
      worker: { port: stack.workerPort, what: "the Worker, wrangler dev", variable: "PORT" },
      database: { port: stack.databasePort, what: "the local database", variable: "NEON_LOCAL_PORT" },
      oauth: { port: stack.oauthServerPort ?? 0, what: "the local OAuth server", variable: "OAUTH_SERVER_PORT" },
    };
    await assertPortFree(ports.worker);
    await assertPortFree(ports.database);
    if (stack.oauthServerPort !== undefined) await assertPortFree(ports.oauth);

    // 1. Database.
    const postgresUrl = [process.env.DATABASE_URL_FOR_DEV, process.env.NEON_LOCAL_DATABASE_URL].find((url) =>
      /^postgres(ql)?:\/\//.test(url ?? ""),
    );
    const backend: BackendOptions = postgresUrl
      ? { kind: "postgres", url: postgresUrl }
      : { kind: "pglite", dataDir: paths.pgliteDir };
    db = await startNeonLocal({ backend, port: stack.databasePort }).catch(orPortInUse(ports.database));
    log(`database: neon-local on ${db.url} (${db.description})`);
    await applyMigrations(vars.TOKEN_MANAGEMENT_DATABASE_URL ?? db.connectionString, db.sqlEndpoint);
    log("migrations applied");

    // 2. OAuth authorization server: the built-in one only when the configuration points at it.
    if (stack.oauthServerPort === undefined) {
      log(
        `OAUTH_TOKEN_URL is ${vars.OAUTH_TOKEN_URL ?? "(unset: wrangler.toml's)"}: using that provider, starting no OAuth server`,
      );
    } else {
      // The Google profile, with the issuer the Worker checks (.dev.vars, else wrangler.toml's Google one).
      oauth = await startOAuthServer({
        port: stack.oauthServerPort,
        profile: "google",
        issuer: vars.OAUTH_ISSUER || "https://accounts.google.com",
        riscReceiverUrl: localRiscReceiverUrl(stack.workerPort),
      }).catch(orPortInUse(ports.oauth));
      if (!vars.OAUTH_ISSUER) log(`no OAUTH_ISSUER in ${paths.varsFile}: the local server uses Google's issuer`);
      log(`OAuth server: ${oauth.url} (register a demo client: npm run dev:seed)`);
      log(
        `Cross-Account Protection: ${oauth.url}/account is the account page; its "Remove access" pushes tokens-revoked to ${localRiscReceiverUrl(stack.workerPort)}`,
      );
      await registerSeededClients(oauth, paths.seededClients);
    }
  } catch (error) {
    const message = error instanceof Error ? error.message : String(error);
    console.error(`[dev] cannot start: ${message}`);
    await shutdown(1, "startup failed");
    return;
  }
  if (shuttingDown) return;

  // 3. wrangler dev, through the lifeline (its own process group, stopped when this process is gone),
  // with the docs page's static assets in place.
  copyDocsAssets();
  const port = String(stack.workerPort);
  const args = [
    "dev",
    "--ip",
    "127.0.0.1",
    "--port",
    port,
    "--test-scheduled",
    "--show-interactive-dev-session=false",
    // wrangler's local state beside the rest of the dev data (DEV_DATA_DIR), not in .wrangler/state.
    "--persist-to",
    join(paths.dataDir, "wrangler"),
    // The file read above, whatever its name (wrangler would otherwise look for .dev.vars itself).
    "--env-file",
    paths.varsFile,
    ...Object.entries(stack.overrides).flatMap(([name, value]) => ["--var", `${name}:${value}`]),
  ];
  for (const [name, value] of Object.entries(stack.overrides))
    log(`${name}=${value} (moved port, or not in .dev.vars)`);
  const env: NodeJS.ProcessEnv = {
    ...process.env,
    PATH: [dirname(process.execPath), process.env.PATH ?? ""].join(delimiter),
    WRANGLER_SEND_METRICS: "false",
    // --env-file is only read when this is not false.
    CLOUDFLARE_LOAD_DEV_VARS_FROM_DOT_ENV: "true",
    // Offline: use miniflare's placeholder `request.cf` instead of fetching one from workers.cloudflare.com.
    CLOUDFLARE_CF_FETCH_ENABLED: process.env.CLOUDFLARE_CF_FETCH_ENABLED ?? "false",
  };
  const wrangler = join(ROOT, "node_modules/.bin/wrangler");
  const child = spawn(
    process.execPath,
    [join(ROOT, "dev/lifeline.ts"), "--pid-file", paths.pidFile, "--", wrangler, ...args],
    // stdin is the lifeline: the pipe closes when this process is gone, however it goes.
    { cwd: ROOT, env, stdio: ["pipe", "inherit", "inherit"] },
  );
  lifeline = child;
  lifelineExit = new Promise<number>((resolveExit) => {
    child.once("exit", (code) => resolveExit(code ?? 1));
    child.once("error", (error) => {
      console.error(`[dev] cannot run wrangler: ${error.message}`);
      resolveExit(1);
    });
  });
  log(`wrangler dev on http://127.0.0.1:${port}/token-management (health: /token-management/health)`);
  log(`console: http://127.0.0.1:${port}/token-management/console (sign in with ADMIN_API_KEY above)`);
  log(
    webhookUrl
      ? `events: logged (GET /token-management/events) and sent to ${webhookUrl}; watch them with npm run dev:webhooks`
      : "events: logged only (GET /token-management/events); set WEBHOOK_URL and WEBHOOK_SECRET in .dev.vars to send them",
  );
  log(`cron: curl "http://127.0.0.1:${port}/cdn-cgi/local/scheduled" (or /__scheduled)`);

  const code = await lifelineExit;
  await shutdown(code, `wrangler exited with code ${code}`);
}

if (process.argv[1] && fileURLToPath(import.meta.url) === resolve(process.argv[1])) {
  main().catch((error: unknown) => {
    console.error("[dev]", error);
    process.exit(1);
  });
}
