import { sql } from "drizzle-orm";
import { boolean, index, integer, pgTable, serial, text, timestamp, uniqueIndex } from "drizzle-orm/pg-core";

export const TOKEN_STATUSES = ["active", "needs_reauth", "revoked"] as const;

/** One OAuth client per branch: the credentials this service uses at the provider. */
export const clients = pgTable("clients", {
  id: serial("id").primaryKey(),
  clientId: text("client_id").notNull().unique(),
  /** Sealed with the token encryption key (see src/lib/crypto.ts); never stored in plain text. */
  clientSecret: text("client_secret").notNull(),
  redirectUri: text("redirect_uri").notNull(),
  branchId: text("branch_id").notNull().unique(),
  workspaceEmail: text("workspace_email").notNull(),
  workspaceName: text("workspace_name").notNull(),
  /** Space-separated scopes for this client; null means OAUTH_SCOPES. */
  scopes: text("scopes"),
  isActive: boolean("is_active").notNull().default(true),
  /**
   * Nonce of the last authorization state presented at the callback. Claiming it with one
   * conditional UPDATE lets only one of two concurrent callbacks for the same state exchange the code.
   */
  lastStateNonce: text("last_state_nonce"),
  /** Set when the provider answered `invalid_client`: the stored credentials need fixing. */
  credentialsRejectedAt: timestamp("credentials_rejected_at", { withTimezone: true }),
  createdAt: timestamp("created_at", { withTimezone: true }).notNull().defaultNow(),
  updatedAt: timestamp("updated_at", { withTimezone: true }).notNull().defaultNow(),
});

/** Tokens obtained for a client. At most one row per client is current (`is_valid`). */
export const tokens = pgTable(
  "tokens",
  {
    id: serial("id").primaryKey(),
    clientId: integer("client_id")
      .notNull()
      .references(() => clients.id, { onDelete: "cascade" }),
    /** Sealed; see clients.clientSecret. */
    accessToken: text("access_token").notNull(),
    /** Sealed; null when the provider never issued one. */
    refreshToken: text("refresh_token"),
    tokenType: text("token_type").notNull().default("Bearer"),
    scope: text("scope"),
    expiresAt: timestamp("expires_at", { withTimezone: true }).notNull(),
    isValid: boolean("is_valid").notNull().default(true),
    createdAt: timestamp("created_at", { withTimezone: true }).notNull().defaultNow(),
    lastRefreshedAt: timestamp("last_refreshed_at", { withTimezone: true }),
    /** `active`, `needs_reauth` (the grant is dead) or `revoked` (by an operator). */
    status: text("status", { enum: TOKEN_STATUSES }).notNull().default("active"),
    /** Lifetime the provider granted at the last issue, for the refresh-ahead rule. */
    lifetimeSeconds: integer("lifetime_seconds"),
    /** Single-flight refresh: whoever holds an unexpired lease is the one refreshing. */
    leaseOwner: text("lease_owner"),
    leaseExpiresAt: timestamp("lease_expires_at", { withTimezone: true }),
    /** Transient refresh failures (429, 5xx, timeouts) and the backoff they imply. */
    failureCount: integer("failure_count").notNull().default(0),
    lastError: text("last_error"),
    nextAttemptAt: timestamp("next_attempt_at", { withTimezone: true }),
    /** Nonce of the authorization state that created the row: a state is usable once. */
    stateNonce: text("state_nonce").unique(),
  },
  (t) => [
    index("tokens_client_id_id_idx").on(t.clientId, t.id),
    index("tokens_refresh_due_idx").on(t.expiresAt).where(sql`${t.isValid} and ${t.status} = 'active'`),
    uniqueIndex("tokens_one_valid_per_client_idx").on(t.clientId).where(sql`${t.isValid}`),
  ],
);

export type ClientRow = typeof clients.$inferSelect;
export type TokenRow = typeof tokens.$inferSelect;
