import { eq, getTableColumns, isNull, lte, or, sql } from "drizzle-orm";
import type { Db } from "./client";
import { clients, tokens } from "./schema";

/** Query pieces shared by several services. */

/**
 * The grant the branch in the outer query is served from (`clients.grant_id`), as a LATERAL
 * subquery to `leftJoinLateral(latest, sql\`true\`)` onto `clients`: PostgreSQL computes only the
 * columns the outer query selects.
 */
export function latestTokenOfClient(db: Db) {
  return db
    .select(getTableColumns(tokens))
    .from(tokens)
    .where(eq(tokens.id, clients.grantId))
    .limit(1)
    .as("latest_token");
}

export type LatestToken = ReturnType<typeof latestTokenOfClient>;

/** Every column of the subquery, addressed through its alias, for selecting whole token rows. */
export function allTokenColumns(latest: LatestToken): LatestToken["_"]["selectedFields"] {
  return Object.fromEntries(
    Object.keys(getTableColumns(tokens)).map((name) => [name, latest[name as keyof LatestToken]]),
  ) as unknown as LatestToken["_"]["selectedFields"];
}

/**
 * No refresh holds the token: never leased, released, or the holder's lease ran out (a crashed
 * holder). Leases live on the database's clock, the one clock every isolate shares.
 */
export function leaseIsFree() {
  return or(isNull(tokens.leaseExpiresAt), lte(tokens.leaseExpiresAt, sql`now()`));
}

/** The lease's expiry for a claim now: the database's clock plus the lease length. */
export function leaseExpiry(leaseMs: number) {
  return sql`now() + make_interval(secs => ${leaseMs / 1000})`;
}
