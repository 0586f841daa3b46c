import { sql } from "drizzle-orm";
import { boolean, index, integer, pgTable, serial, text, timestamp, uniqueIndex } from "drizzle-orm/pg-core";

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
  isActive: boolean("is_active").notNull().default(true),
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
  },
  (t) => [
    index("tokens_client_id_id_idx").on(t.clientId, t.id),
    uniqueIndex("tokens_one_valid_per_client_idx").on(t.clientId).where(sql`${t.isValid}`),
  ],
);

export type ClientRow = typeof clients.$inferSelect;
export type TokenRow = typeof tokens.$inferSelect;
