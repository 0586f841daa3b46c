/**
 * The stack the browser test drives, started by the test itself on free ports of 127.0.0.1 and
 * hermetic (no .dev.vars, no shell settings for wrangler): the local database (dev/neon-local,
 * PGlite in memory, own process), the local authorization server with its Google profile and its
 * consent screen on (no auto-approve: the browser clicks Approve), and the Worker as
 * `wrangler deploy --dry-run` bundles it, run in workerd through Miniflare with wrangler.toml's
 * [vars] and fresh random keys.
 */
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { unstable_readConfig } from "wrangler";
import * as local from "../../dev/local-stack.ts";
import { type OAuthServer, startOAuthServer } from "../../dev/oauth-server/server.ts";
import { applyMigrations } from "../../scripts/migrate.ts";

export interface Stack {
  /** The Worker's API root: http://127.0.0.1:<port>/token-management. */
  base: string;
  adminKey: string;
  serviceKey: string;
  oauth: OAuthServer;
  db: local.LocalDatabase;
  close(): Promise<void>;
}

export async function startStack(): Promise<Stack> {
  const scratch = mkdtempSync(join(tmpdir(), "tm-browser-"));
  let db: local.LocalDatabase | undefined;
  let oauth: OAuthServer | undefined;
  let worker: local.RunningWorker | undefined;
  const close = async () => {
    await worker?.mf.dispose().catch(() => undefined);
    await oauth?.close().catch(() => undefined);
    if (db) await local.stopDatabase(db);
    rmSync(scratch, { recursive: true, force: true });
  };
  try {
    const bundle = local.bundleWorker(join(scratch, "app"));
    db = await local.startDatabase();
    await applyMigrations(db.connectionString, db.sqlEndpoint);
    oauth = await startOAuthServer({ port: 0, profile: "google", autoApprove: false });
    const adminKey = local.randomApiKey();
    const serviceKey = local.randomApiKey();
    // wrangler.toml's [vars] as a deployment has them; then the local endpoints and keys.
    const vars = unstable_readConfig({ config: join(local.ROOT, "wrangler.toml") }).vars as Record<string, string>;
    worker = await local.startWorker({
      name: "token-management",
      bundle: await bundle,
      bindings: {
        ...vars,
        ...local.localBindings(db, oauth, { adminKey, serviceKey }),
        // The console's Locations ask the local server's Business Profile API.
        BUSINESS_PROFILE_API_BASE_URLS: `${oauth.url},${oauth.url}`,
      },
    });
    return { base: `${worker.url}${local.BASE_PATH}`, adminKey, serviceKey, oauth, db, close };
  } catch (error) {
    await close();
    throw error;
  }
}

/** Registers an OAuth client at the local authorization server, as an operator does at Google. */
/** Registering an OAuth client at the local authorization server, as the benches do it. */
export const registerAtProvider = local.registerAtProvider;

export interface ProviderStats {
  authorizationCodeGrants: number;
  refreshGrants: number;
  revocations: number;
  activeAccessTokens: number;
}

export async function providerStats(oauth: OAuthServer, clientId: string): Promise<ProviderStats> {
  const response = await fetch(`${oauth.url}/admin/clients/${encodeURIComponent(clientId)}/stats`);
  if (!response.ok) throw new Error(`provider stats: ${response.status}`);
  return (await response.json()) as ProviderStats;
}
