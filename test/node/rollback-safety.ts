/**
 * Rollback safety of the migrations: `wrangler rollback` restores code, never the database, so after
 * every migration the PREVIOUS release must still read and write what it did. The previous release's
 * schema is the drizzle snapshot of the last migration it shipped with (drizzle/release.json,
 * bumped at each release). On a database that holds the previous release's data:
 *
 *   - every table and column it knew still answers `select <its columns> from <table>`, with the
 *     same values in the rows it wrote (a migration may add, never drop, rename or rewrite);
 *   - every column keeps its type (the old code's values and parsing still fit);
 *   - the old code's inserts, with only the columns it knew, still succeed (a new NOT NULL column
 *     needs a default);
 *   - the unique constraints it knew are still there (its conflict handling turns their violations
 *     into answers), unless release.json lists one as safe to drop, with the reason.
 *
 * Dropping NOT NULL, a foreign key, a CHECK or a plain index keeps old reads and writes working and
 * is allowed. (Rows the NEW release writes with NULL there are a different matter: the README's rule
 * says what a release must still write for the previous one.)
 */
import { copyFileSync, mkdirSync, readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { connect, MIGRATIONS_FOLDER } from "../../scripts/migrate.ts";

export const RELEASE_FILE = join(MIGRATIONS_FOLDER, "release.json");

export interface ReleaseFile {
  /** The tag of the last migration the previous release shipped with. */
  previous: string;
  /** Unique constraints or indexes of the previous release that may be dropped: name -> why. */
  unique_drops_allowed?: Record<string, string>;
}

interface SnapshotColumn {
  name: string;
  type: string;
  primaryKey: boolean;
  notNull: boolean;
  default?: string | number | boolean;
}

interface SnapshotTable {
  name: string;
  schema: string;
  columns: Record<string, SnapshotColumn>;
  indexes: Record<string, { name: string; isUnique: boolean; where?: string; columns: { expression: string }[] }>;
  foreignKeys: Record<string, { tableTo: string; columnsFrom: string[]; columnsTo: string[] }>;
  uniqueConstraints: Record<string, { name: string; columns: string[] }>;
}

export interface Snapshot {
  tables: Record<string, SnapshotTable>;
  enums: Record<string, { name: string; values: string[] }>;
}

interface Journal {
  entries: { idx: number; tag: string; when: number; breakpoints: boolean; version: string }[];
}

export type Sql = ReturnType<typeof connect>;
export interface Target {
  url: string;
  localFetchEndpoint?: string | undefined;
}

export function readRelease(path = RELEASE_FILE): ReleaseFile {
  return JSON.parse(readFileSync(path, "utf8")) as ReleaseFile;
}

function readJournal(folder: string): Journal {
  return JSON.parse(readFileSync(join(folder, "meta/_journal.json"), "utf8")) as Journal;
}

export function snapshotOf(tag: string, folder = MIGRATIONS_FOLDER): Snapshot {
  const entry = readJournal(folder).entries.find((e) => e.tag === tag);
  if (!entry) throw new Error(`drizzle/release.json names ${tag}, which is not in drizzle/meta/_journal.json`);
  const file = join(folder, "meta", `${String(entry.idx).padStart(4, "0")}_snapshot.json`);
  return JSON.parse(readFileSync(file, "utf8")) as Snapshot;
}

/**
 * A copy of drizzle/ in `dest` holding the migrations up to and including `upTo` (all when
 * undefined), plus `extra` migrations after them (name -> SQL), as drizzle-kit would have written them.
 */
export function migrationsCopy(dest: string, options: { upTo?: string; extra?: Record<string, string> } = {}): string {
  const journal = readJournal(MIGRATIONS_FOLDER);
  let entries = journal.entries;
  if (options.upTo) {
    const last = entries.findIndex((e) => e.tag === options.upTo);
    if (last < 0) throw new Error(`${options.upTo} is not in drizzle/meta/_journal.json`);
    entries = entries.slice(0, last + 1);
  }
  mkdirSync(join(dest, "meta"), { recursive: true });
  for (const entry of entries)
    copyFileSync(join(MIGRATIONS_FOLDER, `${entry.tag}.sql`), join(dest, `${entry.tag}.sql`));
  let when = Math.max(...entries.map((e) => e.when));
  for (const [name, sql] of Object.entries(options.extra ?? {})) {
    const tag = `${String(entries.length).padStart(4, "0")}_${name}`;
    writeFileSync(join(dest, `${tag}.sql`), sql);
    entries = [...entries, { idx: entries.length, version: "7", when: ++when, tag, breakpoints: true }];
  }
  writeFileSync(join(dest, "meta/_journal.json"), JSON.stringify({ ...journal, entries }, null, 2));
  return dest;
}

/** The tags in drizzle/ after `tag` (the migrations a rollback to that release would leave applied). */
export function tagsAfter(tag: string): string[] {
  const entries = readJournal(MIGRATIONS_FOLDER).entries;
  return entries.slice(entries.findIndex((e) => e.tag === tag) + 1).map((e) => e.tag);
}

const ident = (name: string) => `"${name.replaceAll('"', '""')}"`;
const SERIAL = /^(small|big)?serial$/;
/** Text columns whose values the code matches on: realistic values, in case a CHECK appears later. */
const REALISTIC: Record<string, string> = {
  "events.type": "connection.needs_reauth",
  "events.delivery_state": "pending",
  "events.status_before": "active",
  "events.status_after": "needs_reauth",
};

/** Tables in an order where every table comes after those its foreign keys point at. */
function inDependencyOrder(snapshot: Snapshot): SnapshotTable[] {
  const tables = Object.values(snapshot.tables);
  const done = new Set<string>();
  const ordered: SnapshotTable[] = [];
  while (ordered.length < tables.length) {
    const ready = tables.filter(
      (t) =>
        !done.has(t.name) && Object.values(t.foreignKeys).every((fk) => fk.tableTo === t.name || done.has(fk.tableTo)),
    );
    if (ready.length === 0) throw new Error("foreign keys form a cycle: the rollback check cannot order the tables");
    for (const table of ready) {
      done.add(table.name);
      ordered.push(table);
    }
  }
  return ordered;
}

/** A literal default drizzle-kit recorded ('active', 0, true), as a value; undefined for expressions. */
function literalDefault(column: SnapshotColumn): string | undefined {
  const value = column.default;
  if (value === undefined) return undefined;
  if (typeof value !== "string") return String(value);
  const quoted = /^'(.*)'$/.exec(value);
  if (quoted) return quoted[1]!.replaceAll("''", "'");
  return /^-?\d+(\.\d+)?$|^(true|false)$/.test(value) ? value : undefined;
}

/** A value of the column's type for row number n (1: seeded before the migrations, 2: written after). */
function valueFor(snapshot: Snapshot, table: SnapshotTable, column: SnapshotColumn, n: number): string {
  const realistic = REALISTIC[`${table.name}.${column.name}`];
  if (realistic) return realistic;
  const literal = literalDefault(column);
  if (literal !== undefined) return literal;
  const type = column.type.replace(/^"?public"?\./, "").replaceAll('"', "");
  if (/^(smallint|integer|bigint|numeric.*|real|double precision)$/.test(type)) return String(n * 7);
  if (type === "boolean") return "true";
  if (/^timestamp/.test(type) || type === "date") return `2026-01-0${n}T00:00:00.000Z`;
  if (/^(text|varchar.*|character varying.*|char.*)$/.test(type)) return `${table.name}.${column.name}#${n}`;
  if (type === "jsonb" || type === "json") return JSON.stringify({ n });
  if (type === "uuid") return `00000000-0000-4000-8000-00000000000${n}`;
  const enumType = Object.values(snapshot.enums).find((e) => e.name === type);
  if (enumType?.values[0]) return enumType.values[0];
  throw new Error(`rollback check: no test value for ${table.name}.${column.name} of type ${column.type}: add one`);
}

/**
 * Inserts row number n into every table the snapshot knows, with every column it knew but serials
 * (as the old code's inserts name them), foreign keys pointing at the parent's row number n.
 * Returns the problems (an insert that fails) and each table's new row id.
 */
export async function writeAsRelease(
  sql: Sql,
  snapshot: Snapshot,
  n: number,
): Promise<{ problems: string[]; ids: Map<string, string> }> {
  const problems: string[] = [];
  const ids = new Map<string, string>();
  const rowIdOf = new Map<string, Map<string, string>>();
  for (const table of inDependencyOrder(snapshot)) {
    const names: string[] = [];
    const values: string[] = [];
    const fkOf = new Map<string, { tableTo: string; columnTo: string }>();
    for (const fk of Object.values(table.foreignKeys)) {
      fk.columnsFrom.forEach((from, i) => {
        fkOf.set(from, { tableTo: fk.tableTo, columnTo: fk.columnsTo[i]! });
      });
    }
    for (const column of Object.values(table.columns)) {
      if (SERIAL.test(column.type)) continue;
      const fk = fkOf.get(column.name);
      const value = fk ? rowIdOf.get(fk.tableTo)?.get(fk.columnTo) : valueFor(snapshot, table, column, n);
      if (value === undefined) continue; // the parent row could not be written: reported there
      names.push(column.name);
      values.push(value);
    }
    const key = Object.values(table.columns).find((c) => c.primaryKey)?.name;
    const returning = Object.keys(table.columns).map(ident).join(", ");
    try {
      const rows = (await sql.query(
        `insert into ${ident(table.name)} (${names.map(ident).join(", ")}) values (${values.map((_, i) => `$${i + 1}`).join(", ")}) returning ${returning}`,
        values,
      )) as Record<string, unknown>[];
      const row = rows[0]!;
      rowIdOf.set(table.name, new Map(Object.entries(row).map(([k, v]) => [k, textOf(v)])));
      if (key) ids.set(table.name, textOf(row[key]));
    } catch (error) {
      problems.push(
        `${table.name}: the previous release's insert (columns ${names.join(", ")}) fails: ${messageOf(error)}`,
      );
    }
  }
  return { problems, ids };
}

function textOf(value: unknown): string {
  if (value instanceof Date) return value.toISOString();
  return typeof value === "object" && value !== null ? JSON.stringify(value) : String(value);
}

function messageOf(error: unknown): string {
  return error instanceof Error ? error.message : String(error);
}

/** Each old column's value in a row, as PostgreSQL prints it (`::text`), by primary key. */
export async function readAsRelease(
  sql: Sql,
  table: SnapshotTable,
  id: string | undefined,
): Promise<Record<string, string | null>> {
  const columns = Object.keys(table.columns);
  const key = Object.values(table.columns).find((c) => c.primaryKey)?.name;
  const where = key && id !== undefined ? ` where ${ident(key)}::text = $1` : "";
  const rows = (await sql.query(
    `select ${columns.map((c) => `${ident(c)}::text as ${ident(c)}`).join(", ")} from ${ident(table.name)}${where} limit 1`,
    where ? [id] : [],
  )) as Record<string, string | null>[];
  if (rows.length === 0) throw new Error("the row the previous release wrote is gone");
  return rows[0]!;
}

interface LiveColumn {
  table: string;
  column: string;
  type: string;
}

async function liveColumns(sql: Sql): Promise<LiveColumn[]> {
  return (await sql.query(
    `select c.relname as "table", a.attname as "column", format_type(a.atttypid, a.atttypmod) as "type"
       from pg_attribute a join pg_class c on c.oid = a.attrelid join pg_namespace n on n.oid = c.relnamespace
      where n.nspname = 'public' and c.relkind in ('r', 'p', 'v') and a.attnum > 0 and not a.attisdropped`,
  )) as LiveColumn[];
}

/** Unique indexes (constraints included) as "table(col, col)" plus " partial" when they have a WHERE. */
async function liveUniques(sql: Sql): Promise<Set<string>> {
  const rows = (await sql.query(
    `select t.relname as "table", i.indpred is not null as partial,
            array_to_string(array(select a.attname from unnest(i.indkey) k join pg_attribute a
              on a.attrelid = t.oid and a.attnum = k order by a.attname), ', ') as columns
       from pg_index i join pg_class t on t.oid = i.indrelid join pg_namespace n on n.oid = t.relnamespace
      where n.nspname = 'public' and i.indisunique and not i.indisprimary`,
  )) as { table: string; partial: boolean; columns: string }[];
  return new Set(rows.map((r) => `${r.table}(${r.columns})${r.partial ? " partial" : ""}`));
}

/** The type as format_type prints it: drizzle-kit writes serials and may qualify enums. */
function expectedType(column: SnapshotColumn): string {
  const type = column.type.replace(/^"?public"?\./, "").replaceAll('"', "");
  return { serial: "integer", bigserial: "bigint", smallserial: "smallint" }[type] ?? type;
}

/**
 * What the previous release would find broken on this database, which must hold the row it wrote
 * before the migrations (`seeded`: row values by table, from readAsRelease). Empty when safe.
 */
export async function problemsForPreviousRelease(
  sql: Sql,
  snapshot: Snapshot,
  seeded: Map<string, { id: string | undefined; row: Record<string, string | null> }>,
  release: Pick<ReleaseFile, "unique_drops_allowed">,
): Promise<string[]> {
  const problems: string[] = [];
  const live = await liveColumns(sql);
  const liveTables = new Set(live.map((c) => c.table));
  for (const table of Object.values(snapshot.tables)) {
    if (!liveTables.has(table.name)) {
      problems.push(`${table.name}: table is gone (dropped or renamed), and the previous release reads it`);
      continue;
    }
    for (const column of Object.values(table.columns)) {
      const found = live.find((c) => c.table === table.name && c.column === column.name);
      if (!found) problems.push(`${table.name}.${column.name}: column is gone (dropped or renamed)`);
      else if (found.type !== expectedType(column)) {
        problems.push(`${table.name}.${column.name}: type changed from ${expectedType(column)} to ${found.type}`);
      }
    }
    const before = seeded.get(table.name);
    if (!before) continue;
    try {
      const after = await readAsRelease(sql, table, before.id);
      for (const [name, value] of Object.entries(before.row)) {
        if (after[name] !== value) {
          problems.push(`${table.name}.${name}: the previous release's value changed from ${value} to ${after[name]}`);
        }
      }
    } catch (error) {
      problems.push(`${table.name}: the previous release's select fails: ${messageOf(error)}`);
    }
  }
  const uniques = await liveUniques(sql);
  const allowed = release.unique_drops_allowed ?? {};
  for (const table of Object.values(snapshot.tables)) {
    const old = [
      ...Object.values(table.uniqueConstraints).map((u) => ({ name: u.name, columns: u.columns, partial: false })),
      ...Object.values(table.indexes)
        .filter((i) => i.isUnique)
        .map((i) => ({ name: i.name, columns: i.columns.map((c) => c.expression), partial: Boolean(i.where) })),
    ];
    for (const unique of old) {
      const key = `${table.name}(${[...unique.columns].sort().join(", ")})${unique.partial ? " partial" : ""}`;
      if (!uniques.has(key) && !allowed[unique.name]) {
        problems.push(
          `${table.name}: unique ${unique.name} on (${unique.columns.join(", ")}) is gone; the previous release relies on it (list it in drizzle/release.json unique_drops_allowed, with the reason, if it does not)`,
        );
      }
    }
  }
  const written = await writeAsRelease(sql, snapshot, 2);
  problems.push(...written.problems);
  return problems;
}

/**
 * The whole check on an empty database: the migrations up to the previous release, its data, the
 * rest of the migrations (`apply`), then problemsForPreviousRelease.
 */
export async function checkRollbackSafety(
  target: Target,
  release: ReleaseFile,
  applyUpToPrevious: () => Promise<void>,
  applyAll: () => Promise<void>,
): Promise<string[]> {
  const snapshot = snapshotOf(release.previous);
  await applyUpToPrevious();
  let sql = connect(target);
  const written = await writeAsRelease(sql, snapshot, 1);
  if (written.problems.length > 0) throw new Error(`seeding failed: ${written.problems.join("; ")}`);
  const seeded = new Map<string, { id: string | undefined; row: Record<string, string | null> }>();
  for (const table of Object.values(snapshot.tables)) {
    const id = written.ids.get(table.name);
    seeded.set(table.name, { id, row: await readAsRelease(sql, table, id) });
  }
  await applyAll();
  sql = connect(target);
  return problemsForPreviousRelease(sql, snapshot, seeded, release);
}
