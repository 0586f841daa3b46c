/**
 * `npm run db:migrate`: applies drizzle/ to TOKEN_MANAGEMENT_DATABASE_URL through the same Neon HTTP
 * driver the Worker uses. In production that is Neon; in development NEON_LOCAL_FETCH_ENDPOINT
 * points the driver at dev/neon-local. When the URL is not in the environment, .dev.vars supplies
 * both (so a bare `npm run db:migrate` migrates the local database).
 *
 * drizzle's bookkeeping (`drizzle.__drizzle_migrations`) records which migrations ran, not when:
 * `drizzle.__migrations_applied_at` adds the time each one was applied by this script, for
 * `npm run db:status`. Migrations applied before it existed have no time (NULL).
 */
import { readFileSync } from "node:fs";
import { fileURLToPath } from "node:url";
import { neon, neonConfig } from "@neondatabase/serverless";
import { drizzle } from "drizzle-orm/neon-http";
import { migrate } from "drizzle-orm/neon-http/migrator";

export const MIGRATIONS_FOLDER = fileURLToPath(new URL("../drizzle", import.meta.url).href);
/** drizzle's own table of applied migrations (schema `drizzle`, drizzle-orm's default). */
export const DRIZZLE_MIGRATIONS_TABLE = `"drizzle"."__drizzle_migrations"`;
/** When each migration was applied (hash → time), kept beside drizzle's table. */
export const APPLIED_AT_TABLE = `"drizzle"."__migrations_applied_at"`;

/** Where the migration scripts connect: the URL, and dev/neon-local's SQL endpoint when local. */
export interface DatabaseTarget {
  url: string;
  localFetchEndpoint?: string | undefined;
}

/** One SQL function over the Neon HTTP driver, the way the Worker talks to the database. */
export function connect(target: DatabaseTarget) {
  if (target.localFetchEndpoint) neonConfig.fetchEndpoint = target.localFetchEndpoint;
  return neon(target.url);
}

/** Applies drizzle/ (or another folder of drizzle migrations: the rollback-safety test uses copies). */
export async function applyMigrations(
  databaseUrl: string,
  localFetchEndpoint?: string,
  migrationsFolder = MIGRATIONS_FOLDER,
): Promise<void> {
  const sql = connect({ url: databaseUrl, localFetchEndpoint });
  await sql.query(`create schema if not exists "drizzle"`);
  await sql.query(`create table if not exists ${APPLIED_AT_TABLE} (hash text primary key, applied_at timestamptz)`);
  // What ran before this table existed (or before this run) keeps its time, or none: never "now".
  const [known] = await sql.query(`select to_regclass('drizzle.__drizzle_migrations') is not null as present`);
  if (known?.present) {
    await sql.query(
      `insert into ${APPLIED_AT_TABLE} (hash) select hash from ${DRIZZLE_MIGRATIONS_TABLE} on conflict do nothing`,
    );
  }
  await migrate(drizzle({ client: sql }), { migrationsFolder });
  await sql.query(
    `insert into ${APPLIED_AT_TABLE} (hash, applied_at) select hash, now() from ${DRIZZLE_MIGRATIONS_TABLE} on conflict do nothing`,
  );
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

/**
 * The configured database: TOKEN_MANAGEMENT_DATABASE_URL (and NEON_LOCAL_FETCH_ENDPOINT) from the
 * environment when it is set there, else both from .dev.vars; undefined when neither has a URL.
 */
export function configuredDatabase(env: NodeJS.ProcessEnv = process.env): DatabaseTarget | undefined {
  const source = env.TOKEN_MANAGEMENT_DATABASE_URL ? env : readDevVars();
  const url = source.TOKEN_MANAGEMENT_DATABASE_URL;
  return url ? { url, localFetchEndpoint: source.NEON_LOCAL_FETCH_ENDPOINT || undefined } : undefined;
}

/** Where a target is, for messages: the local endpoint, or the Neon host. Never the password. */
export function describeTarget(target: DatabaseTarget): string {
  if (target.localFetchEndpoint) return `local endpoint ${target.localFetchEndpoint}`;
  try {
    return `Neon (${new URL(target.url).host})`;
  } catch {
    return "Neon";
  }
}

async function main(): Promise<void> {
  const target = configuredDatabase();
  if (!target) {
    console.error("TOKEN_MANAGEMENT_DATABASE_URL is not set (in the environment or .dev.vars).");
    process.exit(1);
  }
  await applyMigrations(target.url, target.localFetchEndpoint);
  console.log(`migrations applied (${describeTarget(target)})`);
}

if (process.argv[1] && fileURLToPath(import.meta.url) === process.argv[1]) {
  main().catch((error: unknown) => {
    // The driver's messages do not include the connection string's password.
    console.error(`migration failed: ${error instanceof Error ? error.message : String(error)}`);
    process.exit(1);
  });
}
