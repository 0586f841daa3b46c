/**
 * `npm run db:status`: each migration of drizzle/ and whether the configured database has it, with
 * the time it was applied, or "pending". The database is the one `npm run db:migrate` would migrate
 * (TOKEN_MANAGEMENT_DATABASE_URL from the environment, else .dev.vars), reached the same way.
 *
 * Exit codes: 0 every migration applied, 1 something pending, 2 the database could not be read
 * (one line on stderr, no stack trace).
 */
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { readMigrationFiles } from "drizzle-orm/migrator";
import {
  APPLIED_AT_TABLE,
  configuredDatabase,
  connect,
  type DatabaseTarget,
  DRIZZLE_MIGRATIONS_TABLE,
  describeTarget,
  MIGRATIONS_FOLDER,
} from "./migrate.ts";

export const EXIT_ALL_APPLIED = 0;
export const EXIT_PENDING = 1;
export const EXIT_UNREADABLE = 2;

export interface MigrationStatus {
  tag: string;
  /** Applied per drizzle's rule (its time is not after the last applied one's). */
  applied: boolean;
  /** When `npm run db:migrate` applied it; null when unknown (applied before times were kept). */
  appliedAt: Date | null;
  /** Applied, but the file no longer matches what was applied. */
  changedSinceApplied: boolean;
}

interface AppliedRow {
  hash: string;
  created_at: string;
  applied_at: Date | string | null;
}

/** The status of every migration in drizzle/, in order. */
export async function migrationStatus(target: DatabaseTarget): Promise<MigrationStatus[]> {
  const journal = JSON.parse(readFileSync(join(MIGRATIONS_FOLDER, "meta/_journal.json"), "utf8")) as {
    entries: { tag: string }[];
  };
  const files = readMigrationFiles({ migrationsFolder: MIGRATIONS_FOLDER });
  const sql = connect(target);
  const [tables] = (await sql.query(
    `select to_regclass('drizzle.__drizzle_migrations') is not null as migrations,
            to_regclass('drizzle.__migrations_applied_at') is not null as times`,
  )) as { migrations: boolean; times: boolean }[];
  const rows: AppliedRow[] = !tables?.migrations
    ? []
    : ((await sql.query(
        tables.times
          ? `select m.hash, m.created_at::text as created_at, t.applied_at
               from ${DRIZZLE_MIGRATIONS_TABLE} m left join ${APPLIED_AT_TABLE} t on t.hash = m.hash`
          : `select hash, created_at::text as created_at, null as applied_at from ${DRIZZLE_MIGRATIONS_TABLE}`,
      )) as AppliedRow[]);
  // drizzle applies a migration when its journal time is after the last applied one's: the same rule here.
  const lastApplied = rows.reduce((max, row) => Math.max(max, Number(row.created_at)), Number.NEGATIVE_INFINITY);
  return files.map((file, index) => {
    const row = rows.find((r) => r.hash === file.hash);
    const applied = file.folderMillis <= lastApplied;
    return {
      tag: journal.entries[index]?.tag ?? `#${index}`,
      applied,
      appliedAt: row?.applied_at ? new Date(row.applied_at) : null,
      changedSinceApplied: applied && !row,
    };
  });
}

export function formatStatus(statuses: MigrationStatus[]): string {
  const width = Math.max(...statuses.map((s) => s.tag.length));
  return statuses
    .map((s) => {
      const state = !s.applied
        ? "pending"
        : `applied ${s.appliedAt ? s.appliedAt.toISOString() : "(time not recorded)"}${
            s.changedSinceApplied ? " (the file changed since)" : ""
          }`;
      return `${s.tag.padEnd(width)}  ${state}`;
    })
    .join("\n");
}

/**
 * The driver's error in one line, with its innermost cause (e.g. "connect ECONNREFUSED …"); the
 * driver's messages never include the connection string's password.
 */
function oneLine(error: unknown): string {
  let message = error instanceof Error ? error.message : String(error);
  // The Neon driver keeps the failed fetch's error in `sourceError`, fetch keeps the socket's in `cause`.
  const next = (e: Error): unknown => (e as { sourceError?: unknown }).sourceError ?? e.cause;
  let cause = error instanceof Error ? next(error) : undefined;
  while (cause instanceof Error) {
    if (!message.includes(cause.message)) message = `${message}: ${cause.message}`;
    cause = next(cause);
  }
  return message.replace(/\s+/g, " ").trim();
}

async function main(): Promise<number> {
  const target = configuredDatabase();
  if (!target) {
    console.error("db:status: TOKEN_MANAGEMENT_DATABASE_URL is not set (in the environment or .dev.vars).");
    return EXIT_UNREADABLE;
  }
  let statuses: MigrationStatus[];
  try {
    statuses = await migrationStatus(target);
  } catch (error) {
    console.error(`db:status: cannot read the database at ${describeTarget(target)}: ${oneLine(error)}`);
    return EXIT_UNREADABLE;
  }
  console.log(`database: ${describeTarget(target)}`);
  console.log(formatStatus(statuses));
  const pending = statuses.filter((s) => !s.applied).length;
  console.log(pending === 0 ? "up to date" : `${pending} pending: run npm run db:migrate`);
  return pending === 0 ? EXIT_ALL_APPLIED : EXIT_PENDING;
}

if (process.argv[1] && fileURLToPath(import.meta.url) === process.argv[1]) {
  main().then(
    (code) => process.exit(code),
    (error: unknown) => {
      console.error(`db:status: ${oneLine(error)}`);
      process.exit(EXIT_UNREADABLE);
    },
  );
}
