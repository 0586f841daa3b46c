/**
 * `npm run db:migrate`: applies drizzle/ to TOKEN_MANAGEMENT_DATABASE_URL through the same Neon HTTP
 * driver the Worker uses. In production that is Neon; in development NEON_LOCAL_FETCH_ENDPOINT
 * points the driver at dev/neon-local. When the URL is not in the environment, .dev.vars supplies
 * both (so a bare `npm run db:migrate` migrates the local database).
 */
import { readFileSync } from "node:fs";
import { fileURLToPath } from "node:url";
import { neon, neonConfig } from "@neondatabase/serverless";
import { drizzle } from "drizzle-orm/neon-http";
import { migrate } from "drizzle-orm/neon-http/migrator";

export const MIGRATIONS_FOLDER = fileURLToPath(new URL("../drizzle", import.meta.url).href);

export async function applyMigrations(databaseUrl: string, localFetchEndpoint?: string): Promise<void> {
  if (localFetchEndpoint) neonConfig.fetchEndpoint = localFetchEndpoint;
  await migrate(drizzle({ client: neon(databaseUrl) }), { migrationsFolder: MIGRATIONS_FOLDER });
}

export function readDevVars(path = ".dev.vars"): Record<string, string> {
  let text: string;
  try {
    text = readFileSync(path, "utf8");
  } catch {
    return {};
  }
  const vars: Record<string, string> = {};
  for (const line of text.split("\n")) {
    const match = /^\s*([A-Z0-9_]+)\s*=\s*(.*?)\s*$/.exec(line);
    if (match?.[1]) vars[match[1]] = (match[2] ?? "").replace(/^"(.*)"$/, "$1");
  }
  return vars;
}

async function main(): Promise<void> {
  const fromEnv = process.env.TOKEN_MANAGEMENT_DATABASE_URL;
  const source = fromEnv ? process.env : readDevVars();
  const url = source.TOKEN_MANAGEMENT_DATABASE_URL;
  if (!url) {
    console.error("TOKEN_MANAGEMENT_DATABASE_URL is not set (in the environment or .dev.vars).");
    process.exit(1);
  }
  const endpoint = source.NEON_LOCAL_FETCH_ENDPOINT || undefined;
  await applyMigrations(url, endpoint);
  console.log(`migrations applied (${endpoint ? `local endpoint ${endpoint}` : "Neon"})`);
}

if (process.argv[1] && fileURLToPath(import.meta.url) === process.argv[1]) {
  main().catch((error: unknown) => {
    // The driver's messages do not include the connection string's password.
    console.error(`migration failed: ${error instanceof Error ? error.message : String(error)}`);
    process.exit(1);
  });
}
