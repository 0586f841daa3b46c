// PGlite (PostgreSQL compiled to WebAssembly, in process) behind the Neon HTTP protocol.
import { mkdir, readFile, rm, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { PGlite, type QueryOptions, type Results, type Transaction } from "@electric-sql/pglite";
import {
  type BatchOptions,
  fieldDescription,
  type QueryResult,
  type SqlBackend,
  type SqlQuery,
  transactionModes,
} from "./server.ts";

/** Marks a data directory as open: PGlite itself does not stop a second process from opening it. */
const LOCK_FILE = "neon-local.pid";

const SESSION_SETUP = "SET TimeZone = 'UTC'; SET DateStyle = 'ISO, MDY';";

type Queryable = Pick<Transaction, "query">;

/** Opens (creating if needed) a PGlite database; `dataDir` undefined keeps it in memory. */
export async function openPgliteBackend(dataDir?: string): Promise<SqlBackend> {
  let unlock = async () => {};
  if (dataDir !== undefined) {
    await mkdir(dataDir, { recursive: true });
    unlock = await lockDataDir(dataDir);
  }
  let db: PGlite;
  try {
    db = await PGlite.create({ dataDir });
    await db.exec(SESSION_SETUP);
  } catch (error) {
    await unlock();
    throw error;
  }

  let cached: { size: number; options: QueryOptions } | undefined;
  const options = (): QueryOptions => {
    cached = queryOptions(db, cached);
    return cached.options;
  };

  // PGlite is one connection: run one request at a time, in arrival order.
  let tail: Promise<unknown> = Promise.resolve();
  const exclusive = <T>(work: () => Promise<T>): Promise<T> => {
    const run = tail.then(work, work);
    tail = run.catch(() => undefined);
    return run;
  };

  const run = async (on: Queryable, { query, params }: SqlQuery): Promise<QueryResult> => {
    const result = await on.query<unknown[]>(query, params, options());
    return toQueryResult(result);
  };

  let closed: Promise<void> | undefined;
  return {
    description: `pglite: ${dataDir ?? "memory"}`,
    query: (query) => exclusive(() => run(db, query)),
    batch: (queries, batchOptions: BatchOptions) =>
      exclusive(() =>
        db.transaction(async (tx) => {
          const modes = transactionModes(batchOptions);
          if (modes) await tx.query(`SET TRANSACTION ${modes}`);
          const results: QueryResult[] = [];
          for (const query of queries) results.push(await run(tx, query));
          return results;
        }),
      ),
    close: () => {
      closed ??= exclusive(async () => {
        await db.close();
        await unlock();
      });
      return closed;
    },
  };
}

/**
 * Array rows, and no conversion either way: the driver sends PostgreSQL text and parses PostgreSQL
 * text itself. Without pass-through serializers PGlite re-encodes the driver's text (bytea, arrays).
 * The maps cover every type PGlite knows, including the array types it loads at start-up.
 */
function queryOptions(
  db: PGlite,
  cached: { size: number; options: QueryOptions } | undefined,
): { size: number; options: QueryOptions } {
  // PGlite's own (instance) maps: not part of its typed API, hence the cast.
  const known = db as unknown as { parsers: Record<string, unknown>; serializers: Record<string, unknown> };
  const oids = new Set([...Object.keys(known.parsers), ...Object.keys(known.serializers)]);
  if (cached?.size === oids.size) return cached;
  const passThrough = Object.fromEntries([...oids].map((oid) => [oid, (text: string) => text]));
  return { size: oids.size, options: { rowMode: "array", parsers: passThrough, serializers: passThrough } };
}

function toQueryResult(result: Results<unknown[]>): QueryResult {
  return {
    fields: result.fields.map(fieldDescription),
    rows: result.rows as (string | null)[][],
    command: result.command ?? "",
    rowCount: result.rowCount ?? null,
  };
}

/** Takes the directory's lock file, or fails if a live process holds it; returns the release. */
async function lockDataDir(dataDir: string): Promise<() => Promise<void>> {
  const path = join(dataDir, LOCK_FILE);
  for (;;) {
    try {
      await writeFile(path, String(process.pid), { flag: "wx" });
      return () => rm(path, { force: true });
    } catch (error) {
      if ((error as NodeJS.ErrnoException).code !== "EEXIST") throw error;
    }
    const holder = Number((await readFile(path, "utf8").catch(() => "")).trim());
    if (Number.isInteger(holder) && holder > 0 && isAlive(holder)) {
      throw new Error(
        `PGlite data directory ${dataDir} is already open in process ${holder}` +
          (holder === process.pid ? " (this one)" : "") +
          `; one directory must never be opened twice (stale? delete ${path})`,
      );
    }
    await rm(path, { force: true }); // left behind by a process that is gone
  }
}

function isAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (error) {
    return (error as NodeJS.ErrnoException).code === "EPERM";
  }
}
