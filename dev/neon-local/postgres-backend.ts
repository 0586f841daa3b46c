// A real PostgreSQL (through `pg`) behind the Neon HTTP protocol.
import pg from "pg";
import {
  type BatchOptions,
  fieldDescription,
  type QueryResult,
  type SqlBackend,
  type SqlQuery,
  transactionModes,
} from "./server.ts";

/** The session Neon's proxy gives: UTC and ISO dates, so drizzle parses timestamps itself. */
const SESSION_OPTIONS = "-c TimeZone=UTC -c DateStyle=ISO,MDY";

/** No parsing: the driver gets PostgreSQL's own text. */
const PASS_THROUGH_TYPES = { getTypeParser: () => (text: string) => text } as unknown as pg.CustomTypesConfig;

type Client = Pick<pg.PoolClient, "query">;

export async function openPostgresBackend(url: string): Promise<SqlBackend> {
  const pool = new pg.Pool({ connectionString: url, options: SESSION_OPTIONS });
  // An idle client losing its connection must not take the program down; the next query reconnects.
  pool.on("error", (error) => console.error("neon-local: idle PostgreSQL connection failed:", error.message));
  // Fail at start-up, not at the first request, when the database is unreachable.
  try {
    (await pool.connect()).release();
  } catch (error) {
    await pool.end();
    throw error;
  }

  let closed: Promise<void> | undefined;
  return {
    description: `postgres: ${describeUrl(url)}`,
    query: (query) => run(pool, query),
    batch: async (queries, options: BatchOptions) => {
      const client = await pool.connect();
      let broken: Error | undefined;
      try {
        const modes = transactionModes(options);
        await client.query(modes ? `BEGIN ${modes}` : "BEGIN");
        try {
          const results: QueryResult[] = [];
          for (const query of queries) results.push(await run(client, query));
          await client.query("COMMIT");
          return results;
        } catch (error) {
          await client.query("ROLLBACK").catch((rollbackError: Error) => {
            broken = rollbackError;
          });
          throw error;
        }
      } finally {
        client.release(broken);
      }
    },
    close: () => {
      closed ??= pool.end();
      return closed;
    },
  };
}

async function run(client: Client, { query, params }: SqlQuery): Promise<QueryResult> {
  // `queryMode: 'extended'` makes even a parameterless query a single prepared statement, so a
  // second statement is refused as on Neon. @types/pg does not know the option yet.
  const config = { text: query, values: params, rowMode: "array", types: PASS_THROUGH_TYPES, queryMode: "extended" };
  const result = await client.query<(string | null)[]>(config as pg.QueryArrayConfig);
  return {
    fields: result.fields.map((field) => fieldDescription({ ...field, format: "text" })),
    rows: result.rows,
    command: result.command ?? "",
    rowCount: result.rowCount ?? null,
  };
}

/** host:port/database, never the credentials. */
function describeUrl(url: string): string {
  try {
    const parsed = new URL(url);
    return `${parsed.host}${parsed.pathname}`;
  } catch {
    return "(unparseable URL)";
  }
}
