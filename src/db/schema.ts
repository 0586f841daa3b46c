import { sql } from "drizzle-orm";
import {
  bigserial,
  boolean,
  index,
  integer,
  pgTable,
  primaryKey,
  serial,
  text,
  timestamp,
  uniqueIndex,
} from "drizzle-orm/pg-core";

export const TOKEN_STATUSES = ["active", "needs_reauth", "revoked"] as const;
/** Why the last consent stored nothing (see src/services/authorization.ts). */
export const CONSENT_PROBLEMS = ["scopes_not_granted", "no_refresh_token"] as const;

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
  /**
   * Sequence number of the branch's latest event (see `events.seq`). Bumped in the statement that
   * writes the event, so the row lock orders concurrent events of one branch.
   */
  eventSeq: integer("event_seq").notNull().default(0),
  /**
   * Login links issued (and admin-started consents begun) before this instant no longer work.
   * Revoking links moves it to now; a consent that stores tokens moves it past its link's issue
   * time in the same transaction, so a link is single use and of two racing callbacks one stores.
   */
  loginLinksValidAfter: timestamp("login_links_valid_after", { withTimezone: true }),
  /** The last consent stored nothing because of this (cleared when one stores tokens). */
  consentProblem: text("consent_problem", { enum: CONSENT_PROBLEMS }),
  consentProblemDetail: text("consent_problem_detail"),
  consentProblemAt: timestamp("consent_problem_at", { withTimezone: true }),
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

export const EVENT_TYPES = [
  "connection.created",
  "connection.reauthorized",
  "connection.needs_reauth",
  "connection.credentials_rejected",
  "connection.degraded",
  "connection.recovered",
  "connection.revoked",
  "connection.deleted",
  "client.deactivated",
  "client.reactivated",
] as const;
export type EventType = (typeof EVENT_TYPES)[number];

/**
 * `pending` (to deliver; `next_attempt_at` says when), `delivered` (a 2xx), `failed` (the retry
 * ladder ran out; redeliverable), `stopped` (the receiver answered 410 Gone), `not_sent` (no
 * WEBHOOK_URL was configured when it happened: logged only).
 */
export const DELIVERY_STATES = ["pending", "delivered", "failed", "stopped", "not_sent"] as const;
export type DeliveryState = (typeof DELIVERY_STATES)[number];

/**
 * Connection events: one row per change of a branch's state, written in the same statement or
 * batch as the change. No foreign key to clients on purpose: `connection.deleted` outlives its client.
 */
export const events = pgTable(
  "events",
  {
    /** Sortable: the log's cursor and the Standard Webhooks `webhook-id` (`evt_<id>`). */
    id: bigserial("id", { mode: "number" }).primaryKey(),
    type: text("type", { enum: EVENT_TYPES }).notNull(),
    /** Internal client id (the API's client_id). */
    clientId: integer("client_id").notNull(),
    /** The branch as callers name it in /tokens/{branch_id}; copied so it survives the client. */
    branchId: text("branch_id").notNull(),
    /** Per-branch order (1, 2, …), visible even when deliveries overtake each other. */
    seq: integer("seq").notNull(),
    statusBefore: text("status_before").notNull(),
    statusAfter: text("status_after").notNull(),
    reason: text("reason"),
    createdAt: timestamp("created_at", { withTimezone: true }).notNull(),
    deliveryState: text("delivery_state", { enum: DELIVERY_STATES }).notNull(),
    attempts: integer("attempts").notNull().default(0),
    /** When pending: the next attempt; while an attempt runs, the end of its claim. */
    nextAttemptAt: timestamp("next_attempt_at", { withTimezone: true }),
    lastAttemptAt: timestamp("last_attempt_at", { withTimezone: true }),
    /** The last attempt's failure (HTTP status or network error), never a secret. */
    lastError: text("last_error"),
    deliveredAt: timestamp("delivered_at", { withTimezone: true }),
  },
  (t) => [
    index("events_client_id_id_idx").on(t.clientId, t.id),
    index("events_branch_id_id_idx").on(t.branchId, t.id),
    index("events_type_id_idx").on(t.type, t.id),
    index("events_delivery_due_idx").on(t.nextAttemptAt).where(sql`${t.deliveryState} = 'pending'`),
    index("events_created_at_idx").on(t.createdAt),
  ],
);

/**
 * Security Event Tokens received from Google (Cross-Account Protection, src/services/risc.ts), one
 * row per (issuer, jti): a token is acted on once, in the statement batch that records it, so a
 * redelivery changes nothing. Pruned by the cron once a redelivery would be refused for its age
 * anyway (iat older than 7 days: see pruneSecurityEvents).
 */
export const securityEvents = pgTable(
  "security_events",
  {
    issuer: text("issuer").notNull(),
    jti: text("jti").notNull(),
    /** The app client id it was addressed to. */
    audience: text("audience").notNull(),
    /** The event type URIs it carried, space-separated. */
    eventTypes: text("event_types").notNull(),
    /** A verification event's `state` (`npm run risc:verify` waits for it). */
    verificationState: text("verification_state"),
    /** The token's `iat`. */
    issuedAt: timestamp("issued_at", { withTimezone: true }).notNull(),
    receivedAt: timestamp("received_at", { withTimezone: true }).notNull(),
    /** Random per delivery: the batch's later statements act only if this delivery's row was the one inserted. */
    receipt: text("receipt").notNull(),
  },
  (t) => [
    primaryKey({ columns: [t.issuer, t.jti] }),
    index("security_events_issued_at_idx").on(t.issuedAt),
    index("security_events_verification_state_idx")
      .on(t.verificationState)
      .where(sql`${t.verificationState} is not null`),
  ],
);

export type EventRow = typeof events.$inferSelect;
export type ClientRow = typeof clients.$inferSelect;
export type TokenRow = typeof tokens.$inferSelect;
