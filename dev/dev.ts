/**
 * `npm run dev`: the whole local stack in one command, offline, no Cloudflare account.
 *
 * 1. writes .dev.vars from .dev.vars.example when missing (fresh random keys),
 * 2. starts the local database (dev/neon-local on PGlite in .data/pglite, or on the PostgreSQL server
 *    named by DATABASE_URL_FOR_DEV / NEON_LOCAL_DATABASE_URL) and applies the migrations through it,
 * 3. starts the local OAuth authorization server (dev/oauth-server) unless OAUTH_TOKEN_URL points elsewhere,
 *    re-registering the clients `npm run dev:seed` recorded (it keeps its state in memory),
 * 4. runs `wrangler dev` on 127.0.0.1:${PORT:-8787} with --test-scheduled.
 *
 * Ctrl-C / SIGTERM stops wrangler (its whole process group, workerd included), then the OAuth server and
 * the database (PGlite closed cleanly so the data persists). If wrangler exits on its own, the rest is
 * shut down and this exits with wrangler's code.
 */
import { type ChildProcess, spawn } from "node:child_process";
import { randomBytes } from "node:crypto";
import { existsSync, readFileSync, writeFileSync } from "node:fs";
import { constants } from "node:os";
import { delimiter, dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { applyMigrations, readDevVars } from "../scripts/migrate.ts";
import { type BackendOptions, type NeonLocal, startNeonLocal } from "./neon-local/server.ts";
import { type OAuthServer, startOAuthServer } from "./oauth-server/server.ts";

const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), "..");
const DEV_VARS = join(ROOT, ".dev.vars");
const DEV_VARS_EXAMPLE = join(ROOT, ".dev.vars.example");
const PGLITE_DIR = ".data/pglite";
/** Written by dev/seed.ts: clients to register again at the (in-memory) local authorization server. */
export const SEEDED_OAUTH_CLIENTS = join(ROOT, ".data/dev-oauth-clients.json");
const SHUTDOWN_GRACE_MS = 8_000;

const log = (message: string) => console.log(`[dev] ${message}`);

/** .dev.vars.example with every `<random-base64-32>` and `<random-key>` replaced by a fresh value. */
export function fillDevVarsTemplate(template: string): string {
  return template
    .replaceAll("<random-base64-32>", () => randomBytes(32).toString("base64"))
    .replaceAll("<random-key>", () => randomBytes(32).toString("base64url"));
}

function ensureDevVars(): Record<string, string> {
  if (!existsSync(DEV_VARS)) {
    writeFileSync(DEV_VARS, fillDevVarsTemplate(readFileSync(DEV_VARS_EXAMPLE, "utf8")), { mode: 0o600 });
    log(`wrote ${DEV_VARS} from .dev.vars.example with fresh random keys`);
  } else {
    log(`using ${DEV_VARS}`);
  }
  const vars = readDevVars(DEV_VARS);
  const placeholders = Object.entries(vars).filter(([, value]) => /^<random[^>]*>$/.test(value));
  if (placeholders.length > 0) {
    throw new Error(`.dev.vars still has placeholders (${placeholders.map(([k]) => k).join(", ")}): fill or delete it`);
  }
  log(`ADMIN_API_KEY=${vars.ADMIN_API_KEY ?? "(unset)"}`);
  log(`SERVICE_API_KEY=${vars.SERVICE_API_KEY ?? "(unset)"}`);
  return vars;
}

function portOf(url: string | undefined, fallback: number): number {
  if (!url) return fallback;
  const parsed = new URL(url);
  return parsed.port ? Number(parsed.port) : fallback;
}

function isLocalHost(url: string): boolean {
  const host = new URL(url).hostname;
  return host === "127.0.0.1" || host === "localhost" || host === "[::1]";
}

async function registerSeededClients(oauth: OAuthServer): Promise<void> {
  if (!existsSync(SEEDED_OAUTH_CLIENTS)) return;
  const clients = JSON.parse(readFileSync(SEEDED_OAUTH_CLIENTS, "utf8")) as {
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

function killGroup(pid: number, signal: NodeJS.Signals | 0): boolean {
  try {
    process.kill(-pid, signal);
    return true;
  } catch {
    return false; // ESRCH: nothing left in the group
  }
}

async function main(): Promise<void> {
  process.chdir(ROOT);
  const vars = ensureDevVars();

  let db: NeonLocal | undefined;
  let oauth: OAuthServer | undefined;
  let wrangler: ChildProcess | undefined;
  let wranglerExit: Promise<number> | undefined;
  let shuttingDown: Promise<never> | undefined;

  const shutdown = (code: number, reason: string): Promise<never> => {
    shuttingDown ??= (async () => {
      log(`${reason}: shutting down`);
      const force = setTimeout(() => {
        log("shutdown is taking too long, forcing exit");
        if (wrangler?.pid) killGroup(wrangler.pid, "SIGKILL");
        process.exit(code || 1);
      }, SHUTDOWN_GRACE_MS + 5_000);
      force.unref();
      if (wrangler?.pid) {
        const pid = wrangler.pid;
        killGroup(pid, "SIGTERM");
        const deadline = Date.now() + SHUTDOWN_GRACE_MS;
        await wranglerExit;
        // workerd may outlive wrangler by a moment: wait for the whole group to be gone.
        while (killGroup(pid, 0) && Date.now() < deadline) {
          await new Promise((r) => setTimeout(r, 100));
        }
        if (killGroup(pid, "SIGKILL")) log("killed what was left of wrangler's process group");
      }
      await oauth?.close().catch((error: unknown) => log(`closing the OAuth server failed: ${String(error)}`));
      await db?.close().catch((error: unknown) => log(`closing the database failed: ${String(error)}`));
      log("stopped");
      process.exit(code);
    })();
    return shuttingDown;
  };
  // Ctrl-C reaches npm, tsx and us at once (and they relay it): later signals join the same shutdown.
  for (const signal of ["SIGINT", "SIGTERM", "SIGHUP"] as const) {
    process.on(signal, () => void shutdown(0, signal));
  }

  try {
    // 1. Database.
    const postgresUrl = [process.env.DATABASE_URL_FOR_DEV, process.env.NEON_LOCAL_DATABASE_URL].find((url) =>
      /^postgres(ql)?:\/\//.test(url ?? ""),
    );
    const backend: BackendOptions = postgresUrl
      ? { kind: "postgres", url: postgresUrl }
      : { kind: "pglite", dataDir: PGLITE_DIR };
    const dbPort = portOf(vars.NEON_LOCAL_FETCH_ENDPOINT, 4444);
    db = await startNeonLocal({ backend, port: dbPort });
    log(`database: neon-local on ${db.url} (${db.description})`);
    await applyMigrations(vars.TOKEN_MANAGEMENT_DATABASE_URL ?? db.connectionString, db.sqlEndpoint);
    log("migrations applied");

    // 2. OAuth authorization server.
    const tokenUrl = vars.OAUTH_TOKEN_URL;
    if (tokenUrl && !isLocalHost(tokenUrl)) {
      log(`OAUTH_TOKEN_URL is ${tokenUrl}: not starting the local OAuth server`);
    } else {
      // The Google profile, with the issuer the Worker checks (.dev.vars, else wrangler.toml's Google one).
      oauth = await startOAuthServer({
        port: portOf(tokenUrl, 4445),
        profile: "google",
        issuer: vars.OAUTH_ISSUER || "https://accounts.google.com",
      });
      if (!vars.OAUTH_ISSUER) log("no OAUTH_ISSUER in .dev.vars: the local server uses Google's issuer");
      log(`OAuth server: ${oauth.url} (register a demo client: npm run dev:seed)`);
      await registerSeededClients(oauth);
    }
  } catch (error) {
    console.error(`[dev] cannot start: ${error instanceof Error ? error.message : String(error)}`);
    await shutdown(1, "startup failed");
  }
  if (shuttingDown) return;

  // 3. wrangler dev, in its own process group so that it and its workerd children can be stopped together.
  const port = process.env.PORT || "8787";
  const args = ["dev", "--ip", "127.0.0.1", "--port", port, "--test-scheduled", "--show-interactive-dev-session=false"];
  const env: NodeJS.ProcessEnv = {
    ...process.env,
    PATH: [dirname(process.execPath), process.env.PATH ?? ""].join(delimiter),
    WRANGLER_SEND_METRICS: "false",
    // Offline: use miniflare's placeholder `request.cf` instead of fetching one from workers.cloudflare.com.
    CLOUDFLARE_CF_FETCH_ENABLED: process.env.CLOUDFLARE_CF_FETCH_ENABLED ?? "false",
  };
  const child = spawn(join(ROOT, "node_modules/.bin/wrangler"), args, {
    cwd: ROOT,
    env,
    // stdin ignored: a background process group reading the terminal would be stopped (SIGTTIN).
    stdio: ["ignore", "inherit", "inherit"],
    detached: true,
  });
  wrangler = child;
  wranglerExit = new Promise<number>((resolveExit) => {
    child.once("exit", (code, signal) => resolveExit(code ?? 128 + (signal ? constants.signals[signal] : 0)));
    child.once("error", (error) => {
      console.error(`[dev] cannot run wrangler: ${error.message}`);
      resolveExit(1);
    });
  });
  log(`wrangler dev on http://127.0.0.1:${port}/token-management (health: /token-management/health)`);
  log(`cron: curl "http://127.0.0.1:${port}/cdn-cgi/local/scheduled" (or /__scheduled)`);

  const code = await wranglerExit;
  await shutdown(code, `wrangler exited with code ${code}`);
}

if (process.argv[1] && fileURLToPath(import.meta.url) === resolve(process.argv[1])) {
  main().catch((error: unknown) => {
    console.error("[dev]", error);
    process.exit(1);
  });
}
