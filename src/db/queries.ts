import { sql } from "drizzle-orm";
import type { TokenRow } from "./schema";

/** Query pieces shared by several services. */

/** The most recent token row of the client in the outer query (one round trip with the client). */
export function latestToken() {
  // Written out in full: drizzle renders columns unqualified inside sql``, and here the inner
  // "id" and the outer "clients"."id" must not be confused.
  return sql<TokenRow | null>`(
    select row_to_json(t) from (
      select * from "tokens" where "tokens"."client_id" = "clients"."id" order by "tokens"."id" desc limit 1
    ) t
  )`.mapWith((value: unknown) => (value == null ? null : tokenFromJson(value)));
}

function tokenFromJson(value: unknown): TokenRow {
  const raw = (typeof value === "string" ? JSON.parse(value) : value) as Record<string, unknown>;
  const date = (v: unknown) => (v == null ? null : new Date(String(v)));
  return {
    id: Number(raw.id),
    clientId: Number(raw.client_id),
    accessToken: String(raw.access_token),
    refreshToken: (raw.refresh_token as string | null) ?? null,
    tokenType: String(raw.token_type),
    scope: (raw.scope as string | null) ?? null,
    expiresAt: date(raw.expires_at)!,
    isValid: Boolean(raw.is_valid),
    createdAt: date(raw.created_at)!,
    lastRefreshedAt: date(raw.last_refreshed_at),
    status: raw.status as TokenRow["status"],
    lifetimeSeconds: raw.lifetime_seconds == null ? null : Number(raw.lifetime_seconds),
    leaseOwner: (raw.lease_owner as string | null) ?? null,
    leaseExpiresAt: date(raw.lease_expires_at),
    failureCount: Number(raw.failure_count ?? 0),
    lastError: (raw.last_error as string | null) ?? null,
    nextAttemptAt: date(raw.next_attempt_at),
    stateNonce: (raw.state_nonce as string | null) ?? null,
  };
}
