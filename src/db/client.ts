import { neon, neonConfig } from "@neondatabase/serverless";
import { drizzle } from "drizzle-orm/neon-http";

export type Db = ReturnType<typeof createDb>;

export interface DbConfig {
  databaseUrl: string;
  /** Dev only: where the local database program (dev/neon-local) listens. Unset in production. */
  localFetchEndpoint?: string | undefined;
}

/**
 * A database handle: neon-http holds no connection (each query is one HTTP request), so one handle
 * serves every invocation on the same environment (src/context.ts).
 */
export function createDb(config: DbConfig) {
  useDatabaseEndpoint(config.localFetchEndpoint);
  // No `schema`: nothing uses drizzle's relational queries, and building their metadata from the
  // schema took more CPU per request than a token read from the edge cache does.
  return drizzle({ client: neon(config.databaseUrl) });
}

const defaultFetchEndpoint = neonConfig.fetchEndpoint;

/**
 * The driver reads this global at query time. Production leaves it unset (the default
 * `https://api.<host>/sql`); locally it points at the program that speaks the same protocol.
 */
export function useDatabaseEndpoint(localFetchEndpoint: string | undefined): void {
  neonConfig.fetchEndpoint = localFetchEndpoint ?? defaultFetchEndpoint;
}
