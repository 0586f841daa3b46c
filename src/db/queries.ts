import { eq, sql } from "drizzle-orm";
import { tokens } from "./schema";

/** Query pieces shared by several services. */

/**
 * Join condition picking the client's most recent token row: `max(id)` per client comes from the
 * (client_id, id) index, so reading a client with its token stays one indexed query. Written out
 * in SQL because the inner "tokens" must be an alias distinct from the joined table.
 */
export function isLatestTokenOfClient() {
  return eq(tokens.id, sql`(select max(latest.id) from "tokens" latest where latest.client_id = "clients"."id")`);
}
